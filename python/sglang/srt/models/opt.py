# Copyright 2023-2024 SGLang Team
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================

"""Inference-only OPT model compatible with HuggingFace weights.

Mirrors ``transformers.models.opt.modeling_opt`` module for module, so every
OPT checkpoint variant runs: pre-LN (125m, 1.3b, ...) and post-LN (350m)
decoder layers, ``project_in``/``project_out`` when ``word_embed_proj_dim``
differs from ``hidden_size``, tied or untied heads, ``enable_bias``,
``layer_norm_elementwise_affine`` and ``_remove_final_layer_norm``.
"""

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers import OPTConfig

from sglang.srt.layers.activation import NewGELU, QuickGELU, ReLU2
from sglang.srt.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglang.srt.layers.pooler import Pooler, PoolingType
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, PPProxyTensors
from sglang.srt.model_loader.weight_utils import (
    default_weight_loader,
    kv_cache_scales_loader,
)
from sglang.srt.models.opt_compat import get_parallel, make_pp_layers
from sglang.srt.utils import add_prefix

try:
    from sglang.srt.models.opt_kernels import add_layer_norm
except ImportError:  # no Triton: torch's add and LayerNorm
    add_layer_norm = None

# HF's ``ACT2FN`` names that OPT configs may use, each with the module that
# computes it: SGLang's activation layer where it has one, else torch's.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu2": ReLU2,
    "relu6": nn.ReLU6,
    "gelu": nn.GELU,
    "gelu_new": NewGELU,
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}

# Checkpoint shard name -> (fused parameter name, shard id).
_STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
}

_LAYER_NAME = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")


def get_activation(name: str) -> nn.Module:
    """The module for ``ACT2FN[name]``; raises ValueError for any other name."""
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"OPT activation_function {name!r} is not supported; "
            f"supported: {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]()


def canonical_weight_name(name: str) -> str:
    """The OPTForCausalLM name of a checkpoint tensor: OPTModel checkpoints
    (facebook/opt-*) name the decoder ``decoder.*``, OPTForCausalLM
    checkpoints ``model.decoder.*``."""
    return "model." + name if name.startswith("decoder.") else name


def stacked_param_name(name: str) -> tuple[str, Optional[str]]:
    """The parameter a checkpoint tensor loads into, and its shard id."""
    for shard_name, (param_name, shard_id) in _STACKED_PARAMS.items():
        if shard_name in name:
            return name.replace(shard_name, param_name), shard_id
    return name, None


class OPTLearnedPositionalEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        # OPT reserves the first two rows (its padding positions): position p
        # reads row p + 2.
        self.offset = 2
        super().__init__(num_embeddings + self.offset, embedding_dim)

    def forward(self, positions: torch.Tensor):
        return super().forward(positions + self.offset)


# KV pools whose set_kv_buffer takes the batch's out_cache_loc and unscaled
# K/V as the attention backends hand them over (no loc translation, no
# quantization): those DensePrefill writes to.
_PLAIN_MHA_POOLS = ("MHATokenToKVPool", "PageMajorMHATokenToKVPool")


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
        out_cache_loc: torch.Tensor,
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
        forward_batch: ForwardBatch,
        attention: Sequence[RadixAttention],
        dtype: torch.dtype,
        device: torch.device,
        kv_pool=None,
        write_kv: bool = True,
    ) -> Optional["DensePrefill"]:
        """The plan of ``forward_batch`` for the ``attention`` layers, or
        None. The KV pool is the forward's (SGLang's forward context) unless
        ``kv_pool`` is given."""
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return None
        if forward_batch.forward_mode.name != "EXTEND":
            return None
        lens = forward_batch.extend_seq_lens_cpu
        prefix = forward_batch.extend_prefix_lens_cpu
        if not lens or prefix is None or any(prefix) or 0 in lens:
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
        if kv_pool is None:
            try:
                from sglang.srt.model_executor.forward_context import (
                    get_token_to_kv_pool,
                )
            except ImportError:  # up to 0.5.12: the pool is not published per forward
                return None
            kv_pool = get_token_to_kv_pool()
        if (
            type(kv_pool).__name__ not in _PLAIN_MHA_POOLS
            or forward_batch.out_cache_loc is None
        ):
            return None
        if torch.cuda.is_current_stream_capturing():
            return None
        if not all(
            attn.k_scale is None and attn.head_dim % 8 == 0 and attn.head_dim <= 256
            for attn in attention
        ):
            return None
        plan = cls(tuple(lens), None, kv_pool, forward_batch.out_cache_loc, write_kv)
        if not plan.equal_lengths:
            # The cumulative lengths are read by the variable-length kernel only.
            plan.cu_seqlens = torch.nn.functional.pad(
                torch.cumsum(forward_batch.extend_seq_lens, 0, dtype=torch.int32),
                (1, 0),
            )
        return plan

    def __call__(
        self, attn: RadixAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
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


class OPTLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that can add the residual first, as SGLang's RMSNorm
    does: ``norm(x, residual)`` returns ``(norm(residual + x), residual + x)``,
    one Triton kernel on the GPU in half precision (opt_kernels), torch's
    add and LayerNorm elsewhere. ``want_sum=False`` skips writing the sum."""

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        want_sum: bool = True,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        if residual is None:
            return super().forward(x)
        if (
            add_layer_norm is not None
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
            and x.dim() == 2
            and x.is_contiguous()
            and residual.is_contiguous()
            and residual.dtype == x.dtype
        ):
            return add_layer_norm(
                x, residual, self.weight, self.bias, self.eps, want_sum
            )
        summed = residual + x
        return super().forward(summed), summed


class OPTAttention(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        layer_id: int = 0,
        bias: bool = True,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        tp_size = get_parallel().tp_size
        if num_heads % tp_size != 0:
            raise ValueError(
                f"OPT num_attention_heads={num_heads} is not divisible by "
                f"the tensor parallel size {tp_size}"
            )
        self.num_heads = num_heads // tp_size
        self.head_dim = embed_dim // num_heads
        self.q_size = self.num_heads * self.head_dim

        self.qkv_proj = QKVParallelLinear(
            embed_dim,
            self.head_dim,
            num_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=add_prefix("qkv_proj", prefix),
        )
        self.out_proj = RowParallelLinear(
            embed_dim,
            embed_dim,
            bias=bias,
            quant_config=quant_config,
            prefix=add_prefix("out_proj", prefix),
        )
        self.attn = RadixAttention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_heads,
            layer_id=layer_id,
            quant_config=quant_config,
            prefix=add_prefix("attn", prefix),
        )
        # From hidden size 2048 on, cuBLAS runs three [hidden, hidden] GEMMs
        # faster on the H100 than the fused [3 * hidden, hidden] one
        # (benchmarks/NOTES.md); the weight stays fused.
        self.split_qkv = quant_config is None and embed_dim >= 2048

    def _qkv(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (
            self.split_qkv
            and hidden_states.is_cuda
            and type(self.qkv_proj) is QKVParallelLinear
        ):
            weight, bias = self.qkv_proj.weight, self.qkv_proj.bias
            return tuple(
                torch.nn.functional.linear(
                    hidden_states,
                    weight[i * self.q_size : (i + 1) * self.q_size],
                    (
                        None
                        if bias is None
                        else bias[i * self.q_size : (i + 1) * self.q_size]
                    ),
                )
                for i in range(3)
            )
        qkv, _ = self.qkv_proj(hidden_states)
        return qkv.split([self.q_size] * 3, dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        forward_batch: ForwardBatch,
        prefill: Optional[DensePrefill] = None,
    ) -> torch.Tensor:
        q, k, v = self._qkv(hidden_states)
        if prefill is not None:
            attn_output = prefill(self.attn, q, k, v)
        else:
            attn_output = self.attn(q, k, v, forward_batch)
        output, _ = self.out_proj(attn_output)
        return output


class OPTDecoderLayer(nn.Module):
    def __init__(
        self,
        config: OPTConfig,
        layer_id: int = 0,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(
            embed_dim=self.embed_dim,
            num_heads=config.num_attention_heads,
            layer_id=layer_id,
            bias=config.enable_bias,
            quant_config=quant_config,
            prefix=add_prefix("self_attn", prefix),
        )
        self.self_attn_layer_norm = OPTLayerNorm(
            self.embed_dim, elementwise_affine=config.layer_norm_elementwise_affine
        )
        self.fc1 = ColumnParallelLinear(
            self.embed_dim,
            config.ffn_dim,
            bias=config.enable_bias,
            quant_config=quant_config,
            prefix=add_prefix("fc1", prefix),
        )
        self.activation_fn = get_activation(config.activation_function)
        self.fc2 = RowParallelLinear(
            config.ffn_dim,
            self.embed_dim,
            bias=config.enable_bias,
            quant_config=quant_config,
            prefix=add_prefix("fc2", prefix),
        )
        self.final_layer_norm = OPTLayerNorm(
            self.embed_dim, elementwise_affine=config.layer_norm_elementwise_affine
        )
        # fc1 + ReLU as one cuBLASLt GEMM with a bias+ReLU epilogue on the GPU
        # (every OPT checkpoint uses ReLU): saves a pass over the widest
        # activation, [tokens, ffn_dim].
        self.fuse_fc1_relu = (
            isinstance(self.activation_fn, nn.ReLU)
            and quant_config is None
            and config.enable_bias
        )

    def _fc1_act(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if (
            self.fuse_fc1_relu
            and hidden_states.is_cuda
            and type(self.fc1) is ColumnParallelLinear
        ):
            return torch._addmm_activation(
                self.fc1.bias, hidden_states, self.fc1.weight.t()
            )
        hidden_states, _ = self.fc1(hidden_states)
        return self.activation_fn(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: Optional[torch.Tensor],
        forward_batch: ForwardBatch,
        prefill: Optional[DensePrefill] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The layer's output is ``hidden_states + residual`` (pre-LN: each
        residual add is left to the LayerNorm that follows it) or
        ``hidden_states`` when the returned residual is None (post-LN)."""
        if not self.do_layer_norm_before:
            return self._forward_post_norm(hidden_states, forward_batch, prefill)
        if residual is None:
            residual = hidden_states
            hidden_states = self.self_attn_layer_norm(hidden_states)
        else:
            hidden_states, residual = self.self_attn_layer_norm(hidden_states, residual)
        hidden_states = self.self_attn(
            hidden_states=hidden_states, forward_batch=forward_batch, prefill=prefill
        )
        hidden_states, residual = self.final_layer_norm(hidden_states, residual)
        hidden_states = self._fc1_act(hidden_states)
        hidden_states, _ = self.fc2(hidden_states)
        return hidden_states, residual

    def _forward_post_norm(
        self,
        hidden_states: torch.Tensor,
        forward_batch: ForwardBatch,
        prefill: Optional[DensePrefill],
    ) -> tuple[torch.Tensor, None]:
        # 350m: each LayerNorm normalizes the sum of the residual add.
        residual = hidden_states
        hidden_states = self.self_attn(
            hidden_states=hidden_states, forward_batch=forward_batch, prefill=prefill
        )
        hidden_states, _ = self.self_attn_layer_norm(
            hidden_states, residual, want_sum=False
        )
        residual = hidden_states
        hidden_states = self._fc1_act(hidden_states)
        hidden_states, _ = self.fc2(hidden_states)
        hidden_states, _ = self.final_layer_norm(
            hidden_states, residual, want_sum=False
        )
        return hidden_states, None


class _ModuleTreeChanges:
    """How many submodule and Parameter assignments (``module.x = ...``) the
    process has made since the first PrefillGraphs was built, counted by
    torch's global registration hooks: the graphs walk their decoder's
    module tree again only after one, not on every call."""

    count = 0
    _watching = False

    @classmethod
    def watch(cls) -> None:
        if not cls._watching:
            nn.modules.module.register_module_module_registration_hook(cls._bump)
            nn.modules.module.register_module_parameter_registration_hook(cls._bump)
            cls._watching = True

    @classmethod
    def _bump(cls, module: nn.Module, name: str, value: object) -> None:
        cls.count += 1


@dataclass
class _PrefillGraph:
    """A captured decoder and the tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    plan: DensePrefill
    output: torch.Tensor


class PrefillGraphs:
    """CUDA graphs of the decoder for batches of whole prompts seen before.

    A batch that DensePrefill runs (whole prompts on the GPU in half
    precision, one TP and PP rank) runs eagerly the first time its sequence
    lengths are seen; the second time the decoder is captured for those
    lengths, and from then on replayed: one launch instead of about fifteen
    per layer, which is most of a small model's time (benchmarks/NOTES.md).
    Token ids, positions and KV slots are copied into the graph's inputs,
    the K/V go to the pool (unless the plan skips them: a graph of its own),
    and the output is copied out. Parameters are read where they are, so
    in-place weight updates (MeZO, load_weights) are seen; assigning a module
    or a Parameter (LoRA wrapping, set_embed) drops every graph: the decoder's
    module tree is compared after any such assignment in the process
    (_ModuleTreeChanges; assigning ``param.data`` is not detected). At most
    ``max_graphs`` are kept, least recently used first out; they share one
    memory pool. Off unless ``OPTForCausalLM.enable_prefill_graphs`` is called.
    """

    def __init__(self, max_graphs: int) -> None:
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[tuple[int, ...], bool], _PrefillGraph] = {}
        self.seen: dict[tuple[tuple[int, ...], bool], None] = {}
        self.pool = None
        self.stream: Optional[torch.cuda.Stream] = None
        self.fingerprint: Optional[tuple] = None
        self.changes_seen = -1
        _ModuleTreeChanges.watch()

    @staticmethod
    def _fingerprint(decoder: nn.Module) -> tuple:
        """Every module and Parameter object of the decoder (a flat walk:
        ``modules()`` costs several times more)."""
        ids, stack = [], [decoder]
        while stack:
            module = stack.pop()
            ids.append(id(module))
            ids.extend(map(id, module._parameters.values()))
            stack.extend(module._modules.values())
        return tuple(ids)

    def clear(self) -> None:
        """Drop every graph and their memory pool."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    def run(
        self,
        decoder: "OPTDecoder",
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        prefill: DensePrefill,
    ) -> Optional[torch.Tensor]:
        """The decoder's output from a graph, or None to run it eagerly."""
        if get_parallel().tp_size != 1:
            return None
        if _ModuleTreeChanges.count != self.changes_seen:
            self.changes_seen = _ModuleTreeChanges.count
            fingerprint = self._fingerprint(decoder)
            if fingerprint != self.fingerprint:
                self.clear()
                self.fingerprint = fingerprint
        key = (prefill.lens, prefill.write_kv)
        entry = self.graphs.pop(key, None)
        if entry is None:
            if key not in self.seen:
                self.seen[key] = None
                while len(self.seen) > 4 * self.max_graphs:
                    del self.seen[next(iter(self.seen))]
                return None
            while len(self.graphs) >= self.max_graphs:
                del self.graphs[next(iter(self.graphs))]
            if not self.graphs:
                # A pool whose graphs are all gone is not captured into again.
                self.pool = None
            entry = self._capture(decoder, input_ids, positions, forward_batch, prefill)
        self.graphs[key] = entry
        entry.input_ids.copy_(input_ids)
        entry.positions.copy_(positions)
        entry.plan.out_cache_loc.copy_(prefill.out_cache_loc)
        entry.graph.replay()
        return entry.output.clone()

    def _capture(
        self,
        decoder: "OPTDecoder",
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        prefill: DensePrefill,
    ) -> _PrefillGraph:
        static_ids, static_positions = input_ids.clone(), positions.clone()
        plan = DensePrefill(
            prefill.lens,
            None if prefill.cu_seqlens is None else prefill.cu_seqlens.clone(),
            prefill.pool,
            prefill.out_cache_loc.clone(),
            prefill.write_kv,
        )
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        # Warm up on the capture stream, so that per-stream library state
        # (cuBLAS / cuDNN workspaces) exists before the capture.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            decoder.run_layers(static_ids, static_positions, forward_batch, plan)
        torch.cuda.current_stream().wait_stream(self.stream)
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                output = decoder.run_layers(
                    static_ids, static_positions, forward_batch, plan
                )
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the OPT prefill CUDA graph for lengths {prefill.lens} "
                f"failed: {e}; run without prefill graphs (enable_prefill_graphs(0), "
                "RunnerConfig(prefill_graphs=0))"
            ) from e
        return _PrefillGraph(graph, static_ids, static_positions, plan, output)


class OPTDecoder(nn.Module):
    def __init__(
        self,
        config: OPTConfig,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ):
        super().__init__()
        self.pp_group = get_parallel().pp_group
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size,
            config.word_embed_proj_dim,
            prefix=add_prefix("embed_tokens", prefix),
        )
        # Positional embeddings are replicated (not sharded).
        self.embed_positions = OPTLearnedPositionalEmbedding(
            config.max_position_embeddings, config.hidden_size
        )

        # The projections exist when the word embeddings are narrower than
        # the hidden states (350m); they are replicated.
        if config.word_embed_proj_dim != config.hidden_size:
            self.project_in = ReplicatedLinear(
                config.word_embed_proj_dim,
                config.hidden_size,
                bias=False,
                quant_config=quant_config,
                prefix=add_prefix("project_in", prefix),
            )
            self.project_out = ReplicatedLinear(
                config.hidden_size,
                config.word_embed_proj_dim,
                bias=False,
                quant_config=quant_config,
                prefix=add_prefix("project_out", prefix),
            )
        else:
            self.project_in = None
            self.project_out = None

        # `_remove_final_layer_norm` only keeps checkpoints fine-tuned before
        # transformers v4.20.1 working (facebookresearch/metaseq#164).
        if config.do_layer_norm_before and not config._remove_final_layer_norm:
            self.final_layer_norm = OPTLayerNorm(
                config.hidden_size,
                elementwise_affine=config.layer_norm_elementwise_affine,
            )
        else:
            self.final_layer_norm = None

        self.layers, self.start_layer, self.end_layer = make_pp_layers(
            config.num_hidden_layers,
            lambda idx, prefix: OPTDecoderLayer(
                config=config, layer_id=idx, quant_config=quant_config, prefix=prefix
            ),
            prefix=add_prefix("layers", prefix),
        )

        # This rank's attention layers, for DensePrefill.plan on every forward.
        self.attention = [
            self.layers[i].self_attn.attn
            for i in range(self.start_layer, self.end_layer)
        ]
        self.prefill_graphs: Optional[PrefillGraphs] = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        pp_proxy_tensors: Optional[PPProxyTensors] = None,
        input_embeds: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, PPProxyTensors]:
        weight = self.embed_positions.weight
        prefill = DensePrefill.plan(
            forward_batch, self.attention, weight.dtype, weight.device
        )
        if (
            prefill is not None
            and input_embeds is None
            and self.pp_group.world_size == 1
        ):
            return self.run_dense(input_ids, positions, forward_batch, prefill)
        return self.run_layers(
            input_ids, positions, forward_batch, prefill, pp_proxy_tensors, input_embeds
        )

    def run_dense(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        prefill: DensePrefill,
    ) -> torch.Tensor:
        """The decoder of a batch that DensePrefill runs (one PP rank), from a
        prefill graph when one is kept for it."""
        if self.prefill_graphs is not None:
            hidden_states = self.prefill_graphs.run(
                self, input_ids, positions, forward_batch, prefill
            )
            if hidden_states is not None:
                return hidden_states
        return self.run_layers(input_ids, positions, forward_batch, prefill)

    def run_layers(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        prefill: Optional[DensePrefill],
        pp_proxy_tensors: Optional[PPProxyTensors] = None,
        input_embeds: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, PPProxyTensors]:
        if self.pp_group.is_first_rank:
            if input_embeds is None:
                input_embeds = self.embed_tokens(input_ids)
            if self.project_in is not None:
                input_embeds, _ = self.project_in(input_embeds)
            hidden_states = input_embeds + self.embed_positions(positions)
        else:
            hidden_states = pp_proxy_tensors["hidden_states"]

        residual = None
        for i in range(self.start_layer, self.end_layer):
            hidden_states, residual = self.layers[i](
                hidden_states, residual, forward_batch, prefill
            )
        if residual is not None and (
            self.final_layer_norm is None or not self.pp_group.is_last_rank
        ):
            hidden_states, residual = hidden_states + residual, None
        if not self.pp_group.is_last_rank:
            return PPProxyTensors({"hidden_states": hidden_states})
        if self.final_layer_norm is not None:
            if residual is None:
                hidden_states = self.final_layer_norm(hidden_states)
            else:
                hidden_states, _ = self.final_layer_norm(
                    hidden_states, residual, want_sum=False
                )
        if self.project_out is not None:
            hidden_states, _ = self.project_out(hidden_states)
        return hidden_states


class OPTModel(nn.Module):
    def __init__(
        self,
        config: OPTConfig,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.config = config
        self.decoder = OPTDecoder(
            config=config,
            quant_config=quant_config,
            prefix=add_prefix("decoder", prefix),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        pp_proxy_tensors: Optional[PPProxyTensors] = None,
        input_embeds: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, PPProxyTensors]:
        return self.decoder(
            input_ids,
            positions,
            forward_batch,
            pp_proxy_tensors=pp_proxy_tensors,
            input_embeds=input_embeds,
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def load_kv_cache_scales(self, quantization_param_path: str) -> None:
        parallel = get_parallel()
        for layer_idx, scaling_factor in kv_cache_scales_loader(
            quantization_param_path,
            parallel.tp_rank,
            parallel.tp_size,
            self.config.num_hidden_layers,
            self.config.__class__.model_type,
        ):
            if not self.decoder.start_layer <= layer_idx < self.decoder.end_layer:
                continue
            attn = self.decoder.layers[layer_idx].self_attn.attn
            attn.k_scale = scaling_factor
            attn.v_scale = scaling_factor


class OPTForCausalLM(nn.Module):
    # BitsAndBytes: row-parallel weights are partitioned along dim -1.
    column_parallel_weights_modules = [".out_proj.", ".fc2."]
    bitsandbytes_stacked_params_mapping = {
        # shard_name, weight_name, index
        ".q_proj": (".qkv_proj", 0),
        ".k_proj": (".qkv_proj", 1),
        ".v_proj": (".qkv_proj", 2),
    }

    def __init__(
        self,
        config: OPTConfig,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ):
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.pp_group = get_parallel().pp_group
        self.model = OPTModel(
            config=config, quant_config=quant_config, prefix=add_prefix("model", prefix)
        )
        if config.tie_word_embeddings:
            self.lm_head = self.model.decoder.embed_tokens
        else:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.word_embed_proj_dim,
                prefix=add_prefix("lm_head", prefix),
            )
        self.logits_processor = LogitsProcessor(config)
        self.pooler = Pooler(pooling_type=PoolingType.LAST, normalize=True)
        self._checkpoint_loaded = False

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        pp_proxy_tensors: Optional[PPProxyTensors] = None,
        input_embeds: Optional[torch.Tensor] = None,
        get_embedding: bool = False,
    ) -> Union[LogitsProcessorOutput, PPProxyTensors]:
        hidden_states = self.model(
            input_ids,
            positions,
            forward_batch,
            pp_proxy_tensors=pp_proxy_tensors,
            input_embeds=input_embeds,
        )
        if not self.pp_group.is_last_rank:
            return hidden_states
        if get_embedding:
            return self.pooler(hidden_states, forward_batch)
        return self.logits_processor(
            input_ids, hidden_states, self.lm_head, forward_batch
        )

    @torch.no_grad()
    def forward_dense(
        self, forward_batch: ForwardBatch, kv_pool, *, write_kv: bool = True
    ) -> Optional[torch.Tensor]:
        """The final hidden states of every token of a batch of whole prompts,
        ``[tokens, hidden]``, without the attention backend: DensePrefill on
        ``kv_pool`` (the runner's ``token_to_kv_pool``), from a prefill graph
        when enabled; the caller applies the head. The K/V go to the pool only
        when ``write_kv`` (False for forwards no decode follows: scoring,
        MeZO's losses). None when the batch needs the attention backend (CPU,
        fp32, prefixes, pipeline parallelism, KV scales, ...): run it through
        ModelRunner.forward then."""
        if self.pp_group.world_size != 1:
            return None
        decoder = self.model.decoder
        weight = decoder.embed_positions.weight
        prefill = DensePrefill.plan(
            forward_batch,
            decoder.attention,
            weight.dtype,
            weight.device,
            kv_pool,
            write_kv,
        )
        if prefill is None:
            return None
        return decoder.run_dense(
            forward_batch.input_ids, forward_batch.positions, forward_batch, prefill
        )

    def enable_prefill_graphs(self, max_graphs: int) -> None:
        """Replay CUDA graphs of the decoder for batches of whole prompts whose
        lengths were seen before, keeping at most ``max_graphs`` of them
        (PrefillGraphs); 0 turns them off and frees them."""
        if max_graphs < 0:
            raise ValueError(f"max_graphs must be >= 0, got {max_graphs}")
        self.model.decoder.prefill_graphs = (
            PrefillGraphs(max_graphs) if max_graphs else None
        )

    @property
    def start_layer(self) -> int:
        return self.model.decoder.start_layer

    @property
    def end_layer(self) -> int:
        return self.model.decoder.end_layer

    def _checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor an unquantized HF OPT checkpoint may hold,
        by its OPTForCausalLM name (layer tensors without their layer index)."""
        c = self.config
        hidden, ffn, embed = c.hidden_size, c.ffn_dim, c.word_embed_proj_dim
        norm = {"weight": (hidden,), "bias": (hidden,)}
        layer = {
            **{f"self_attn.{p}_proj.weight": (hidden, hidden) for p in "qkv"},
            **{f"self_attn.{p}_proj.bias": (hidden,) for p in "qkv"},
            "self_attn.out_proj.weight": (hidden, hidden),
            "self_attn.out_proj.bias": (hidden,),
            "fc1.weight": (ffn, hidden),
            "fc1.bias": (ffn,),
            "fc2.weight": (hidden, ffn),
            "fc2.bias": (hidden,),
            **{f"self_attn_layer_norm.{k}": s for k, s in norm.items()},
            **{f"final_layer_norm.{k}": s for k, s in norm.items()},
        }
        return {
            "model.decoder.embed_tokens.weight": (c.vocab_size, embed),
            "model.decoder.embed_positions.weight": (
                c.max_position_embeddings + 2,
                hidden,
            ),
            "model.decoder.project_in.weight": (hidden, embed),
            "model.decoder.project_out.weight": (embed, hidden),
            **{f"model.decoder.final_layer_norm.{k}": s for k, s in norm.items()},
            "lm_head.weight": (c.vocab_size, embed),
            **{f"model.decoder.layers.*.{k}": s for k, s in layer.items()},
        }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF OPT tensors, named ``decoder.*`` or ``model.decoder.*``.

        ``lm_head.weight`` is ignored when the head is tied to the embeddings,
        as transformers does. A tensor that no parameter takes, one loaded
        twice, or one whose shape differs from the config's raises ValueError
        naming it. The first call loads the checkpoint, so it also raises
        ValueError naming every parameter it left unloaded; later calls
        (weight updates) may load any subset. Returns the names loaded.
        """
        params_dict = dict(self.named_parameters())
        shapes = self._checkpoint_shapes()
        loaded: set[str] = set()
        for name, loaded_weight in weights:
            name = canonical_weight_name(name)
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            layer = _LAYER_NAME.match(name)
            if layer is not None:
                layer_id = int(layer.group(1))
                if (
                    layer_id < self.config.num_hidden_layers
                    and not self.start_layer <= layer_id < self.end_layer
                ):
                    continue
                shape_key = f"model.decoder.layers.*.{layer.group(2)}"
            else:
                shape_key = name
            expected = shapes.get(shape_key)
            if expected is not None and tuple(loaded_weight.shape) != expected:
                raise ValueError(
                    f"OPT checkpoint tensor {name!r} has shape "
                    f"{tuple(loaded_weight.shape)}, but the config gives {expected}"
                )
            param_name, shard_id = stacked_param_name(name)
            if param_name not in params_dict:
                raise ValueError(
                    f"Unexpected OPT checkpoint tensor {name!r}: "
                    f"OPTForCausalLM has no parameter {param_name!r} for it"
                )
            if name in loaded:
                raise ValueError(f"OPT checkpoint tensor {name!r} is loaded twice")
            param = params_dict[param_name]
            if shard_id is None:
                getattr(param, "weight_loader", default_weight_loader)(
                    param, loaded_weight
                )
            else:
                param.weight_loader(param, loaded_weight, shard_id)
            loaded.add(name)

        if not self._checkpoint_loaded:
            missing = sorted(self._checkpoint_names(params_dict) - loaded)
            if missing:
                raise ValueError(
                    f"OPT checkpoint lacks {len(missing)} tensor(s): {missing}"
                )
            self._checkpoint_loaded = True
        return loaded

    @staticmethod
    def _checkpoint_names(params_dict: dict[str, nn.Parameter]) -> set[str]:
        """The checkpoint tensors that load ``params_dict``, fused ones by shard."""
        names = set()
        for param_name in params_dict:
            shards = [
                param_name.replace(fused, shard)
                for shard, (fused, _) in _STACKED_PARAMS.items()
                if fused in param_name
            ]
            names.update(shards or [param_name])
        return names

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def get_num_params(self) -> int:
        return len(dict(self.named_parameters()))

    def get_weights_by_name(
        self, name: str, truncate_size: int = 100, tp_size: int = 1
    ) -> list:
        """The first ``truncate_size`` rows of a checkpoint tensor, by its HF
        name, as this rank holds it (row-parallel weights are gathered).

        Only for tests; unoptimized.
        """
        name = canonical_weight_name(name)
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.decoder.embed_tokens.weight"
        param_name, shard_id = stacked_param_name(name)
        weight = dict(self.named_parameters())[param_name].data
        if shard_id is not None:
            size = weight.shape[0] // len(_STACKED_PARAMS)
            weight = weight.narrow(0, "qkv".index(shard_id) * size, size)
        row_parallel = any(m in name for m in self.column_parallel_weights_modules)
        if tp_size > 1 and row_parallel and name.endswith(".weight"):
            weight = get_parallel().tp_group.all_gather(weight, dim=1)
        return weight.cpu().to(torch.float32).numpy().tolist()[:truncate_size]

    def get_embed_and_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_embed(), self.lm_head.weight

    def set_embed_and_head(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        self.set_embed(embed)
        if self.lm_head is not self.model.decoder.embed_tokens:
            del self.lm_head.weight
            self.lm_head.weight = head

    def get_embed(self) -> torch.Tensor:
        return self.model.decoder.embed_tokens.weight

    def set_embed(self, embed: torch.Tensor) -> None:
        decoder = self.model.decoder
        del decoder.embed_tokens.weight
        decoder.embed_tokens.weight = embed
        if decoder.prefill_graphs is not None:  # a plain tensor is not a registration
            decoder.prefill_graphs.clear()

    def load_kv_cache_scales(self, quantization_param_path: str) -> None:
        self.model.load_kv_cache_scales(quantization_param_path)


EntryClass = OPTForCausalLM
