"""Shared pieces of the GPU tests and benchmarks: model shapes (OPT's and other families'), random
checkpoints, runners.

Runners come from the overlay's public in-process API (``sglang.overlay``). Nothing here
imports torch or sglang at module level, so CPU collection of tests/gpu never depends on them.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any, Dict

# Published OPT shapes (facebook/opt-*) with the real vocab; random weights, HF init (std 0.02).
SHAPES: Dict[str, Dict[str, Any]] = {
    "opt-125m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        ffn_dim=3072,
        word_embed_proj_dim=768,
        do_layer_norm_before=True,
    ),
    "opt-350m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        ffn_dim=4096,
        word_embed_proj_dim=512,
        do_layer_norm_before=False,
    ),
    "opt-1.3b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        ffn_dim=8192,
        word_embed_proj_dim=2048,
        do_layer_norm_before=True,
    ),
    "opt-6.7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        ffn_dim=16384,
        word_embed_proj_dim=4096,
        do_layer_norm_before=True,
    ),
    "opt-13b": dict(
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        ffn_dim=20480,
        word_embed_proj_dim=5120,
        do_layer_norm_before=True,
    ),
    "opt-30b": dict(
        hidden_size=7168,
        num_hidden_layers=48,
        num_attention_heads=56,
        ffn_dim=28672,
        word_embed_proj_dim=7168,
        do_layer_norm_before=True,
    ),
    "opt-66b": dict(
        hidden_size=9216,
        num_hidden_layers=64,
        num_attention_heads=72,
        ffn_dim=36864,
        word_embed_proj_dim=9216,
        do_layer_norm_before=True,
    ),
}
_LLAMA3_ROPE = dict(
    rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
# Published shapes of the other families (random weights, HF init): name -> (config class, fields).
FAMILY_SHAPES: Dict[str, tuple[str, Dict[str, Any]]] = {
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_theta=500000.0,
            rope_scaling=_LLAMA3_ROPE,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        ),
    ),
    "llama-3-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        ),
    ),
    "qwen2.5-7b": (
        "Qwen2Config",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
        ),
    ),
}
_SMALL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=4096,
)
# The GPU parity test's family shapes (tests/gpu/test_families_gpu.py): family -> (config class, fields).
SMALL_FAMILY_SHAPES: Dict[str, tuple[str, Dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_SMALL)),
    "llama3": (
        "LlamaConfig",
        dict(_SMALL, rope_scaling=dict(_LLAMA3_ROPE, original_max_position_embeddings=1024), tie_word_embeddings=True),
    ),
    "qwen2": ("Qwen2Config", dict(_SMALL)),
    "qwen3": ("Qwen3Config", dict(_SMALL, head_dim=64)),
    "mistral": ("MistralConfig", dict(_SMALL)),
    "gemma": ("GemmaConfig", dict(_SMALL, head_dim=64)),
    "gpt2": (
        "GPT2Config",
        dict(n_embd=1024, n_layer=8, n_head=16, vocab_size=32000, n_positions=4096, bos_token_id=2, eos_token_id=2),
    ),
}
SMALL_FAMILIES = tuple(SMALL_FAMILY_SHAPES)
# The parity test's token set: 7 sequences of mixed lengths, 2048 tokens, in one EXTEND batch.
PARITY_LENGTHS = [512, 300, 128, 37, 5, 1000, 66]
COMMON = dict(vocab_size=50272, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2)
MODEL_ROOT = Path(os.environ.get("OPT_GPU_MODELS", "/tmp/opt-gpu-models"))


def hf_config(name: str):
    """The HF config of shape ``name`` (an OPT shape, or one of FAMILY_SHAPES)."""
    import transformers

    if name in FAMILY_SHAPES:
        config_class, fields = FAMILY_SHAPES[name]
        return getattr(transformers, config_class)(**fields)
    return transformers.OPTConfig(**COMMON, **SHAPES[name])


def checkpoint(name: str, seed: int = 0) -> Path:
    """A random model of shape ``name`` saved (fp16 safetensors) with save_pretrained; cached on disk."""
    import torch
    from transformers import AutoModelForCausalLM

    path = MODEL_ROOT / name
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config(name))  # HF init in fp32
        with torch.no_grad():  # biases and norms away from 0 and 1, so that their routing shows
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.02)
    model.to(torch.float16).save_pretrained(path)
    del model
    free_cuda()
    return path


def family_checkpoint(family: str, seed: int = 0) -> Path:
    """A random model of SMALL_FAMILY_SHAPES[family] (HF init, then every parameter moved by N(0, 0.02²): biases
    and norms away from 0 and 1), saved in fp32 with save_pretrained; cached on disk."""
    import torch
    import transformers

    path = MODEL_ROOT / f"family-{family}"
    if (path / "config.json").is_file():
        return path
    config_class, fields = SMALL_FAMILY_SHAPES[family]
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**fields))
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(path)
    del model
    free_cuda()
    return path


def config_only(name: str) -> Path:
    """A folder with only the config.json of shape ``name``: for shapes too large to save here (the
    device's disk is 64 GiB), loaded with ``load_format="dummy"`` (SGLang) or ``hf_from_config``."""
    path = MODEL_ROOT / f"{name}-config"
    if not (path / "config.json").is_file():
        config = hf_config(name)
        if not getattr(config, "architectures", None):
            from transformers import AutoModelForCausalLM

            config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
        config.save_pretrained(path)
    return path


def hf_from_config(path, dtype: str):
    """An HF model with random weights (HF init) built on the GPU in ``dtype`` from ``path``'s config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
    return model.eval()


def token_sets(count: int, vocab: int = 50000):
    """``count`` sets of PARITY_LENGTHS random sequences (seeds 1234, 1235, ...), each starting with token 2,
    the others in [3, vocab)."""
    import torch

    sets = []
    for i in range(count):
        g = torch.Generator().manual_seed(1234 + i)
        sets.append([[2] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in PARITY_LENGTHS])
    return sets


def free_cuda() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def runner(
    path,
    dtype: str,
    *,
    distributed: str = "fresh",
    max_total_tokens: int = 8192,
    mem_fraction_static: float = 0.5,
    prefill_graphs: "int | None" = 0,
    cuda_graphs: bool = False,
    cuda_graph_batch_sizes=None,
    graph_bucket: int = 8,
    dense_engine: bool = True,
    **server_args: Any,
):
    """A StandaloneRunner on the GPU (triton attention; decode CUDA graphs off unless ``cuda_graphs``,
    the engine's prefill graphs off unless ``prefill_graphs``; ``dense_engine=False``: every forward
    through ModelRunner.forward)."""
    from sglang.overlay import RunnerConfig, StandaloneRunner

    return StandaloneRunner(
        RunnerConfig(
            model_path=str(path),
            device="cuda",
            dtype=dtype,
            attention_backend="triton",
            max_total_tokens=max_total_tokens,
            mem_fraction_static=mem_fraction_static,
            distributed=distributed,
            dense_engine=dense_engine,
            prefill_graphs=prefill_graphs,
            graph_bucket=graph_bucket,
            cuda_graphs=cuda_graphs,
            cuda_graph_batch_sizes=cuda_graph_batch_sizes,
            server_args=server_args,
        )
    )


def hf_model(path, dtype: str, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn)
    return model.cuda().eval()


def fp32_head(hidden, weight, vocab: int):
    """Logits in fp32 from final hidden states: the head arithmetic both sides of the parity test share,
    so the comparison sees the decoders' differences, not the rounding of logits to fp16/bf16."""
    return hidden.float() @ weight[:vocab].float().T


def hf_logits(model, seqs):
    """HF's fp32-head logits at every position of each sequence, ``[sum(len), vocab]`` on the CPU."""
    import torch

    out = []
    with torch.no_grad():
        for ids in seqs:
            hidden = model.base_model(input_ids=torch.tensor([ids], device="cuda"), use_cache=False)[0][0]
            head = model.get_output_embeddings().weight
            out.append(fp32_head(hidden, head, model.config.vocab_size).cpu())
    return torch.cat(out)


def hf_logits_per_set(path, dtype: str, sets, attn: str = "sdpa"):
    """``hf_logits`` of each token set in ``sets``, from one HF model loaded for them and freed after."""
    model = hf_model(path, dtype, attn)
    try:
        return [hf_logits(model, seqs) for seqs in sets]
    finally:
        del model
        free_cuda()


def sgl_logits(standalone_runner, seqs):
    """SGLang's fp32-head logits at every position of one EXTEND of all ``seqs``, ``[sum(len), vocab]``
    on the CPU, from the scoring path users get (``score``: the dense engine where it takes the batch),
    and the LogitsProcessor's own last-position logits ``[len(seqs), vocab]`` (fp32) of the same batch
    through ModelRunner.forward (the model file with the configured attention backend)."""
    from sglang.overlay.forward import prefill, score

    vocab = standalone_runner.vocab_size
    scored = score(standalone_runner.runner, seqs, engine=standalone_runner.engine)
    hidden = scored.every_hidden_state()
    logits = fp32_head(hidden, scored.lm_head.weight, vocab).cpu()
    last = prefill(standalone_runner.runner, seqs).next_token_logits[:, :vocab].float().cpu()
    return logits, last
