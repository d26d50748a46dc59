"""The dense scoring engine of SGLang's Llama-style decoders: Llama 2 / 3, Mistral, Qwen2 / Qwen2.5 (q/k/v
biases) and Qwen3 (q/k norms).

Each layer is RMSNorm → fused QKV → rotary embedding → attention → output projection, then RMSNorm →
fused gate/up → SiLU-and-multiply → down projection, with the residual carried by the norms. The walk
calls the layer's own modules (the norms' fused residual add, the rotary embedding's kernel, the
projections with whatever hooks MeZO's LoRA adds) and replaces only what ``ModelRunner.forward`` adds
for a scoring batch: the ForwardBatch, the attention backend (``DensePrefill``: torch's flash kernels,
grouped-query attention as it is) and the LogitsProcessor. The model's own forward also runs its
release's layer-boundary and tensor-parallel machinery; the engine takes one TP and PP rank only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sglang.overlay.dense import DenseEngine, DensePrefill

# The architectures the engine walks, by the SGLang module that defines them.
MODELS = {
    "LlamaForCausalLM": "sglang.srt.models.llama",
    "MistralForCausalLM": "sglang.srt.models.mistral",
    "Qwen2ForCausalLM": "sglang.srt.models.qwen2",
    "Qwen3ForCausalLM": "sglang.srt.models.qwen3",
}
_ATTENTION = ("qkv_proj", "o_proj", "rotary_emb", "attn")
_MLP = ("gate_up_proj", "down_proj", "act_fn")


def _takes(model: nn.Module) -> bool:
    """Whether ``model`` is one of MODELS, unquantized, on one TP rank, with the layer shape the walk
    reads (the classes above on every release from 0.5.13 have it)."""
    if MODELS.get(type(model).__name__) != type(model).__module__:
        return False
    if getattr(model, "quant_config", None) is not None:
        return False
    decoder = getattr(model, "model", None)
    if decoder is None or not all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm")):
        return False
    for i in range(decoder.start_layer, decoder.end_layer):
        layer = decoder.layers[i]
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(hasattr(attn, name) for name in _ATTENTION) or not all(hasattr(mlp, name) for name in _MLP):
            return False
        if type(mlp.act_fn).__name__ != "SiluAndMul" or getattr(attn.o_proj, "tp_size", 1) != 1:
            return False
    return True


class LlamaEngine(DenseEngine):
    """The decoder of one Llama-style model (MODELS) for scoring batches (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        decoder = model.model
        self.layers = [decoder.layers[i] for i in range(decoder.start_layer, decoder.end_layer)]
        super().__init__(model, decoder, [layer.self_attn.attn for layer in self.layers])

    @classmethod
    def attach(cls, model: nn.Module) -> Optional["LlamaEngine"]:
        """An engine for ``model`` when it is one of MODELS without quantization on one TP rank, else None."""
        return cls(model) if _takes(model) else None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: DensePrefill) -> torch.Tensor:
        hidden_states = self.decoder.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            if residual is None:
                residual = hidden_states
                hidden_states = layer.input_layernorm(hidden_states)
            else:
                hidden_states, residual = layer.input_layernorm(hidden_states, residual)
            hidden_states = self._attention(layer.self_attn, positions, hidden_states, plan)
            hidden_states, residual = layer.post_attention_layernorm(hidden_states, residual)
            mlp = layer.mlp
            gate_up, _ = mlp.gate_up_proj(hidden_states)
            hidden_states, _ = mlp.down_proj(mlp.act_fn(gate_up))
        hidden_states, _ = self.decoder.norm(hidden_states, residual)
        return hidden_states

    @staticmethod
    def _attention(self_attn, positions: torch.Tensor, hidden_states: torch.Tensor, plan: DensePrefill):
        qkv, _ = self_attn.qkv_proj(hidden_states)
        q, k, v = qkv.split([self_attn.q_size, self_attn.kv_size, self_attn.kv_size], dim=-1)
        q_norm = getattr(self_attn, "q_norm", None)
        if q_norm is not None:  # Qwen3: RMSNorm over each head's q and k, before the rotary embedding
            head_dim = self_attn.head_dim
            q = q_norm(q.reshape(-1, head_dim)).view(q.shape)
            k = self_attn.k_norm(k.reshape(-1, head_dim)).view(k.shape)
        q, k = self_attn.rotary_emb(positions, q, k)
        output, _ = self_attn.o_proj(plan(self_attn.attn, q, k, v))
        return output
