"""The dense scoring engine of the native OPT (``sglang.srt.models.opt``), with its own fused paths,
measured on the H100 / H200 (benchmarks/NOTES.md):

- fc1 + ReLU as one cuBLASLt GEMM with a bias+ReLU epilogue (every OPT
  checkpoint uses ReLU): one pass less over the widest activation;
- the QKV projection as one ``[3h, h]`` GEMM (round 2 split it into three
  ``[h, h]`` GEMMs from hidden size 2048 on, +2.2% per 1.3b prefill on 0.5.17's
  stack; on 0.5.23's, torch 2.11 on the H100, the fused GEMM is the faster at
  1.3b: 0.0289 ms against 3 x 0.0151 at 784 rows, 0.1365 against 3 x 0.0535
  at 4096; benchmarks/gemm_small_m.py, NOTES "sixth session");
- the residual adds fused into the LayerNorms (``AddLayerNorm``, as the model).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sglang.overlay.dense import DenseEngine, DensePrefill


class OPTEngine(DenseEngine):
    """The decoder of one native ``OPTForCausalLM`` for scoring batches."""

    def __init__(self, model: nn.Module) -> None:
        decoder = model.model.decoder
        layers = [decoder.layers[i] for i in range(decoder.start_layer, decoder.end_layer)]
        super().__init__(model, decoder, [layer.self_attn.attn for layer in layers])
        self.fuse_fc1_relu = model.config.enable_bias and all(
            isinstance(layer.activation_fn, nn.ReLU) for layer in layers
        )

    @classmethod
    def attach(cls, model: nn.Module) -> Optional["OPTEngine"]:
        """An engine for ``model`` when it is the native OPT without quantization, else None."""
        if type(model).__module__ != "sglang.srt.models.opt" or type(model).__name__ != "OPTForCausalLM":
            return None
        if getattr(model, "quant_config", None) is not None:
            return None
        return cls(model)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: DensePrefill) -> torch.Tensor:
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
        qkv, _ = self_attn.qkv_proj(hidden_states)
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
