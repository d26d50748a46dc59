"""Where each HF OPT parameter lives in a loaded SGLang model, and at which global offsets MeZO's z is drawn.

HF ``OPTForCausalLM.named_parameters()`` order gives every parameter p a base
offset (the elements of the parameters before it; a tied ``lm_head`` is not
repeated). On this rank p is a view of one SGLang parameter: all of it
(replicated), a block of its rows (q/k/v in the fused ``qkv_proj``, fc1 and the
column-parallel q/k/v under tensor parallelism, the vocabulary shard of the
embedding and an untied head, whose padding rows are never read), or a block
of its columns (out_proj and fc2 weights under tensor parallelism: each row of
the shard is a run of the HF row). ``Placement`` says which, so that
``zo_noise.NoisePass`` draws each element's z at its HF offset on every layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from sglang.overlay.mezo.config import QKV

VOCAB_PARAMS = ("model.decoder.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class Placement:
    """This rank's part of one HF parameter: a contiguous ``view`` of an SGLang parameter, the global
    offset of its element 0, and for a column shard ``rows = (row length here, row length in HF)``."""

    view: torch.Tensor
    base: int
    rows: Optional[tuple[int, int]] = None
    sglang_name: str = ""
    hf_base: int = 0  # the global offset of the HF parameter's element 0


def hf_parameter_shapes(hf_config: Any) -> list[tuple[str, torch.Size]]:
    """HF ``OPTForCausalLM.named_parameters()`` names and shapes, in order (built on the meta device)."""
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(hf_config)
    return [(name, param.shape) for name, param in model.named_parameters()]


def _fused(hf_name: str) -> tuple[str, Optional[int]]:
    """The SGLang parameter holding ``hf_name`` and, for q/k/v, its third of the fused qkv_proj."""
    for index, proj in enumerate(QKV):
        if f".self_attn.{proj}." in hf_name:
            return hf_name.replace(f".{proj}.", ".qkv_proj."), index
    return hf_name, None


def place(model: torch.nn.Module, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> dict[str, Placement]:
    """Every HF parameter's placement on this rank, in HF order (module docstring).

    Raises ValueError naming an HF parameter SGLang lacks, a shard that does not fit, or an SGLang
    parameter part of which no HF parameter covers (vocabulary padding aside).
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    covered = dict.fromkeys(params, 0)
    placements: dict[str, Placement] = {}
    base = 0
    for hf_name, shape in hf_parameter_shapes(hf_config):
        name, third = _fused(hf_name)
        if name not in params:
            raise ValueError(f"HF parameter {hf_name!r} has no SGLang parameter {name!r}: is this an OPT model?")
        param = params[name].data
        row = math.prod(shape[1:])
        misfit = ValueError(
            f"HF parameter {hf_name!r} {tuple(shape)} does not fit SGLang parameter {name!r} {tuple(param.shape)} "
            f"at tensor-parallel rank {tp_rank} of {tp_size}: the checkpoint's config.json and the runner's model "
            "disagree"
        )
        if name in VOCAB_PARAMS:
            indices = getattr(modules.get(name.rsplit(".", 1)[0]), "shard_indices", None)
            start, end = (indices.org_vocab_start_index, indices.org_vocab_end_index) if indices else (0, shape[0])
            if param.shape[0] < end - start or param.shape[1:] != shape[1:]:
                raise misfit
            place_ = Placement(param.narrow(0, 0, end - start), base + start * row, None, name, base)
        elif third is not None:
            local = param.shape[0] // 3
            if local * tp_size != shape[0] or param.shape[1:] != shape[1:]:
                raise misfit
            place_ = Placement(param.narrow(0, third * local, local), base + tp_rank * local * row, None, name, base)
        elif tuple(param.shape) == tuple(shape):
            place_ = Placement(param, base, None, name, base)
        elif param.shape[0] * tp_size == shape[0] and param.shape[1:] == shape[1:]:
            place_ = Placement(param, base + tp_rank * param.shape[0] * row, None, name, base)
        elif param.dim() == 2 and param.shape[0] == shape[0] and param.shape[1] * tp_size == shape[1]:
            place_ = Placement(param, base + tp_rank * param.shape[1], (param.shape[1], shape[1]), name, base)
        else:
            raise misfit
        placements[hf_name] = place_
        covered[name] += place_.view.numel()
        base += math.prod(shape)
    for name, count in covered.items():
        indices = getattr(modules.get(name.rsplit(".", 1)[0]), "shard_indices", None)
        rows = (
            (indices.num_org_elements if indices else hf_config.vocab_size)
            if name in VOCAB_PARAMS
            else params[name].shape[0]
        )
        want = rows * math.prod(params[name].shape[1:])
        if count != want:
            raise ValueError(
                f"SGLang parameter {name!r} {tuple(params[name].shape)}: HF parameters cover {count} of its {want} "
                "elements; MeZO would leave the rest untrained. Map it in sglang/overlay/mezo/params.py:place"
            )
    return placements


def gather(placements: dict[str, Placement], hf_config: Any, tp_size: int) -> dict[str, torch.Tensor]:
    """Every HF parameter whole, on the CPU (at tensor parallelism > 1 an all-gather over the TP group:
    every rank calls it)."""
    shapes = dict(hf_parameter_shapes(hf_config))
    out: dict[str, torch.Tensor] = {}
    for name, p in placements.items():
        local = p.view.detach()
        if tp_size == 1:
            out[name] = local.to("cpu", copy=True)
            continue
        if tuple(local.shape) == tuple(shapes[name]):  # replicated
            out[name] = local.to("cpu", copy=True)
            continue
        dim = 1 if p.rows is not None else 0
        sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(tp_size)]
        torch.distributed.all_gather(sizes, torch.tensor([local.shape[dim]], device=local.device))
        longest = max(int(n) for n in sizes)
        padded = torch.zeros(
            *(longest if d == dim else n for d, n in enumerate(local.shape)), dtype=local.dtype, device=local.device
        )
        padded.narrow(dim, 0, local.shape[dim]).copy_(local)
        parts = [torch.empty_like(padded) for _ in range(tp_size)]
        torch.distributed.all_gather(parts, padded)
        whole = torch.cat([part.narrow(dim, 0, int(n)) for part, n in zip(parts, sizes)], dim=dim)
        out[name] = whole.to("cpu")
    return out


def hf_parameter_views(model: torch.nn.Module, hf_config: Any) -> dict[str, torch.Tensor]:
    """Every HF parameter, in HF order, as a view of the SGLang parameter that holds it (one rank)."""
    return {name: p.view for name, p in place(model, hf_config).items()}


def local_part(placement: Placement, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole HF parameter ``full`` (what ``placement.view`` holds)."""
    view = placement.view
    if tuple(full.shape) == tuple(view.shape):
        return full
    row = math.prod(full.shape[1:])
    if placement.rows is not None:
        col0 = placement.base - placement.hf_base
        return full.narrow(1, col0, view.shape[1])
    return full.narrow(0, (placement.base - placement.hf_base) // row, view.shape[0])
