"""LoRA for MeZO (the paper's PEFT setting): A/B on the attention projections, applied by forward hooks.

Each target (``MeZOConfig.lora_targets``, by default ``q_proj`` and ``v_proj``) of every
layer gets A (r x in, uniform in +-1/sqrt(in), like peft's kaiming-uniform, drawn on the
CPU from the given seed, layer by layer, targets in config order) and B (out x r, zeros).
The SGLang module that holds the target's weight (a fused ``qkv_proj`` for every family
here) gets a forward hook adding ``(alpha/r)·(x Aᵀ) Bᵀ`` to the target's slice of its
output, the rows of the fused weight it holds (``params.Placement.param_rows``: with
grouped-query attention the k / v slices are smaller than q's): peft's unmerged LoRA, with
no copy of the base weights.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch

from sglang.overlay.mezo.params import Placement

_TARGET = re.compile(r"^(?P<prefix>.*\.(?P<layer>\d+)\..*\.(?P<target>\w+))\.weight$")


def lora_targets(placements: dict[str, Placement], targets: tuple[str, ...]) -> list[str]:
    """The HF module paths of every target weight (``model.layers.3.self_attn.q_proj``), layer by layer,
    targets in ``targets`` order; ValueError where the model has none of a target."""
    found: dict[tuple[int, int], str] = {}
    for name in placements:
        match = _TARGET.match(name)
        if match and match["target"] in targets:
            found[(int(match["layer"]), targets.index(match["target"]))] = match["prefix"]
    missing = [t for i, t in enumerate(targets) if not any(key[1] == i for key in found)]
    if missing:
        raise ValueError(
            f"lora_targets {targets}: the model has no {', '.join(missing)} weight (its attention projections are "
            "fused in the checkpoint, e.g. GPT-2's c_attn?): train every weight (lora_rank=None) or name others"
        )
    return [found[key] for key in sorted(found)]


def add_lora(
    model: torch.nn.Module, placements: dict[str, Placement], config: Any, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"model.layers.0.self_attn.q_proj": (A, B), ...}`` in layer -> target order, with the hooks registered."""
    if getattr(model, "_mezo_lora", False):
        raise ValueError(
            "this runner's model already carries another MeZO trainer's LoRA hooks: "
            "build a new StandaloneRunner for each LoRA trainer"
        )
    prefixes = lora_targets(placements, tuple(config.lora_targets))
    model._mezo_lora = True
    rank = config.lora_rank
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    adapters: dict[str, list[tuple[slice, torch.Tensor, torch.Tensor]]] = {}
    for prefix in prefixes:
        placement = placements[f"{prefix}.weight"]
        weight = placement.view
        out_features, in_features = weight.shape
        bound = 1 / math.sqrt(in_features)
        a = ((torch.rand((rank, in_features), generator=generator) * 2 - 1) * bound).to(weight.device, weight.dtype)
        b = torch.zeros((out_features, rank), device=weight.device, dtype=weight.dtype)
        lora[prefix] = (a, b)
        module = placement.sglang_name.rsplit(".", 1)[0]
        adapters.setdefault(module, []).append((slice(*placement.param_rows), a, b))
    for module, targets in adapters.items():
        model.get_submodule(module).register_forward_hook(_lora_hook(targets, config.lora_alpha / rank))
    return lora


def _lora_hook(adapters: list[tuple[slice, torch.Tensor, torch.Tensor]], scale: float) -> Callable[..., None]:
    """A forward hook on a (fused) projection: adds scale·(x Aᵀ) Bᵀ to each target's columns of its output."""

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: Any) -> None:
        x, out = args[0], output[0] if isinstance(output, tuple) else output
        for columns, a, b in adapters:
            out[..., columns].add_((x @ a.T) @ b.T, alpha=scale)

    return hook
