"""MeZO's hyperparameters, the record of a step, and its seeds (``sglang.overlay.mezo`` is the trainer)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

from sglang.overlay.mezo_params import QKV

LORA_TARGETS = ("q_proj", "v_proj")
LR_SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class MeZOConfig:
    """Hyperparameters; ``validate`` says what is wrong. ``lora_rank`` None trains every weight."""

    lr: float = 1e-6
    eps: float = 1e-3
    seed: int = 0
    weight_decay: float = 0.0
    lora_rank: Optional[int] = None
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    n_samples: int = 1
    lr_schedule: str = "constant"
    total_steps: Optional[int] = None

    def validate(self) -> None:
        for name in ("lr", "eps", "lora_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise ValueError(f"lora_rank must be an int >= 1, or None to train every weight; got {self.lora_rank!r}")
        targets = tuple(self.lora_targets)
        if not targets or len(set(targets)) != len(targets) or not set(targets) <= set(QKV):
            raise ValueError(f"lora_targets must be distinct names among {QKV}, got {self.lora_targets!r}")
        if not isinstance(self.n_samples, int) or isinstance(self.n_samples, bool) or self.n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1 (perturbations per step), got {self.n_samples!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            raise ValueError(f"total_steps must be an int >= 1 or None, got {self.total_steps!r}")
        if self.lr_schedule == "linear" and self.total_steps is None:
            raise ValueError("lr_schedule='linear' needs total_steps, the run's step count (lr reaches 0 there)")

    def lr_at(self, step: int) -> float:
        """The lr of step ``step`` (0-based): ``lr``, or linear: ``lr·(1 - step/total_steps)``."""
        if self.lr_schedule == "constant":
            return self.lr
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is past the linear schedule's total_steps {self.total_steps}: "
                             "train at most total_steps steps")
        return self.lr * (1 - step / self.total_steps)


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


def decays(name: str) -> bool:
    """MeZO's rule: weight decay applies to every parameter but biases and layer norms."""
    return "bias" not in name and "layer_norm" not in name
