"""The dense scoring engine: a model's decoder for whole prompts on the GPU.

Scoring forwards (logits, log-probs, MeZO's losses) are EXTEND batches whose
sequences all start from an empty KV cache, that no decode follows. For them a
``DenseEngine`` walks the decoder of the loaded model on its own modules and
parameters, without ``ModelRunner.forward``'s per-forward preparation, the
attention backend's metadata, the LogitsProcessor, or K/V writes:

- attention with torch's flash / cuDNN kernels (``DensePrefill``), 2.5-3x faster
  than the Triton backend's extend kernel for these batches (benchmarks/NOTES.md);
- the token ids go in as they are (``score``): no ScheduleBatch or ForwardBatch;
- CUDA graphs of the whole decoder for repeated batch shapes
  (``sglang.overlay.graphs``).

A family's engine walks its layers: ``sglang.overlay.dense_opt`` (the native
OPT, with its own fused paths) and ``sglang.overlay.dense_llama`` (Llama,
Mistral, Qwen2, Qwen3). An engine is attached to a loaded model from outside
(``attach``); the model files stay as upstream has them. ``forward`` / ``score``
return None for anything an engine does not take (CPU, fp32, prefixes,
pipeline or tensor parallelism where the family's walk does not reduce, KV
scales, quantized weights, ...): run the batch through ModelRunner.forward then.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
from torch import nn

# KV pools whose set_kv_buffer takes the batch's out_cache_loc and unscaled
# K/V as the attention backends hand them over (no loc translation, no
# quantization): those DensePrefill writes to.
_PLAIN_MHA_POOLS = ("MHATokenToKVPool", "PageMajorMHATokenToKVPool")


def to_device(parts: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """Lists of ints as int64 tensors on ``device``, in one copy from pinned memory that does not wait
    for the device (on the CPU: the tensors themselves)."""
    host = torch.tensor([value for part in parts for value in part], dtype=torch.int64)
    if device.type != "cpu":
        host = host.pin_memory().to(device, non_blocking=True)
    return list(torch.split(host, [len(part) for part in parts]))


def _plain_attention(attn: nn.Module) -> bool:
    """Whether torch's flash kernels compute ``attn`` (a RadixAttention) as the backends do: unscaled
    K/V, a head size they take, no sliding window, no logit cap."""
    return (
        attn.k_scale is None
        and attn.head_dim % 8 == 0
        and attn.head_dim <= 256
        and getattr(attn, "v_head_dim", attn.head_dim) == attn.head_dim
        and getattr(attn, "sliding_window_size", -1) in (None, -1)
        and not getattr(attn, "logit_cap", 0)
    )


class DensePrefill:
    """Attention for a batch of whole prompts on the GPU with torch's kernels.

    An EXTEND batch whose sequences all start from an empty KV cache (no
    prefixes: every MeZO / scoring forward, the first prefill of a request)
    needs only causal self-attention within each sequence. Measured on an
    H100 (benchmarks/NOTES.md), torch's flash / cuDNN kernels run it 2.5-3x
    faster than the Triton backend's extend kernel, with far less host work
    per layer. The K/V are written to the KV pool (for later decode), unless
    ``write_kv`` is False: forwards that no decode follows
    (``OPTForCausalLM.forward_dense``: scoring, MeZO's losses).

    ``plan`` returns None, and every layer goes through RadixAttention and
    the configured backend as usual, for anything else: CPU, fp32, prefixes,
    mixed / speculative batches, graph capture, KV scales, head sizes torch's
    flash kernels do not take, pools other than the plain MHA pool, context
    parallelism.
    """

    __slots__ = (
        "lens",
        "cu_seqlens",
        "max_len",
        "varlen",
        "pool",
        "out_cache_loc",
        "write_kv",
    )

    def __init__(
        self,
        lens: tuple[int, ...],
        cu_seqlens: Optional[torch.Tensor],
        pool,
        out_cache_loc: Optional[torch.Tensor],
        write_kv: bool = True,
        varlen: bool = False,
    ) -> None:
        self.lens = lens
        self.max_len = max(lens)
        # The variable-length flash kernel, which reads cu_seqlens: for ragged lengths, and for
        # grouped-query attention (fewer K/V heads than query heads), which it takes as it is.
        self.varlen = varlen or any(length != self.max_len for length in lens)
        self.cu_seqlens = cu_seqlens
        self.pool = pool
        self.out_cache_loc = out_cache_loc
        self.write_kv = write_kv

    @classmethod
    def plan(
        cls,
        forward_batch,
        attention: Sequence[nn.Module],
        dtype: torch.dtype,
        device: torch.device,
        kv_pool,
        write_kv: bool = True,
    ) -> Optional["DensePrefill"]:
        """The plan of ``forward_batch`` for the ``attention`` layers on
        ``kv_pool`` (the runner's ``token_to_kv_pool``), or None."""
        if forward_batch.forward_mode.name != "EXTEND":
            return None
        lens = forward_batch.extend_seq_lens_cpu
        prefix = forward_batch.extend_prefix_lens_cpu
        if not lens or prefix is None or any(prefix):
            return None
        if any(
            getattr(forward_batch, name, None) is not None
            for name in (
                "attn_cp_metadata",
                "attn_dcp_metadata",
                "dcp_kv_mask",
                "out_cache_loc_virtual",
            )
        ):
            return None
        if type(kv_pool).__name__ not in _PLAIN_MHA_POOLS or forward_batch.out_cache_loc is None:
            return None
        plan = cls.for_lengths(lens, attention, dtype, device)
        if plan is None:
            return None
        plan.pool, plan.out_cache_loc, plan.write_kv = kv_pool, forward_batch.out_cache_loc, write_kv
        if plan.varlen:
            # The cumulative lengths are read by the variable-length kernel only.
            plan.cu_seqlens = torch.nn.functional.pad(
                torch.cumsum(forward_batch.extend_seq_lens, 0, dtype=torch.int32),
                (1, 0),
            )
        return plan

    @classmethod
    def for_lengths(
        cls,
        lens: Sequence[int],
        attention: Sequence[nn.Module],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Optional["DensePrefill"]:
        """A plan for whole sequences of ``lens`` tokens that writes no K/V
        (``cu_seqlens`` is the caller's to set where ``varlen``), or None
        where torch's kernels do not take the ``attention`` layers: scaled
        K/V, head sizes flash does not take, a sliding window or a logit cap."""
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return None
        if not lens or 0 in lens or torch.cuda.is_current_stream_capturing():
            return None
        if not all(_plain_attention(attn) for attn in attention):
            return None
        grouped = any(attn.tp_k_head_num != attn.tp_q_head_num for attn in attention)
        return cls(tuple(lens), None, None, None, write_kv=False, varlen=grouped)

    def static_copy(self) -> "DensePrefill":
        """The same plan on copies of its tensors (a graph's own inputs)."""
        return DensePrefill(
            self.lens,
            None if self.cu_seqlens is None else self.cu_seqlens.clone(),
            self.pool,
            None if self.out_cache_loc is None else self.out_cache_loc.clone(),
            self.write_kv,
            self.varlen,
        )

    def __call__(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads, kv_heads, head_dim = attn.tp_q_head_num, attn.tp_k_head_num, attn.head_dim
        q = q.view(-1, heads, head_dim)
        k = k.view(-1, kv_heads, head_dim)
        v = v.view(-1, kv_heads, head_dim)
        if self.write_kv:
            self.pool.set_kv_buffer(attn, self.out_cache_loc, k, v)
        if not self.varlen:
            # Equal lengths: dense [batch, heads, seq, dim] views, no copies;
            # SDPA picks cuDNN / flash as for HF's OPT (on the CPU, where only
            # tests build a plan, the math kernel, K/V heads repeated for GQA).
            batch = len(self.lens)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.view(batch, self.max_len, heads, head_dim).transpose(1, 2),
                k.view(batch, self.max_len, kv_heads, head_dim).transpose(1, 2),
                v.view(batch, self.max_len, kv_heads, head_dim).transpose(1, 2),
                is_causal=True,
                scale=attn.scaling,
                enable_gqa=kv_heads != heads,
            ).transpose(1, 2)
        else:
            out = torch.ops.aten._flash_attention_forward(
                q,
                k,
                v,
                self.cu_seqlens,
                self.cu_seqlens,
                self.max_len,
                self.max_len,
                0.0,  # dropout
                True,  # causal
                False,  # return_debug_mask
                scale=attn.scaling,
            )[0]
        return out.reshape(q.shape[0], heads * head_dim)


class DenseEngine:
    """The decoder of one loaded model for scoring batches (module docstring): what every family's
    engine shares. A subclass says which models it takes (``attach``) and walks their layers (``run``).

    ``decoder`` is the module holding the embedding and the layers (the prefill graphs watch its tree),
    ``attention`` the RadixAttention of each layer this rank holds."""

    def __init__(self, model: nn.Module, decoder: nn.Module, attention: Sequence[nn.Module]) -> None:
        self.model = model
        self.decoder = decoder
        self.attention = list(attention)
        # Prefill CUDA graphs of this decoder (sglang.overlay.graphs.enable_graphs), or None.
        self.graphs = None

    @classmethod
    def attach(cls, model: nn.Module) -> Optional["DenseEngine"]:
        """An engine for ``model`` when this family's engine takes it, else None."""
        raise NotImplementedError

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: DensePrefill) -> torch.Tensor:
        """The final hidden states (one PP rank holding every layer) on ``plan``: eagerly, or under capture."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop the graphs (and their hold on torch's registration hooks)."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    @property
    def _weight(self) -> torch.Tensor:
        return self.decoder.embed_tokens.weight

    @torch.no_grad()
    def forward(self, forward_batch, kv_pool, *, write_kv: bool = True) -> Optional[torch.Tensor]:
        """The final hidden states of every token, ``[tokens, hidden]``, of a batch of whole
        prompts on ``kv_pool`` (the runner's ``token_to_kv_pool``; the K/V go there only when
        ``write_kv``), from a prefill graph when enabled; the caller applies the head. None when the
        batch needs the attention backend."""
        if self.decoder.pp_group.world_size != 1:
            return None
        weight = self._weight
        plan = DensePrefill.plan(forward_batch, self.attention, weight.dtype, weight.device, kv_pool, write_kv)
        if plan is None:
            return None
        return self._decoder(forward_batch.input_ids, forward_batch.positions, plan)

    @torch.no_grad()
    def score(self, seqs: Sequence[Sequence[int]]) -> Optional[torch.Tensor]:
        """The final hidden states of every token of whole sequences ``seqs`` (token-id lists), as
        ``forward`` gives them with ``write_kv=False``, but from the token ids themselves: no
        ScheduleBatch or ForwardBatch is built (their preparation waits for the GPU, so a forward
        queued behind MeZO's weight pass could not be prepared while the pass runs), and the ids and
        positions reach the GPU in one asynchronous copy. None where ``forward`` would give None."""
        if self.decoder.pp_group.world_size != 1:
            return None
        weight = self._weight
        lens = [len(seq) for seq in seqs]
        plan = DensePrefill.for_lengths(lens, self.attention, weight.dtype, weight.device)
        if plan is None:
            return None
        parts = [[token for seq in seqs for token in seq], [pos for length in lens for pos in range(length)]]
        if plan.varlen:
            parts.append([0, *itertools.accumulate(lens)])
        tensors = to_device(parts, weight.device)
        if plan.varlen:
            plan.cu_seqlens = tensors[2].to(torch.int32)
        return self._decoder(tensors[0], tensors[1], plan)

    def _decoder(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: DensePrefill) -> torch.Tensor:
        if self.graphs is not None:
            hidden_states = self.graphs.run(self, input_ids, positions, plan)
            if hidden_states is not None:
                return hidden_states
        return self.run(input_ids, positions, plan)
