"""Shared pieces of the GPU tests and benchmarks: OPT shapes, random checkpoints, runners.

Nothing here imports sglang at module level; torch is imported lazily too so that CPU
collection of tests/gpu never depends on it.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any, Dict

# Published OPT shapes (facebook/opt-*) with the real vocab; random weights, HF init (std 0.02).
SHAPES: Dict[str, Dict[str, Any]] = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                     word_embed_proj_dim=768, do_layer_norm_before=True),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     word_embed_proj_dim=2048, do_layer_norm_before=True),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                     word_embed_proj_dim=4096, do_layer_norm_before=True),
}
COMMON = dict(vocab_size=50272, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2)
MODEL_ROOT = Path(os.environ.get("OPT_GPU_MODELS", "/tmp/opt-gpu-models"))


def checkpoint(name: str, seed: int = 0) -> Path:
    """A random OPT of shape ``name`` saved (fp16 safetensors) with save_pretrained; cached on disk."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    path = MODEL_ROOT / name
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    config = OPTConfig(**COMMON, **SHAPES[name])
    with torch.device("cuda"):
        model = OPTForCausalLM(config)  # HF init (normal, std=config.init_std) in fp32, then cast
    model.to(torch.float16).save_pretrained(path)
    del model
    free_cuda()
    return path


def free_cuda() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def gpu_overrides(dtype: str, **extra: Any) -> Dict[str, Any]:
    """ServerArgs overrides for tests.support.runtime.build_runner on the GPU."""
    kw = dict(device="cuda", attention_backend="triton", dtype=dtype, disable_cuda_graph=True,
              max_total_tokens=8192, max_running_requests=64, mem_fraction_static=0.5)
    kw.update(extra)
    return kw


def destroy_distributed_if_any() -> None:
    from sglang.srt.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.destroy_distributed_environment()


def hf_hidden(model, ids):
    """HF OPT's final hidden states (what its lm_head sees) for one sequence, [len, hidden]."""
    import torch

    with torch.no_grad():
        out = model.model.decoder(input_ids=torch.tensor([ids], device="cuda"), use_cache=False)
    return out[0][0]


def head(hidden, weight, vocab_size: int):
    """Logits in fp32 from final hidden states, as tests.support.logits.prefill applies the head."""
    return hidden.float() @ weight[:vocab_size].float().T
