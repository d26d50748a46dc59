"""MeZO checkpoints: save a trainer's state atomically, load it back in place, find the newest.

A checkpoint is a folder::

    config.json, model.safetensors   # the trainer's save_pretrained (LoRA merged): an HF checkpoint
    mezo_lora.safetensors            # LoRA only: the A/B tensors (merged weights cannot resume LoRA)
    trainer_state.json               # steps done, the MeZOConfig, the run's facts (data hash, ...)

Resuming is exact: the z of step k depends only on (seed, k) and the batch of step k
is batch k % len(batches), so loading the weights (LoRA: A/B; the base weights are
the model's own, never written) and ``steps_done`` continues the same run bit for bit
(same device type and dtype). ``MeZO.load_checkpoint`` refuses a checkpoint of a different
MeZOConfig, model architecture, device type, dtype or run facts, naming both values.

Saving writes into a temporary sibling folder (``.tmp-<name>-*``) and renames it
into place, so an interrupted save leaves no partial checkpoint under the final
name, and the previous checkpoints stay intact. ``latest_checkpoint`` ignores the
temporary folders; ``remove_stale_temps`` deletes those a killed process left.
This module knows files, not the trainer: ``MeZO.save_checkpoint`` /
``MeZO.load_checkpoint`` hand it the state and the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

STATE_FILE = "trainer_state.json"
LORA_FILE = "mezo_lora.safetensors"
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_name(steps_done: int) -> str:
    return f"step-{steps_done:06d}"


def model_facts(hf_config: dict, device_type: str, dtype: torch.dtype) -> dict[str, str]:
    """What a checkpoint must share with the trainer that loads it, besides the MeZOConfig: the model's
    config (its hash), the device type and the dtype."""
    hf = {k: v for k, v in hf_config.items() if k not in ("transformers_version", "_name_or_path")}
    return {
        "model_config_sha256": hashlib.sha256(json.dumps(hf, sort_keys=True, default=str).encode()).hexdigest(),
        "device_type": device_type,
        "dtype": str(dtype).replace("torch.", ""),
    }


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | Path,
    write_model: Callable[[Path], None],
    state: dict,
    lora: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write a checkpoint to ``directory`` atomically (temp folder + rename; an existing ``directory`` is
    replaced): ``write_model(folder)`` writes the HF checkpoint, ``lora`` (CPU tensors) the A/B tensors,
    ``state`` (steps done, the MeZOConfig, facts, the run's facts, extra) the trainer state."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would stay on the checkpoint after the rename
        write_model(tmp)
        if lora:
            save_file({name: t.contiguous() for name, t in lora.items()}, str(tmp / LORA_FILE))
        _write_state(tmp / STATE_FILE, {"format": FORMAT, **state})
        for path in tmp.iterdir():
            _fsync(path)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{directory.name}-", dir=directory.parent))
            os.rename(directory, old / directory.name)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
        _fsync(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_state(path: Path, state: dict) -> None:
    with open(path, "w") as handle:
        handle.write(json.dumps(state, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_state(directory: str | Path) -> dict:
    """A checkpoint's trainer_state.json; ValueError naming the folder when it is missing or unreadable."""
    path = Path(directory) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{directory} is not a complete MeZO checkpoint: cannot read {path} ({error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a MeZO trainer state of format {FORMAT}")
    return state


# MeZOConfig fields newer than some checkpoints, with the value those checkpoints were made with.
ADDED_SETTINGS = {"z_rounds": 10}


def check_compatible(state: dict, config: dict, facts: Optional[dict], run: Optional[dict], where: str | Path) -> None:
    """ValueError listing every MeZOConfig field, trainer fact and run fact that differs from the
    checkpoint's (``facts`` / ``run`` None: not compared)."""
    theirs_config = {**ADDED_SETTINGS, **state.get("mezo_config", {})}
    sections = [(theirs_config, config), (state.get("facts", {}), facts), (state.get("run", {}), run)]
    diffs = []
    for theirs, ours in sections:
        if ours is None:
            continue
        ours = json.loads(json.dumps(ours))  # tuples as lists, as the checkpoint has them
        diffs += [
            f"{key}: checkpoint {theirs.get(key)!r}, this run {ours.get(key)!r}"
            for key in sorted(set(theirs) | set(ours))
            if theirs.get(key) != ours.get(key)
        ]
    if diffs:
        raise ValueError(
            f"cannot resume from {where}: it was made with other settings ({'; '.join(diffs)}); "
            "resume with the checkpoint's settings (its trainer_state.json lists them) or start a "
            "new run in another --out"
        )


def load_tensors(directory: str | Path, shapes: dict[str, tuple[int, ...]], lora: bool) -> dict[str, torch.Tensor]:
    """The tensors named in ``shapes`` from a checkpoint (LoRA: its A/B file; else its HF weights), each
    checked against its shape; ValueError naming the folder where one is missing or of another shape."""
    from safetensors.torch import load_file

    directory = Path(directory)
    files = (
        [directory / LORA_FILE] if lora else sorted(p for p in directory.glob("*.safetensors") if p.name != LORA_FILE)
    )
    loaded: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            loaded.update((k, v) for k, v in load_file(str(path)).items() if k in shapes)
        except (OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"{path}: cannot read the checkpoint's weights ({error})") from None
    missing = [name for name in shapes if name not in loaded]
    if missing:
        raise ValueError(
            f"{directory} lacks {len(missing)} trained tensors ({', '.join(missing[:3])}, ...): "
            "it is not a checkpoint of this trainer"
        )
    for name, shape in shapes.items():
        if tuple(loaded[name].shape) != tuple(shape):
            raise ValueError(
                f"{directory}: {name} is {tuple(loaded[name].shape)} in the checkpoint, {tuple(shape)} in the trainer"
            )
    return loaded


def checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(steps done, folder) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (``step-NNNNNN`` with a trainer_state.json), or None."""
    found = checkpoints(root)
    return found[-1][1] if found else None


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints under ``root``."""
    for _, path in checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temps(root: str | Path) -> None:
    """Delete the temporary folders an interrupted save left under ``root``."""
    root = Path(root)
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
