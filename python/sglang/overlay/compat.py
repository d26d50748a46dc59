"""Everything that differs between the supported SGLang releases, for the runner.

The fork layer builds ModelRunners and batches the way each release's own
one-batch benchmark does; every probe of a release's API (``hasattr``,
``ImportError``, signatures) lives here, so the runner, the forward primitives
and the trainer are written once. Supporting a new API era means a branch here.

- ``build_model_runner``: a ready ModelRunner for ServerArgs, per era (0.5.21+:
  runtime context and ``bootstrap.init_parallel_runtime``; 0.5.16-0.5.20:
  ``ParallelState`` and ``bootstrap``; up to 0.5.15: ranks as arguments).
- ``new_req`` / ``new_schedule_batch``: requests and batches to prefill.
- ``forward_batch_of``: the ForwardBatch of a prepared ScheduleBatch.
- ``logits_output_of``: ModelRunner.forward's LogitsProcessor output.
- ``distributed_exists`` / ``tp_group``: the process's distributed state.
- ``decode_graph_server_args``: the ServerArgs fields of decode CUDA graphs.
"""

from __future__ import annotations

import contextlib
import inspect
import socket
from array import array
from typing import Any, Iterator, Optional, Sequence

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_exists() -> bool:
    """Whether torch.distributed or SGLang's model-parallel groups exist."""
    from sglang.srt.distributed import parallel_state

    return torch.distributed.is_initialized() or parallel_state.model_parallel_is_initialized()


def model_parallel_exists() -> bool:
    from sglang.srt.distributed import parallel_state

    return parallel_state.model_parallel_is_initialized()


def tp_group():
    from sglang.srt.distributed import parallel_state

    return parallel_state.get_tp_group()


def _build_runtime_context_era(sa, port: int, tp_rank: int = 0, gpu_id: int = 0):
    """0.5.21+: publish ServerArgs and this process's ranks, the caller initializes the parallel runtime."""
    try:
        from sglang.benchmark.one_batch import _init_process_global_configs
    except ImportError:  # 0.5.21: the benchmark sets no process-global configs before loading

        def _init_process_global_configs() -> None:
            pass

    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import bootstrap
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.runtime_context import SpawnRanks, get_device, publish, spawn_world_rank

    sa.resolve_once()
    publish(
        sa,
        role="scheduler",
        ranks=SpawnRanks(world_rank=spawn_world_rank(sa, tp_rank=tp_rank, pp_rank=0), gpu_id=gpu_id),
    )
    _init_process_global_configs()
    model_config = ModelConfig.from_server_args(sa)
    bootstrap.init_parallel_runtime(server_args=sa, device=get_device().device, dist_port=port)
    bootstrap.init_layer_runtime(model_config=model_config)
    return ModelRunner(
        model_config=model_config,
        mem_fraction_static=resolving_view(sa).mem_fraction_static,
        gpu_id=gpu_id,
        nccl_port=port,
        server_args=sa,
    )


def _build_bootstrap_era(sa, port: int, tp_rank: int = 0, gpu_id: int = 0):
    """0.5.16-0.5.20: the ModelRunner takes a ParallelState and initializes distributed."""
    import dataclasses

    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed.parallel_state_wrapper import ParallelState
    from sglang.srt.layers.dp_attention import compute_dp_attention_world_info
    from sglang.srt.model_executor.model_runner import ModelRunner

    try:  # 0.5.19-0.5.20: the benchmark reads the widths through a resolving view
        from sglang.srt.arg_groups.overrides import resolving_view
    except ImportError:

        def resolving_view(server_args):
            return server_args

    publish = getattr(_bench_module(), "publish", None)
    if publish is not None:  # 0.5.19-0.5.20: the process entry publishes ServerArgs first, as the benchmark does
        publish(sa, role="scheduler")
    cfg = resolving_view(sa)
    attn_tp_rank, attn_tp_size, attn_dp_rank, attn_dp_size = compute_dp_attention_world_info(
        cfg.enable_dp_attention, tp_rank, cfg.tp_size, cfg.dp_size, cfg.attn_cp_size
    )
    dcp_size = getattr(cfg, "dcp_size", 1)
    # The ParallelState of the benchmark's load_model(). Its fields differ between
    # these releases (dcp_size, then attn_dcp_rank/size): pass those this release
    # has; trivial() would fill any other with its single-rank value.
    layout = dict(
        tp_rank=tp_rank,
        tp_size=cfg.tp_size,
        pp_rank=0,
        pp_size=1,
        dp_rank=None,
        dp_size=cfg.dp_size,
        attn_tp_rank=attn_tp_rank,
        attn_tp_size=attn_tp_size,
        attn_cp_rank=0,
        attn_cp_size=cfg.attn_cp_size,
        attn_dcp_rank=tp_rank % dcp_size,
        attn_dcp_size=dcp_size,
        dcp_size=dcp_size,
        attn_dp_rank=attn_dp_rank,
        attn_dp_size=attn_dp_size,
        moe_ep_rank=tp_rank // max(1, cfg.tp_size // cfg.ep_size),
        moe_ep_size=cfg.ep_size,
        moe_dp_rank=None,
        moe_dp_size=cfg.moe_dp_size,
        gpu_id=gpu_id,
    )
    fields = {f.name for f in dataclasses.fields(ParallelState)}
    ps = ParallelState.trivial(**{k: v for k, v in layout.items() if k in fields})
    return ModelRunner(
        model_config=ModelConfig.from_server_args(sa),
        mem_fraction_static=sa.mem_fraction_static,
        gpu_id=gpu_id,
        ps=ps,
        nccl_port=port,
        server_args=sa,
    )


def _build_model_runner_era(sa, port: int, tp_rank: int = 0, gpu_id: int = 0):
    """Up to 0.5.15: the ModelRunner takes its ranks as arguments and initializes distributed."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import ModelRunner

    ep_size = getattr(sa, "ep_size", 1)  # releases before 0.4.10 have no expert parallelism
    kwargs = dict(
        model_config=ModelConfig.from_server_args(sa),
        mem_fraction_static=sa.mem_fraction_static,
        gpu_id=gpu_id,
        tp_rank=tp_rank,
        tp_size=sa.tp_size,
        moe_ep_rank=tp_rank // max(1, sa.tp_size // ep_size),
        moe_ep_size=ep_size,
        pp_rank=0,
        pp_size=1,
        nccl_port=port,
        server_args=sa,
    )
    accepted = inspect.signature(ModelRunner.__init__).parameters
    return ModelRunner(**{k: v for k, v in kwargs.items() if k in accepted})


@contextlib.contextmanager
def build_scope(device: str) -> Iterator[None]:
    """What a model's build needs beside upstream's own steps, by device.

    On the GPU, only ``_without_missing_dsl``. On the CPU without SGLang's CPU engine
    (``SGLANG_USE_CPU_ENGINE``, which needs sgl_kernel), two of upstream's CPU-engine assumptions are set
    aside (0.5.13-0.5.23):

    - the rotary embedding imports a GPU fallback kernel at construction (``vllm._custom_ops`` off CUDA,
      ``rotary_embedding/base.py``), which its CPU forward never calls (it dispatches to ``forward_native``):
      its module's ``_is_cpu`` flag, which guards only that import, is set meanwhile;
    - with fewer k/v heads than tensor-parallel ranks, the ModelRunner pads the heads on the CPU
      (``adjust_config_with_unaligned_cpu_tp``) for the CPU engine's padded loaders, which this path does not
      take, so the checkpoint's k/v no longer fit: where the standard layout serves (heads divisible by the
      ranks, k/v heads replicated over them, as on the GPU), the config is left unpadded."""
    if device != "cpu":
        with _without_missing_dsl():
            yield
        return
    try:
        from sglang.srt.layers.rotary_embedding import base as rope
        from sglang.srt.model_executor import model_runner
    except ImportError:  # releases whose rotary embedding is one module
        rope = model_runner = None
    if rope is None or getattr(rope, "_is_cpu", True):
        yield
        return
    pad = getattr(model_runner, "adjust_config_with_unaligned_cpu_tp", None)

    def adjust(model_config, load_config, tp_size):
        heads, kv_heads = model_config.num_attention_heads, model_config.get_total_num_kv_heads()
        if heads % tp_size == 0 and kv_heads < tp_size and tp_size % kv_heads == 0:
            return pad(model_config, load_config, 1)  # upstream's bookkeeping, no padding
        return pad(model_config, load_config, tp_size)

    rope._is_cpu = True
    if pad is not None:
        model_runner.adjust_config_with_unaligned_cpu_tp = adjust
    try:
        yield
    finally:
        rope._is_cpu = False
        if pad is not None:
            model_runner.adjust_config_with_unaligned_cpu_tp = pad


@contextlib.contextmanager
def _without_missing_dsl() -> Iterator[None]:
    """0.5.23's Llama-style MLPs build a DualGemm, whose mode selection imports the CuTe DSL (``cutlass``,
    nvidia-cutlass-dsl) before it checks for the SM100 GPUs its kernel needs: where the package is not
    installed (the device's staged site: it does not fit a carry), the layer takes upstream's other path
    (mode None, what it selects on any GPU below SM100) instead of failing the build."""
    import importlib.util

    try:
        from sglang.srt.layers import dual_gemm
    except ImportError:  # releases before the dual GEMM
        dual_gemm = None
    if dual_gemm is None or importlib.util.find_spec("cutlass") is not None:
        yield
        return
    select = dual_gemm.DualGemm._select_mode
    dual_gemm.DualGemm._select_mode = lambda self, gate_up_proj, hidden_size: None
    try:
        yield
    finally:
        dual_gemm.DualGemm._select_mode = select


def build_model_runner(server_args, *, tp_rank: int = 0, dist_port: Optional[int] = None, gpu_id: Optional[int] = None):
    """A ready ModelRunner (memory pools, attention backend) for ``server_args``.

    Rank ``tp_rank`` of ``server_args.tp_size`` (on CUDA on GPU ``gpu_id``, by default ``tp_rank``), its
    torch.distributed world on ``dist_port`` (every rank passes the same one; a
    free port when None, which only suits a single rank). The lower-level entry:
    no validation, no check of what distributed state exists;
    :class:`StandaloneRunner` is the checked one.
    """
    port = free_port() if dist_port is None else dist_port
    gpu_id = tp_rank if gpu_id is None else gpu_id
    with build_scope(server_args.device):
        try:
            from sglang.srt.distributed import bootstrap
        except ImportError:  # up to 0.5.15
            runner = _build_model_runner_era(server_args, port, tp_rank, gpu_id)
        else:
            if hasattr(bootstrap, "init_parallel_runtime"):
                runner = _build_runtime_context_era(server_args, port, tp_rank, gpu_id)
            else:
                runner = _build_bootstrap_era(server_args, port, tp_rank, gpu_id)
    # Where ModelRunner has alloc_memory_pool, the caller allocates the pools and
    # backends; older ModelRunners did it in __init__.
    if hasattr(runner, "alloc_memory_pool") and getattr(runner, "req_to_token_pool", None) is None:
        runner.alloc_memory_pool()
        runner.init_attention_backends()
        runner.init_cuda_graphs()
    if server_args.tp_size > 1:  # as the benchmark: every rank is built before any forward
        torch.distributed.barrier()
    return runner


def page_size(runner) -> int:
    try:
        from sglang.srt.runtime_context import get_schedule
    except ImportError:
        return runner.server_args.page_size
    return get_schedule().page_size


def _bench_module():
    """SGLang's one-batch benchmark module (sglang/bench_one_batch.py up to 0.5.14)."""
    try:
        from sglang.benchmark import one_batch
    except ImportError:
        from sglang import bench_one_batch as one_batch
    return one_batch


def new_req(index: int, ids: Sequence[int], params):
    """A Req to prefill ``ids`` from position 0, in the release's own way (cf. its one-batch benchmark)."""
    from sglang.srt.managers.schedule_batch import Req

    n = len(ids)
    req = Req(rid=str(index), origin_input_text="", origin_input_ids=array("q", ids), sampling_params=params)
    if hasattr(req, "fill_ids"):  # up to 0.5.12: list token ids, fill_ids
        req = Req(rid=str(index), origin_input_text="", origin_input_ids=list(ids), sampling_params=params)
        req.fill_ids = req.origin_input_ids
    else:
        req.full_untruncated_fill_ids = req.origin_input_ids
    req.logprob_start_len = -1
    if hasattr(req, "set_extend_range"):  # 0.5.15-0.5.20
        req.set_extend_range(0, n)
    elif hasattr(req, "set_extend_input_len"):  # 0.5.8-0.5.14
        if not hasattr(req, "fill_ids"):
            req.fill_len = n
        req.set_extend_input_len(n - len(req.prefix_indices))
    elif hasattr(req, "fill_ids"):  # up to 0.5.7
        req.extend_input_len = n - len(req.prefix_indices)
    else:  # 0.5.21+
        req.extend_end = n
    return req


def new_schedule_batch(model_runner, reqs: list):
    """A ScheduleBatch of ``reqs`` on the runner's pools, prepared for one EXTEND forward."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    tree_cache_namespace = getattr(_bench_module(), "TreeCacheNamespace", None)  # 0.5.8+
    batch = ScheduleBatch.init_new(
        reqs=reqs,
        req_to_token_pool=model_runner.req_to_token_pool,
        token_to_kv_pool_allocator=model_runner.token_to_kv_pool_allocator,
        tree_cache=None
        if tree_cache_namespace is None
        else tree_cache_namespace(
            page_size=page_size(model_runner),
            device=model_runner.device,
            token_to_kv_pool_allocator=model_runner.token_to_kv_pool_allocator,
        ),
        model_config=model_runner.model_config,
        enable_overlap=False,
        spec_algorithm=SpeculativeAlgorithm.NONE,
    )
    batch.prepare_for_extend()
    return batch


def _forward_batch(batch, model_runner):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    params = inspect.signature(ForwardBatch.init_new).parameters
    if "return_hidden_states_before_norm" in params:
        return ForwardBatch.init_new(batch, model_runner, return_hidden_states_before_norm=False)
    first = next(iter(params.values()))
    if "ModelWorkerBatch" in str(first.annotation):  # up to 0.5.13
        return ForwardBatch.init_new(batch.get_model_worker_batch(), model_runner)
    return ForwardBatch.init_new(batch, model_runner)


def forward_batch_of(model_runner, batch):
    """The ForwardBatch of ``batch`` (prepared for extend or decode), as the release's one-batch
    benchmark builds it."""
    _bench_module()._maybe_prepare_mlp_sync_batch(batch, model_runner)
    if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
        batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
        batch.prefill_input_ids_cpu = None
    return _forward_batch(batch, model_runner)


def logits_output_of(out) -> Any:
    """The LogitsProcessor output of what ModelRunner.forward returned (a tuple up to 0.5.7)."""
    return out[0] if isinstance(out, tuple) else out.logits_output


def no_piecewise_graphs_server_args() -> dict[str, Any]:
    """The ServerArgs field that keeps SGLang's piecewise CUDA graphs off, where the release has one (0.5.13
    captures them by default for models such as Llama, and fails on the CPU: torch.cpu has no graph pool);
    the runner's graphs are its own (prefill graphs of the dense engine, decode graphs when asked)."""
    from sglang.srt.server_args import ServerArgs

    names = set(inspect.signature(ServerArgs).parameters)
    return {"disable_piecewise_cuda_graph": True} if "disable_piecewise_cuda_graph" in names else {}


def decode_graph_server_args(batch_sizes: Optional[Sequence[int]]) -> dict[str, Any]:
    """The ServerArgs fields (besides ``disable_cuda_graph=False``) that give decode CUDA graphs for
    ``batch_sizes`` (the release's default sizes when None) and no prefill CUDA graphs of SGLang's own:
    ``cuda_graph_bs_decode`` / ``disable_prefill_cuda_graph`` from 0.5.15, ``cuda_graph_bs`` before."""
    from sglang.srt.server_args import ServerArgs

    names = set(inspect.signature(ServerArgs).parameters)  # 0.5.21+: not a dataclass
    out: dict[str, Any] = {}
    if "disable_prefill_cuda_graph" in names:
        out["disable_prefill_cuda_graph"] = True
    if batch_sizes is not None:
        out["cuda_graph_bs_decode" if "cuda_graph_bs_decode" in names else "cuda_graph_bs"] = list(batch_sizes)
    return out
