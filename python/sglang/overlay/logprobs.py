"""Log-probabilities of given tokens from half-precision logits, in one read.

``gather_logprobs(logits, targets)`` equals
``log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]``: the
per-row log-sum-exp is accumulated in fp32. On the GPU one Triton kernel
reads each row of the fp16/bf16 logits once; ``log_softmax(logits.float())``
writes and reads an fp32 copy and its result, which at a 50k vocabulary costs
more than the head GEMM that produced the logits (benchmarks/NOTES.md, "Round 2").
Elsewhere it is torch's ``logsumexp`` in fp32.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: torch's logsumexp everywhere
    triton = None

if triton is not None:

    @triton.jit
    def _row_logsumexp_kernel(x_ptr, out_ptr, row_stride, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * row_stride
        running_max = tl.full([BLOCK], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, x)
            # Lanes that have only seen -inf (padding) keep a zero sum.
            scale = tl.exp(tl.where(new_max == float("-inf"), 0.0, running_max - new_max))
            term = tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
            running_sum = running_sum * scale + term
            running_max = new_max
        row_max = tl.max(running_max, axis=0)
        total = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
        tl.store(out_ptr + row, row_max + tl.log(total))


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits.float(), -1)`` of a 2-D tensor (fp32 ``[rows]``)."""
    if (
        triton is None
        or not logits.is_cuda
        or logits.dtype not in (torch.float16, torch.bfloat16)
        or logits.stride(-1) != 1
    ):
        return torch.logsumexp(logits.float(), dim=-1)
    rows, n_cols = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _row_logsumexp_kernel[(rows,)](logits, out, logits.stride(0), n_cols, BLOCK=2048, num_warps=8)
    return out


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under row ``i`` of ``logits`` ``[rows, vocab]`` (fp32 ``[rows]``)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [rows, vocab] and targets [rows]; got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    picked = logits.gather(-1, targets[:, None].long())[:, 0].float()
    return picked - row_logsumexp(logits)
