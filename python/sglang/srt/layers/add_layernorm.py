"""LayerNorm that adds the residual first, in one pass on the GPU.

``AddLayerNorm`` is ``nn.LayerNorm`` (same parameters and state-dict names)
whose ``forward(x, residual)`` returns ``(layer_norm(residual + x), residual +
x)``, as SGLang's ``RMSNorm(x, residual)`` does for RMS-normalized models. On
CUDA in half precision one Triton kernel reads each input once and writes each
output once, instead of the three passes of ``residual + x`` and
``layer_norm``; torch's add and LayerNorm elsewhere (``forward_native``).

It follows SGLang's custom-op pattern (``forward_cuda`` / ``forward_native``)
with a plain device dispatch: the releases this file is used with have three
different custom-op base classes.
"""

from typing import Optional, Union

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: forward_native everywhere
    triton = None

if triton is not None:

    @triton.jit
    def _add_layer_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        bias_ptr,
        out_ptr,
        sum_ptr,
        n_cols,
        eps,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        WRITE_SUM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        offsets = row * n_cols + cols
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the model dtype first, as torch's ``residual + x`` is.
        summed = (x + residual).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        if WRITE_SUM:
            tl.store(sum_ptr + offsets, summed, mask=mask)
        h = summed.to(tl.float32)
        mean = tl.sum(h, axis=0) / n_cols
        centered = tl.where(mask, h - mean, 0.0)
        var = tl.sum(centered * centered, axis=0) / n_cols
        y = centered * tl.rsqrt(var + eps)
        if HAS_WEIGHT:
            y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + offsets,
            y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
            mask=mask,
        )


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    want_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(layer_norm(residual + x), residual + x)`` for contiguous 2-D CUDA
    tensors of one dtype; the sum is None unless ``want_sum``."""
    rows, n_cols = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if want_sum else None
    block = triton.next_power_of_2(n_cols)
    _add_layer_norm_kernel[(rows,)](
        x,
        residual,
        weight if weight is not None else x,
        bias if bias is not None else x,
        out,
        summed if summed is not None else out,
        n_cols,
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        WRITE_SUM=want_sum,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return out, summed


class AddLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that can add the residual first: ``norm(x, residual)``
    returns ``(norm(residual + x), residual + x)``; ``want_sum=False`` skips
    the sum (returned as None)."""

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        want_sum: bool = True,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        if residual is None:
            return super().forward(x)
        if x.is_cuda:
            return self.forward_cuda(x, residual, want_sum)
        return self.forward_native(x, residual, want_sum)

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor, want_sum: bool = True
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        summed = residual + x
        return super().forward(summed), summed if want_sum else None

    def forward_cuda(
        self, x: torch.Tensor, residual: torch.Tensor, want_sum: bool = True
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if (
            triton is None
            or x.dtype not in (torch.float16, torch.bfloat16)
            or x.dim() != 2
            or not (x.is_contiguous() and residual.is_contiguous())
            or residual.dtype != x.dtype
        ):
            return self.forward_native(x, residual, want_sum)
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, want_sum)
