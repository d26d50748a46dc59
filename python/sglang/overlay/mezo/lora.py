"""LoRA for MeZO (the paper's PEFT setting): A/B on q_proj and v_proj, applied by a hook on the fused qkv_proj.

Each target of every layer gets A (r x in, uniform in +-1/sqrt(in), like peft's
kaiming-uniform, drawn on the CPU from the given seed, layer by layer, targets in
config order) and B (out x r, zeros). A forward hook on the layer's fused
``qkv_proj`` adds ``(alpha/r)·(x Aᵀ) Bᵀ`` to the target's column slice of its
output: peft's unmerged LoRA, with no copy of the base weights.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from sglang.overlay.mezo.config import QKV


def add_lora(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], hf_config: Any, config: Any, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"...self_attn.q_proj": (A, B), ...}`` in layer -> target order, with the hooks registered."""
    if getattr(model, "_mezo_lora", False):
        raise ValueError(
            "this runner's model already carries another MeZO trainer's LoRA hooks: "
            "build a new StandaloneRunner for each LoRA trainer"
        )
    model._mezo_lora = True
    rank = config.lora_rank
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(hf_config.num_hidden_layers):
        adapters = []
        for target in config.lora_targets:
            prefix = f"model.decoder.layers.{layer}.self_attn.{target}"
            weight = weights[f"{prefix}.weight"]
            out_features, in_features = weight.shape
            bound = 1 / math.sqrt(in_features)
            a = ((torch.rand((rank, in_features), generator=generator) * 2 - 1) * bound).to(weight.device, weight.dtype)
            b = torch.zeros((out_features, rank), device=weight.device, dtype=weight.dtype)
            lora[prefix] = (a, b)
            columns = slice(QKV.index(target) * out_features, (QKV.index(target) + 1) * out_features)
            adapters.append((columns, a, b))
        qkv = model.get_submodule(f"model.decoder.layers.{layer}.self_attn.qkv_proj")
        qkv.register_forward_hook(_lora_hook(adapters, config.lora_alpha / rank))
    return lora


def _lora_hook(adapters: list[tuple[slice, torch.Tensor, torch.Tensor]], scale: float) -> Callable[..., None]:
    """A forward hook on a fused qkv_proj: adds scale·(x Aᵀ) Bᵀ to each target's columns of its output."""

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, Any]) -> None:
        x, out = args[0], output[0]
        for columns, a, b in adapters:
            out[..., columns].add_((x @ a.T) @ b.T, alpha=scale)

    return hook
