"""Real SGLang on CPU for the tests: tiny random OPT checkpoints and ModelRunners.

Covers both API eras of the supported releases:
- "bootstrap" (0.5.17-0.5.19): the ModelRunner takes a ``ParallelState`` and
  initializes torch.distributed itself (``bootstrap.init_torch_distributed``).
- "runtime-context" (0.5.21+): ServerArgs are published into
  ``sglang.srt.runtime_context`` and the caller runs
  ``bootstrap.init_parallel_runtime`` before building the ModelRunner.
"""

from __future__ import annotations

import socket
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_opt(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random OPTForCausalLM (HF ``save_pretrained``) and return its directory."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(**{**TINY_OPT, **overrides})
    model = OPTForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    return Path(path)


def is_runtime_context_era() -> bool:
    from sglang.srt.distributed import bootstrap

    return hasattr(bootstrap, "init_parallel_runtime")


def server_args(model_path: Path, **overrides: Any):
    from sglang.srt.server_args import ServerArgs

    kwargs = dict(
        model_path=str(model_path),
        device="cpu",
        attention_backend="torch_native",
        sampling_backend="pytorch",
        skip_tokenizer_init=True,
        dtype="float32",
        disable_cuda_graph=True,
        max_total_tokens=2048,
        max_running_requests=8,
        mem_fraction_static=0.05,
        disable_radix_cache=True,
        random_seed=0,
    )
    kwargs.update(overrides)
    return ServerArgs(**kwargs)


def build_runner(model_path: Path, *, init_parallel: bool = True, **overrides: Any):
    """Build a ModelRunner the way ``sglang.benchmark.one_batch.load_model`` does.

    ``init_parallel`` only matters on the runtime-context era, where the caller
    (not the ModelRunner) initializes the parallel runtime.
    """
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import ModelRunner

    sa = server_args(model_path, **overrides)
    port = free_port()
    if is_runtime_context_era():
        from sglang.benchmark.one_batch import _init_process_global_configs
        from sglang.srt.arg_groups.overrides import resolving_view
        from sglang.srt.distributed import bootstrap
        from sglang.srt.runtime_context import SpawnRanks, get_device, publish, spawn_world_rank

        sa.resolve_once()
        publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=spawn_world_rank(sa, tp_rank=0, pp_rank=0), gpu_id=0))
        _init_process_global_configs()
        mc = ModelConfig.from_server_args(sa)
        if init_parallel:
            bootstrap.init_parallel_runtime(server_args=sa, device=get_device().device, dist_port=port)
        bootstrap.init_layer_runtime(model_config=mc)
        runner = ModelRunner(
            model_config=mc,
            mem_fraction_static=resolving_view(sa).mem_fraction_static,
            gpu_id=0,
            nccl_port=port,
            server_args=sa,
        )
    else:
        from sglang.srt.distributed.parallel_state_wrapper import ParallelState
        from sglang.srt.layers.dp_attention import compute_dp_attention_world_info

        mc = ModelConfig.from_server_args(sa)
        attn_tp_rank, attn_tp_size, attn_dp_rank, attn_dp_size = compute_dp_attention_world_info(
            sa.enable_dp_attention, 0, sa.tp_size, sa.dp_size, sa.attn_cp_size
        )
        ps = ParallelState(
            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=None, dp_size=1,
            attn_tp_rank=attn_tp_rank, attn_tp_size=attn_tp_size, attn_cp_rank=0, attn_cp_size=1,
            attn_dp_rank=attn_dp_rank, attn_dp_size=attn_dp_size, moe_ep_rank=0, moe_ep_size=1,
            moe_dp_rank=None, moe_dp_size=1, dcp_size=1, gpu_id=0,
        )
        runner = ModelRunner(
            model_config=mc,
            mem_fraction_static=sa.mem_fraction_static,
            gpu_id=0,
            ps=ps,
            nccl_port=port,
            server_args=sa,
        )
    runner.alloc_memory_pool()
    runner.init_attention_backends()
    runner.init_cuda_graphs()
    return runner


def destroy_distributed() -> None:
    """Tear down SGLang's groups and torch.distributed (the upstream functions)."""
    from sglang.srt.distributed import parallel_state as ps

    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()


@dataclass
class Extended:
    """A prefilled batch: its next-token logits and what a decode step needs."""

    next_token_logits: torch.Tensor
    batch: Any
    forward_batch: Any


def _page_size(runner) -> int:
    if is_runtime_context_era():
        from sglang.srt.runtime_context import get_schedule

        return get_schedule().page_size
    return runner.server_args.page_size


def _forward(runner, batch, capture_hidden_mode: Optional[Any] = None):
    from sglang.benchmark.one_batch import _maybe_prepare_mlp_sync_batch
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    _maybe_prepare_mlp_sync_batch(batch, runner)
    if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
        batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
        batch.prefill_input_ids_cpu = None
    fb = ForwardBatch.init_new(batch, runner, return_hidden_states_before_norm=False)
    if capture_hidden_mode is not None:
        fb.capture_hidden_mode = capture_hidden_mode
    with torch.no_grad():
        out = runner.forward(fb)
    return out.logits_output, fb


def extend(runner, seqs: Sequence[Sequence[int]], capture_hidden_mode: Optional[Any] = None) -> Extended:
    """Prefill ``seqs`` (one EXTEND forward), as ``one_batch.extend`` does."""
    from sglang.benchmark.one_batch import TreeCacheNamespace
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    params = SamplingParams(temperature=0, max_new_tokens=16)
    reqs = []
    for i, ids in enumerate(seqs):
        req = Req(rid=str(i), origin_input_text="", origin_input_ids=array("q", ids), sampling_params=params)
        req.full_untruncated_fill_ids = req.origin_input_ids
        req.logprob_start_len = -1
        if hasattr(req, "set_extend_range"):
            req.set_extend_range(0, len(ids))
        else:
            req.extend_end = len(ids)
        reqs.append(req)
    tree_cache = TreeCacheNamespace(
        page_size=_page_size(runner),
        device=runner.device,
        token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
    )
    batch = ScheduleBatch.init_new(
        reqs=reqs,
        req_to_token_pool=runner.req_to_token_pool,
        token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
        tree_cache=tree_cache,
        model_config=runner.model_config,
        enable_overlap=False,
        spec_algorithm=SpeculativeAlgorithm.NONE,
    )
    batch.prepare_for_extend()
    logits_output, fb = _forward(runner, batch, capture_hidden_mode)
    return Extended(logits_output.next_token_logits, batch, fb)
