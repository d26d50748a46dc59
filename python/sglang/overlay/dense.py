"""The dense scoring engine: the native OPT's decoder for whole prompts on the GPU.

Scoring forwards (logits, log-probs, MeZO's losses) are EXTEND batches whose
sequences all start from an empty KV cache, that no decode follows. For them
``DenseEngine.forward`` runs the decoder of ``sglang.srt.models.opt`` on the
model's own parameters, without ``ModelRunner.forward``'s per-forward
preparation, the attention backend's metadata, the LogitsProcessor, or K/V
writes, and with the fast paths measured on the H100 / H200
(benchmarks/NOTES.md):

- attention with torch's flash / cuDNN kernels (``DensePrefill``), 2.5-3x faster
  than the Triton backend's extend kernel for these batches;
- fc1 + ReLU as one cuBLASLt GEMM with a bias+ReLU epilogue (every OPT
  checkpoint uses ReLU): one pass less over the widest activation;
- from hidden size 2048 on, the QKV projection as three ``[h, h]`` GEMMs on
  slices of the fused weight (faster in cuBLAS than one ``[3h, h]`` GEMM);
- the residual adds fused into the LayerNorms (``AddLayerNorm``, as the model);
- CUDA graphs of the whole decoder for repeated batch shapes
  (``sglang.overlay.graphs``, opt-in).

The engine is attached to a loaded model from outside (``DenseEngine.attach``);
the model file stays a plain mirror of HF's modules. ``forward`` returns None for
anything it does not take (CPU, fp32, prefixes, pipeline parallelism, KV scales,
quantized weights, ...): run the batch through ModelRunner.forward then.
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

# From this hidden size on, the QKV projection runs as three GEMMs (measured on
# the H100: 1.3b +2.2% per prefill; benchmarks/NOTES.md, "Round 2").
SPLIT_QKV_FROM_HIDDEN = 2048


def to_device(parts: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """Lists of ints as int64 tensors on ``device``, in one copy from pinned memory that does not wait
    for the device (on the CPU: the tensors themselves)."""
    host = torch.tensor([value for part in parts for value in part], dtype=torch.int64)
    if device.type != "cpu":
        host = host.pin_memory().to(device, non_blocking=True)
    return list(torch.split(host, [len(part) for part in parts]))


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
        "equal_lengths",
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
    ) -> None:
        self.lens = lens
        self.max_len = max(lens)
        self.equal_lengths = all(length == self.max_len for length in lens)
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
        if not plan.equal_lengths:
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
        (``cu_seqlens`` is the caller's to set where the lengths differ), or
        None where torch's kernels do not take the ``attention`` layers."""
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return None
        if not lens or 0 in lens or torch.cuda.is_current_stream_capturing():
            return None
        if not all(attn.k_scale is None and attn.head_dim % 8 == 0 and attn.head_dim <= 256 for attn in attention):
            return None
        return cls(tuple(lens), None, None, None, write_kv=False)

    def static_copy(self) -> "DensePrefill":
        """The same plan on copies of its tensors (a graph's own inputs)."""
        return DensePrefill(
            self.lens,
            None if self.cu_seqlens is None else self.cu_seqlens.clone(),
            self.pool,
            None if self.out_cache_loc is None else self.out_cache_loc.clone(),
            self.write_kv,
        )

    def __call__(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads, head_dim = attn.tp_q_head_num, attn.head_dim
        q = q.view(-1, heads, head_dim)
        k = k.view(-1, heads, head_dim)
        v = v.view(-1, heads, head_dim)
        if self.write_kv:
            self.pool.set_kv_buffer(attn, self.out_cache_loc, k, v)
        if self.equal_lengths:
            # Equal lengths: dense [batch, heads, seq, dim] views, no copies;
            # SDPA picks cuDNN / flash as for HF's OPT.
            shape = (len(self.lens), self.max_len, heads, head_dim)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.view(shape).transpose(1, 2),
                k.view(shape).transpose(1, 2),
                v.view(shape).transpose(1, 2),
                is_causal=True,
                scale=attn.scaling,
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
    """The decoder of one native ``OPTForCausalLM`` for scoring batches (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder = model.model.decoder
        decoder = self.decoder
        layers = [decoder.layers[i] for i in range(decoder.start_layer, decoder.end_layer)]
        # The attention layers, for DensePrefill.plan on every forward.
        self.attention = [layer.self_attn.attn for layer in layers]
        self.split_qkv = model.config.hidden_size >= SPLIT_QKV_FROM_HIDDEN
        self.fuse_fc1_relu = model.config.enable_bias and all(
            isinstance(layer.activation_fn, nn.ReLU) for layer in layers
        )
        # Prefill CUDA graphs of this decoder (sglang.overlay.graphs.enable_graphs), or None.
        self.graphs = None

    @classmethod
    def attach(cls, model: nn.Module) -> Optional["DenseEngine"]:
        """An engine for ``model`` when it is the native OPT without quantization, else None."""
        if type(model).__module__ != "sglang.srt.models.opt" or type(model).__name__ != "OPTForCausalLM":
            return None
        if getattr(model, "quant_config", None) is not None:
            return None
        return cls(model)

    def close(self) -> None:
        """Drop the graphs (and their hold on torch's registration hooks)."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    @torch.no_grad()
    def forward(self, forward_batch, kv_pool, *, write_kv: bool = True) -> Optional[torch.Tensor]:
        """The final hidden states of every token, ``[tokens, hidden]``, of a batch of whole
        prompts on ``kv_pool`` (the runner's ``token_to_kv_pool``; the K/V go there only when
        ``write_kv``), from a prefill graph when enabled; the caller applies the head. None when the
        batch needs the attention backend."""
        if self.decoder.pp_group.world_size != 1:
            return None
        weight = self.decoder.embed_positions.weight
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
        weight = self.decoder.embed_positions.weight
        lens = [len(seq) for seq in seqs]
        plan = DensePrefill.for_lengths(lens, self.attention, weight.dtype, weight.device)
        if plan is None:
            return None
        parts = [[token for seq in seqs for token in seq], [pos for length in lens for pos in range(length)]]
        if not plan.equal_lengths:
            parts.append([0, *itertools.accumulate(lens)])
        tensors = to_device(parts, weight.device)
        if not plan.equal_lengths:
            plan.cu_seqlens = tensors[2].to(torch.int32)
        return self._decoder(tensors[0], tensors[1], plan)

    def _decoder(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: DensePrefill) -> torch.Tensor:
        if self.graphs is not None:
            hidden_states = self.graphs.run(self, input_ids, positions, plan)
            if hidden_states is not None:
                return hidden_states
        return self.run(input_ids, positions, plan)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: DensePrefill) -> torch.Tensor:
        """The decoder (one PP rank holding every layer) on ``plan``: eagerly, or under capture."""
        decoder = self.decoder
        hidden_states = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            hidden_states, _ = decoder.project_in(hidden_states)
        hidden_states = hidden_states + decoder.embed_positions(positions)
        residual = None
        for i in range(decoder.start_layer, decoder.end_layer):
            layer = decoder.layers[i]
            if layer.do_layer_norm_before:
                hidden_states, residual = self._pre_norm_layer(layer, hidden_states, residual, plan)
            else:
                hidden_states = self._post_norm_layer(layer, hidden_states, plan)
        if decoder.final_layer_norm is not None:
            if residual is None:
                hidden_states = decoder.final_layer_norm(hidden_states)
            else:
                hidden_states, _ = decoder.final_layer_norm(hidden_states, residual, want_sum=False)
        elif residual is not None:
            hidden_states = hidden_states + residual
        if decoder.project_out is not None:
            hidden_states, _ = decoder.project_out(hidden_states)
        return hidden_states

    def _pre_norm_layer(self, layer, hidden_states, residual, plan):
        # The layer's output is hidden_states + residual: each residual add is
        # left to the LayerNorm that follows it, as in the model.
        if residual is None:
            residual = hidden_states
            hidden_states = layer.self_attn_layer_norm(hidden_states)
        else:
            hidden_states, residual = layer.self_attn_layer_norm(hidden_states, residual)
        hidden_states = self._attention(layer.self_attn, hidden_states, plan)
        hidden_states, residual = layer.final_layer_norm(hidden_states, residual)
        return self._mlp(layer, hidden_states), residual

    def _post_norm_layer(self, layer, hidden_states, plan):
        # 350m: each LayerNorm normalizes the sum of the residual add.
        attn_out = self._attention(layer.self_attn, hidden_states, plan)
        hidden_states, _ = layer.self_attn_layer_norm(attn_out, hidden_states, want_sum=False)
        hidden_states, _ = layer.final_layer_norm(self._mlp(layer, hidden_states), hidden_states, want_sum=False)
        return hidden_states

    def _attention(self, self_attn, hidden_states: torch.Tensor, plan: DensePrefill) -> torch.Tensor:
        proj = self_attn.qkv_proj
        # A module with hooks (MeZO's LoRA on qkv_proj) runs as a module.
        if self.split_qkv and not (proj._forward_hooks or proj._forward_pre_hooks):
            size = self_attn.q_size
            bias = proj.bias
            q, k, v = (
                torch.nn.functional.linear(
                    hidden_states,
                    proj.weight[i * size : (i + 1) * size],
                    None if bias is None else bias[i * size : (i + 1) * size],
                )
                for i in range(3)
            )
        else:
            qkv, _ = proj(hidden_states)
            q, k, v = qkv.chunk(chunks=3, dim=-1)
        output, _ = self_attn.out_proj(plan(self_attn.attn, q, k, v))
        return output

    def _mlp(self, layer, hidden_states: torch.Tensor) -> torch.Tensor:
        fc1 = layer.fc1
        if self.fuse_fc1_relu and not (fc1._forward_hooks or fc1._forward_pre_hooks):
            hidden_states = torch._addmm_activation(fc1.bias, hidden_states, fc1.weight.t())
        else:
            hidden_states, _ = fc1(hidden_states)
            hidden_states = layer.activation_fn(hidden_states)
        hidden_states, _ = layer.fc2(hidden_states)
        return hidden_states
