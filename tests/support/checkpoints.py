"""Tiny OPT checkpoints in the layouts SGLang's loader meets, and broken ones.

Every checkpoint is derived from one ``runtime.make_tiny_opt`` directory (the
HF reference loads that directory), so the weights are identical whatever the
layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

StateDict = Dict[str, torch.Tensor]


def read_state_dict(model_dir: Path) -> StateDict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def write_checkpoint(src: Path, dst: Path, state: StateDict, fmt: str = "safetensors", shards: int = 1) -> Path:
    """``dst``: ``src``'s config with ``state`` as its weights, written by hand
    (transformers 5 ignores ``save_pretrained(safe_serialization=False)``).

    ``fmt`` is ``safetensors`` or ``bin``; ``shards > 1`` splits the tensors
    over that many files with an HF index (``*.index.json``).
    """
    import json

    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    shutil.copy(Path(src) / "config.json", dst / "config.json")
    stem, ext = {"safetensors": ("model", "safetensors"), "bin": ("pytorch_model", "bin")}[fmt]
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, str(dst / file), metadata={"format": "pt"})
        else:
            torch.save(part, dst / file)
        weight_map.update({k: file for k in group})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return dst


def relayout(src: Path, dst: Path, layout: str) -> Path:
    """``src`` (a ``runtime.make_tiny_opt`` directory) in ``layout``:

    - ``safetensors``: as saved (one ``model.safetensors``, ``model.decoder.*``)
    - ``bin``: one ``pytorch_model.bin`` that also holds the tied
      ``lm_head.weight``, as transformers 4 saved it
    - ``sharded`` / ``sharded_bin``: three safetensors / .bin shards and their index
    - ``decoder_names``: OPTModel names (``decoder.*``, as facebook/opt-* ship),
      no ``lm_head.weight``
    """
    state = read_state_dict(src)
    if layout == "safetensors":
        return Path(src)
    if layout == "bin":
        state.setdefault("lm_head.weight", state["model.decoder.embed_tokens.weight"].clone())
        return write_checkpoint(src, dst, state, fmt="bin")
    if layout == "sharded":
        return write_checkpoint(src, dst, state, shards=3)
    if layout == "sharded_bin":
        return write_checkpoint(src, dst, state, fmt="bin", shards=3)
    if layout == "decoder_names":
        prefix = "model."
        renamed = {k[len(prefix) :]: v for k, v in state.items() if k.startswith("model.decoder.")}
        return write_checkpoint(src, dst, renamed)
    raise ValueError(f"unknown layout {layout!r}")


def mutated(src: Path, dst: Path, mutate: Callable[[StateDict], Optional[StateDict]]) -> Path:
    """``src`` with its tensors changed in place by ``mutate``."""
    state = read_state_dict(src)
    mutate(state)
    return write_checkpoint(src, dst, state)


def write_config(model_dir: Path, **changes) -> None:
    """Change ``config.json`` keys in place (for configs HF cannot build a model from)."""
    import json

    path = Path(model_dir) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))
