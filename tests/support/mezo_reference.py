"""An independent MeZO on HuggingFace ``AutoModelForCausalLM`` (fp32, CPU): the tests' reference.

Written from the MeZO paper and the spec in ``sglang/overlay/mezo/trainer.py``'s docstring (step
seeds, z order, LoRA scheme), not from its code: each step's seed is SHA-256 of
``"mezo:<seed>:step:<k>"``, and z of element i of trainable parameter p is
``zo_noise.normal(seed, base(p) + i)`` (the z definition; ``base(p)``: the elements
of the trainable parameters before p, in ``named_parameters()`` order); the
perturbations are three separate passes, as in the paper's code. The loss is the
mean NLL over all target tokens, each example run alone through HF's forward.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import AutoModelForCausalLM


def seed_for(seed: int, *labels: object) -> int:
    text = ":".join(str(part) for part in ("mezo", seed, *labels))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class ReferenceMeZO:
    def __init__(
        self,
        model_dir: Path,
        lr: float,
        eps: float,
        seed: int,
        weight_decay: float = 0.0,
        lora_rank: Optional[int] = None,
        lora_alpha: float = 16.0,
        z_rounds: int = 10,
    ) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.lr, self.eps, self.seed, self.weight_decay, self.z_rounds = lr, eps, seed, weight_decay, z_rounds
        self.step_index = 0
        self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if lora_rank is None:
            self.params = [(name, p.data) for name, p in self.model.named_parameters()]
        else:
            self.params = self._lora(lora_rank)

    def _lora(self, rank: int) -> list[tuple[str, torch.Tensor]]:
        """peft-style unmerged LoRA on q_proj and v_proj: y = W0 x + b + scale · B (A x)."""
        generator = torch.Generator().manual_seed(seed_for(self.seed, "lora-init"))
        params = []
        modules = dict(self.model.named_modules())
        layers = sorted(
            int(n.removesuffix(".self_attn").rsplit(".", 1)[1]) for n in modules if n.endswith(".self_attn")
        )
        for i in layers:
            for target in ("q_proj", "v_proj"):
                (name,) = [n for n in modules if n.endswith(f".{i}.self_attn.{target}")]
                linear = modules[name]
                bound = 1 / math.sqrt(linear.in_features)
                a = (torch.rand((rank, linear.in_features), generator=generator) * 2 - 1) * bound
                b = torch.zeros((linear.out_features, rank))
                self.lora[name] = (a, b)
                params += [(f"{name}.lora_A.weight", a), (f"{name}.lora_B.weight", b)]
                linear.register_forward_hook(
                    lambda module, args, out, a=a, b=b: out + self.lora_scale * (args[0] @ a.T @ b.T)
                )
        return params

    @torch.no_grad()
    def loss(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> float:
        nll = []
        for prompt, target in zip(prompts, targets):
            logits = self.model(torch.tensor([list(prompt) + list(target)])).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            nll.append(-logp.gather(-1, torch.tensor(target)[:, None])[:, 0])
        return torch.cat(nll).mean().item()

    def _z(self, seed: int):
        from sglang.overlay.mezo.noise import normal

        base = 0
        for name, p in self.params:
            yield name, p, normal(seed, torch.arange(base, base + p.numel()), self.z_rounds).view(p.shape)
            base += p.numel()

    def _perturb(self, seed: int, scale: float) -> None:
        for _, p, z in self._z(seed):
            p += scale * self.eps * z

    @torch.no_grad()
    def step(self, prompts, targets) -> tuple[float, float]:
        """One step; returns (L+, L-)."""
        seed = seed_for(self.seed, "step", self.step_index)
        self.step_index += 1
        self._perturb(seed, 1)
        plus = self.loss(prompts, targets)
        self._perturb(seed, -2)
        minus = self.loss(prompts, targets)
        self._perturb(seed, 1)
        grad = (plus - minus) / (2 * self.eps)
        for name, p, z in self._z(seed):
            decay = 0.0 if name in self.no_decay else self.weight_decay
            p -= self.lr * (grad * z + decay * p)
        return plus, minus

    @property
    def no_decay(self) -> set[str]:
        """The MeZO paper's rule (as HF's Trainer's): no weight decay on biases and normalization layers."""
        out = set()
        for module_name, module in self.model.named_modules():
            for name, _ in module.named_parameters(recurse=False):
                if name == "bias" or "Norm" in type(module).__name__:
                    out.add(f"{module_name}.{name}")
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The HF weights, LoRA merged."""
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        for name, (a, b) in self.lora.items():
            state[f"{name}.weight"] += self.lora_scale * (b @ a)
        return state
