"""Real SGLang on CPU for the tests: tiny random OPT checkpoints and ModelRunners.

Runners are built through the overlay's public in-process API,
``sglang.overlay``, which knows each supported release's API era. These
helpers add the tests' CPU defaults and the raw ModelRunner access the tests need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

TINY_OPT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=128,
    vocab_size=512,
    max_position_embeddings=128,
    word_embed_proj_dim=64,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)


def free_port() -> int:
    from sglang.overlay.compat import free_port as _free_port

    return _free_port()


def make_tiny_opt(path: Path, seed: int = 0, perturb: bool = False, **overrides: Any) -> Path:
    """Save a random OPTForCausalLM (HF ``save_pretrained``) and return its directory.

    ``perturb``: every parameter away from HF's initial value, where HF's init is a constant (biases 0,
    LayerNorm weights 1 and biases 0), so that a loader or a forward that swaps, drops or misplaces
    one of them gives other logits."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**{**TINY_OPT, **overrides})).to(torch.float32)
    if perturb:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.1)
                elif "layer_norm" in name:  # LayerNorm weights
                    param.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return Path(path)


def is_runtime_context_era() -> bool:
    try:
        from sglang.srt.distributed import bootstrap
    except ImportError:  # up to 0.5.15: ModelRunner initializes distributed itself
        return False
    return hasattr(bootstrap, "init_parallel_runtime")


def server_args(model_path: Path, **overrides: Any):
    """CPU fp32 ServerArgs for ``model_path``; ``overrides`` are further ServerArgs fields."""
    from sglang.overlay.config import RunnerConfig, make_server_args

    return make_server_args(
        RunnerConfig(
            model_path=str(model_path),
            device="cpu",
            max_total_tokens=2048,
            max_running_requests=8,
            server_args=overrides,
        )
    )


def build_runner(model_path: Path, **overrides: Any):
    """A raw ModelRunner; distributed reuse follows SGLANG_ALLOW_REUSE_DISTRIBUTED as set by the caller."""
    from sglang.overlay.compat import build_model_runner

    return build_model_runner(server_args(model_path, **overrides))


def extend(runner, seqs: Sequence[Sequence[int]]):
    """Prefill ``seqs`` in one EXTEND forward (``.next_token_logits``, ``.batch``)."""
    from sglang.overlay.forward import prefill

    return prefill(runner, seqs)


def destroy_distributed() -> None:
    """Tear down SGLang's groups and torch.distributed (the upstream functions)."""
    from sglang.srt.distributed import parallel_state as ps

    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()


def wait_all(procs, timeout: float, label: str = "rank") -> list[str]:
    """The outputs of subprocesses started together (stdout piped, stderr folded into it); each must
    exit 0 within ``timeout`` seconds, else the test fails with its output's tail. None is left running."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"{label} {rank} failed (rc={proc.returncode}):\n{output[-6000:]}"
    return outputs
