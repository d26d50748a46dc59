"""Tiny random checkpoints of every model family the runner serves, made by transformers' own classes.

Each is HF's random init with every parameter then moved by N(0, 0.05²) noise: biases and norm weights are
away from 0 and 1, so a bias or norm routed to the wrong place shows in the logits (HF's init leaves them
at 0 and 1, where a swap changes nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=128,
)
_LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)

# family -> (transformers config class, model class, config fields). Llama: grouped-query attention (4 query,
# 2 k/v heads), untied; llama3: its rope scaling, tied embeddings; qwen2: q/k/v biases; qwen3: q/k norms.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_COMMON, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_COMMON, head_dim=16)),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128, bos_token_id=2, eos_token_id=2),
    ),
}


def make_tiny(family: str, path: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random checkpoint of ``family`` (transformers ``save_pretrained``); its directory."""
    import transformers

    config_class, model_class, fields = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**fields, **overrides})
    model = getattr(transformers, model_class)(config).to(torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(path)
    return Path(path)


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
