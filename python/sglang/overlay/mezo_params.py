"""Where each HuggingFace OPT parameter lives in SGLang's OPT: views MeZO perturbs and updates in place.

:func:`hf_parameter_views` maps every HF ``OPTForCausalLM`` parameter, in HF order,
onto a view of the SGLang parameter that holds it: q/k/v are row thirds of the
fused ``qkv_proj``; ``embed_tokens`` and an untied ``lm_head`` are their first
``vocab_size`` rows (SGLang pads the vocabulary; padding rows are never read).
"""

from __future__ import annotations

from typing import Any

import torch

QKV = ("q_proj", "k_proj", "v_proj")
_VOCAB_PARAMS = ("model.decoder.embed_tokens.weight", "lm_head.weight")


def hf_parameter_shapes(hf_config: Any) -> list[tuple[str, torch.Size]]:
    """HF ``OPTForCausalLM.named_parameters()`` names and shapes, in order (built on the meta device)."""
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(hf_config)
    return [(name, param.shape) for name, param in model.named_parameters()]


def _sglang_location(hf_name: str, shape: torch.Size) -> tuple[str, int, tuple[int, ...]]:
    """The SGLang parameter holding HF parameter ``hf_name``, the row where it starts, and the shape
    that parameter must have (the vocabulary parameters: before SGLang's padding)."""
    for index, proj in enumerate(QKV):
        if f".self_attn.{proj}." in hf_name:
            return hf_name.replace(f".{proj}.", ".qkv_proj."), index * shape[0], (3 * shape[0], *shape[1:])
    return hf_name, 0, tuple(shape)


def hf_parameter_views(model: torch.nn.Module, hf_config: Any) -> dict[str, torch.Tensor]:
    """Every HF OPTForCausalLM parameter, in HF order, as a view of the SGLang ``model``'s parameter.

    Raises ValueError naming an HF parameter SGLang lacks, a shape mismatch, or an
    SGLang parameter whose rows no HF parameter covers (vocabulary padding aside).
    """
    params = dict(model.named_parameters())
    covered = dict.fromkeys(params, 0)
    views: dict[str, torch.Tensor] = {}
    for hf_name, shape in hf_parameter_shapes(hf_config):
        name, start, want = _sglang_location(hf_name, shape)
        if name not in params:
            raise ValueError(f"HF parameter {hf_name!r} has no SGLang parameter {name!r}: is this an OPT model?")
        param = params[name]
        have = (min(param.shape[0], want[0]), *param.shape[1:]) if name in _VOCAB_PARAMS else tuple(param.shape)
        if have != want:
            raise ValueError(
                f"HF parameter {hf_name!r} {tuple(shape)} does not fit SGLang parameter {name!r} "
                f"{tuple(param.shape)}: the checkpoint's config.json and the runner's model disagree"
            )
        views[hf_name] = param.data.narrow(0, start, shape[0])
        covered[name] += shape[0]
    for name, rows in covered.items():
        want = hf_config.vocab_size if name in _VOCAB_PARAMS else params[name].shape[0]
        if rows != want:
            raise ValueError(
                f"SGLang parameter {name!r} {tuple(params[name].shape)}: HF parameters cover {rows} of its "
                f"{want} rows; MeZO would leave it untrained. Map it in "
                "sglang/overlay/mezo_params.py:hf_parameter_views"
            )
    return views
