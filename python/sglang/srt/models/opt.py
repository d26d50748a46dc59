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
from collections.abc import Callable, Iterable
from typing import Optional, Union

import torch
from torch import nn
from transformers import OPTConfig

from sglang.srt.layers.activation import NewGELU, QuickGELU, ReLU2
from sglang.srt.layers.add_layernorm import AddLayerNorm
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
    def forward(
        self,
        hidden_states: torch.Tensor,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.chunk(chunks=3, dim=-1)
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
        self.self_attn_layer_norm = AddLayerNorm(
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
        self.final_layer_norm = AddLayerNorm(
            self.embed_dim, elementwise_affine=config.layer_norm_elementwise_affine
        )
    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: Optional[torch.Tensor],
        forward_batch: ForwardBatch,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The layer's output is ``hidden_states + residual`` (pre-LN: each
        residual add is left to the LayerNorm that follows it) or
        ``hidden_states`` when the returned residual is None (post-LN)."""
        if not self.do_layer_norm_before:
            return self._forward_post_norm(hidden_states, forward_batch)
        if residual is None:
            residual = hidden_states
            hidden_states = self.self_attn_layer_norm(hidden_states)
        else:
            hidden_states, residual = self.self_attn_layer_norm(hidden_states, residual)
        hidden_states = self.self_attn(
            hidden_states=hidden_states, forward_batch=forward_batch
        )
        hidden_states, residual = self.final_layer_norm(hidden_states, residual)
        hidden_states, _ = self.fc1(hidden_states)
        hidden_states = self.activation_fn(hidden_states)
        hidden_states, _ = self.fc2(hidden_states)
        return hidden_states, residual

    def _forward_post_norm(
        self,
        hidden_states: torch.Tensor,
        forward_batch: ForwardBatch,
    ) -> tuple[torch.Tensor, None]:
        # 350m: each LayerNorm normalizes the sum of the residual add.
        residual = hidden_states
        hidden_states = self.self_attn(
            hidden_states=hidden_states, forward_batch=forward_batch
        )
        hidden_states, _ = self.self_attn_layer_norm(
            hidden_states, residual, want_sum=False
        )
        residual = hidden_states
        hidden_states, _ = self.fc1(hidden_states)
        hidden_states = self.activation_fn(hidden_states)
        hidden_states, _ = self.fc2(hidden_states)
        hidden_states, _ = self.final_layer_norm(
            hidden_states, residual, want_sum=False
        )
        return hidden_states, None


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
            self.final_layer_norm = AddLayerNorm(
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

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
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
                hidden_states, residual, forward_batch
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

    def post_load_weights(self) -> None:
        """Called by SGLang's loaders once every weight is initialized, also by
        those that never call ``load_weights`` (``load_format="dummy"``, sharded
        state, remote instances): later ``load_weights`` calls are updates."""
        self._checkpoint_loaded = True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF OPT tensors, named ``decoder.*`` or ``model.decoder.*``.

        ``lm_head.weight`` is ignored when the head is tied to the embeddings,
        as transformers does. A tensor that no parameter takes, one loaded
        twice, or one whose shape differs from the config's raises ValueError
        naming it. Layers of other pipeline ranks are skipped. The first call
        before the weights are initialized (see ``post_load_weights``) loads
        the checkpoint, so it also raises ValueError naming every parameter of
        this rank it left unloaded, except those a quantization method creates
        and marks ``_skip_weight_check`` (fp8 KV-cache scales); later calls
        (weight updates, e.g. ``update_weights_from_tensor``) may load any
        subset. Returns the names loaded.
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
        """The checkpoint tensors that load ``params_dict``, fused ones by shard
        (parameters marked ``_skip_weight_check`` need none)."""
        names = set()
        for param_name, param in params_dict.items():
            if getattr(param, "_skip_weight_check", False):
                continue  # made by a quantization method, not read from checkpoints
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

    def load_kv_cache_scales(self, quantization_param_path: str) -> None:
        self.model.load_kv_cache_scales(quantization_param_path)


EntryClass = OPTForCausalLM
