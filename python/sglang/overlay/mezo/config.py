"""MeZO's settings, each declared once; the record of a step; its seeds.

Every setting is a dataclass field declared with :func:`setting`: its default,
its help, and its bounds. From that one declaration come the checks
(``validate``: a ``ValueError`` naming the field) and the command line
(``sglang.overlay.mezo.__main__`` builds its flags from these dataclasses, as
``HfArgumentParser`` does: ``--lr`` from ``MeZOConfig.lr``). Standard library
only: ``python -m sglang.overlay.mezo --help`` runs without torch.

- :class:`MeZOConfig`: the algorithm's hyperparameters (what a checkpoint must match);
- :class:`RunConfig`: a run of the trainer (steps, checkpoints, evaluation, progress),
  what :func:`sglang.overlay.mezo.run.run_training` takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Optional

QKV = ("q_proj", "k_proj", "v_proj")
LORA_TARGETS = ("q_proj", "v_proj")
LR_SCHEDULES = ("constant", "linear")


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    minimum: Optional[float] = None,
    above: Optional[float] = None,
    maximum: Optional[float] = None,
    choices: Optional[tuple] = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its help and bounds: ``minimum`` and ``maximum`` (inclusive), ``above``
    (exclusive), ``choices``; ``cli`` False keeps it off the command line. No default: required."""
    metadata = dict(help=help, minimum=minimum, above=above, maximum=maximum, choices=choices, cli=cli)
    return dataclasses.field(default=default, metadata=metadata)


class Requirement(typing.NamedTuple):
    """What a field takes, from its annotation and :func:`setting` metadata."""

    kind: type  # int, float, str, bool, Path or tuple (of str)
    optional: bool
    minimum: Optional[float]
    above: Optional[float]
    maximum: Optional[float]
    choices: Optional[tuple]

    def describe(self) -> str:
        """``an int >= 1``, ``a finite number > 0``, ``one of ('a', 'b')``, with ``, or None`` when optional."""
        if self.choices is not None:
            text = f"one of {self.choices}"
        else:
            text = {
                int: "an int",
                float: "a finite number",
                str: "a string",
                bool: "True or False",
                Path: "a path",
                tuple: "a tuple of strings",
            }[self.kind]
            if self.above is not None:
                text += f" > {self.above:g}"
            elif self.minimum is not None:
                text += f" >= {self.minimum:g}"
            if self.maximum is not None:
                text += f" and <= {self.maximum:g}"
        return text + (", or None" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif self.kind is Path:
            ok = isinstance(value, (str, Path))
        elif self.kind is tuple:
            ok = isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            return False
        if self.choices is not None and value not in self.choices:
            return False
        if self.above is not None and not value > self.above:
            return False
        if self.maximum is not None and not value <= self.maximum:
            return False
        return self.minimum is None or value >= self.minimum

    def parse(self, text: str) -> Any:
        """A command-line value of this kind (ValueError where the text is not one)."""
        if self.kind is int:
            return int(text)
        if self.kind is float:
            return float(text)
        if self.kind is Path:
            return Path(text)
        return text


def requirements(cls: type) -> dict[str, Requirement]:
    """Each field of the settings dataclass ``cls`` and what it takes."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint, optional = hints[f.name], False
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Union and type(None) in args:
            optional, hint = True, next(a for a in args if a is not type(None))
        kind = tuple if typing.get_origin(hint) is tuple else hint
        meta = f.metadata
        out[f.name] = Requirement(
            kind, optional, meta.get("minimum"), meta.get("above"), meta.get("maximum"), meta.get("choices")
        )
    return out


def check_fields(settings: Any) -> None:
    """ValueError naming the first field of the dataclass ``settings`` whose value it does not take."""
    for name, requirement in requirements(type(settings)).items():
        value = getattr(settings, name)
        if not requirement.accepts(value):
            raise ValueError(f"{name} must be {requirement.describe()}, got {value!r}")


@dataclass(frozen=True)
class MeZOConfig:
    """MeZO's hyperparameters (``validate`` says what is wrong); ``lora_rank`` None trains every weight."""

    lr: float = setting(1e-6, "learning rate", above=0)
    eps: float = setting(1e-3, "perturbation scale: the losses are taken at θ ± eps·z", above=0)
    seed: int = setting(0, "seed of every step's z (and of LoRA's A)", minimum=0)
    weight_decay: float = setting(0.0, "decoupled weight decay (not on biases and layer norms)", minimum=0)
    lora_rank: Optional[int] = setting(
        None, "train LoRA adapters of this rank on --lora-targets instead of every weight", minimum=1
    )
    lora_alpha: float = setting(16.0, "LoRA scale alpha (the adapters add alpha/r·B A)", above=0)
    lora_targets: tuple[str, ...] = setting(LORA_TARGETS, f"the projections that get LoRA adapters, among {QKV}")
    n_samples: int = setting(1, "n-SPSA: perturbations per step, projected gradients averaged", minimum=1)
    z_rounds: int = setting(
        10,
        "Philox4x32 rounds of z (7 to 10): 7, the fewest that pass BigCrush, makes z cheaper to draw on the GPU; "
        "each value is its own z, so a run resumes with the rounds it started with",
        minimum=7,
        maximum=10,
    )
    lr_schedule: str = setting(
        "constant", "linear: lr decays to 0 at total_steps (the command line: --steps)", choices=LR_SCHEDULES
    )
    total_steps: Optional[int] = setting(
        None, "the run's step count, where the linear schedule reaches 0", minimum=1, cli=False
    )

    def validate(self) -> None:
        check_fields(self)
        targets = tuple(self.lora_targets)
        if not targets or len(set(targets)) != len(targets) or not set(targets) <= set(QKV):
            raise ValueError(f"lora_targets must be distinct names among {QKV}, got {self.lora_targets!r}")
        if self.lr_schedule == "linear" and self.total_steps is None:
            raise ValueError("lr_schedule='linear' needs total_steps, the run's step count (lr reaches 0 there)")

    def lr_at(self, step: int) -> float:
        """The lr of step ``step`` (0-based): ``lr``, or linear: ``lr·(1 - step/total_steps)``."""
        if self.lr_schedule == "constant":
            return self.lr
        if not 0 <= step < self.total_steps:
            raise ValueError(
                f"step {step} is past the linear schedule's total_steps {self.total_steps}: "
                "train at most total_steps steps"
            )
        return self.lr * (1 - step / self.total_steps)


@dataclass(frozen=True)
class RunConfig:
    """A run of the trainer to ``steps`` steps in all, with its files under ``out``
    (:func:`sglang.overlay.mezo.run.run_training`)."""

    steps: int = setting(help="steps in all (a resumed run counts the checkpoint's)", minimum=1)
    out: Path = setting(help="where the trained HF checkpoint, the step log and the checkpoints go")
    save_every: Optional[int] = setting(
        None,
        "write a resumable checkpoint to OUT/checkpoints/step-NNNNNN every K steps (and after the last)",
        minimum=1,
    )
    keep_checkpoints: Optional[int] = setting(None, "keep only the N newest checkpoints (default: all)", minimum=1)
    resume: bool = setting(False, "continue from the newest checkpoint in OUT/checkpoints (none: start at step 0)")
    eval_every: Optional[int] = setting(
        None, "evaluate every K steps (always: before the first step and after the last)", minimum=1
    )
    eval_batch_size: int = setting(32, "(prompt, target) pairs per evaluation forward", minimum=1)
    progress: bool = setting(True, "show a progress bar (or a line per step where the output is not a terminal)")

    def validate(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class StepResult:
    """One MeZO step: its index, z seed (n-SPSA: the first sample's), both losses, g and the loss at θ,
    (L+ + L-) / 2 (n-SPSA: each the mean over the samples), and the step's scheduled lr."""

    step: int
    seed: int
    loss_plus: float
    loss_minus: float
    projected_grad: float
    loss: float
    lr: float


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed from ``seed`` and labels: SHA-256 of ``"mezo:<seed>:<label>:..."``, first 8 bytes, >> 1."""
    text = ":".join(str(part) for part in ("mezo", seed, *labels))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
