"""SGLang's forward pass in-process, without a server: build, score, destroy.

For work that needs logits of a model many times from Python (zeroth-order
training such as MeZO, evaluation loops, tests), this builds a ``ModelRunner``
for a model path with defaults that work on CPU and GPU, scores batches of
token sequences, and tears the runner down::

    from sglang.srt.standalone import RunnerConfig, StandaloneRunner

    runner = StandaloneRunner(RunnerConfig(model_path="/path/to/opt"))
    logits = runner.logits([[2, 100, 200], [2, 5]])       # every position
    loss = runner.loss(prompts=[[2, 100]], targets=[[200, 300]])
    runner.close()

Each scoring call starts from empty KV pools, and this path has no radix
cache: K/V computed before an in-place weight change are never read after it.
Scoring calls keep no K/V at all: a model with a dense path of its own (the
native OPT on the GPU, ``OPTForCausalLM.forward_dense``) skips the attention
backend's metadata, the LogitsProcessor and the K/V writes (``score``).

Several runners can live in one process: ``distributed="reuse"`` builds a
runner on the torch.distributed and model-parallel groups that already exist
(SGLANG_ALLOW_REUSE_DISTRIBUTED, see ``sglang.srt.distributed.reuse``).
Runners do not share KV pools; each holds its own weights and pools.

Tensor parallelism: one process per rank, each building its own runner with
``RunnerConfig(tp_size=N, tp_rank=r, dist_port=PORT)`` (one port that all ranks
share; on CUDA rank r uses GPU r). The ranks build and score in lockstep: every
rank calls the same methods with the same sequences, since each forward (and
the gather of the vocab-parallel head in ``logits`` / ``token_logprobs``) is a
collective over the TP group. Each rank gets the full results.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from sglang.srt.distributed.reuse import REUSE_DISTRIBUTED_ENV

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LIVE_RUNNERS: list["StandaloneRunner"] = []


@dataclass(frozen=True)
class RunnerConfig:
    """What a :class:`StandaloneRunner` is built from; ``validate`` says what is wrong.

    ``device`` "auto" picks CUDA when available, else CPU. ``None`` fields take
    the device's default: on CPU fp32, the ``torch_native`` attention backend
    and a small KV pool; on CUDA the checkpoint's dtype, ``triton`` attention
    and 30% of GPU memory. ``server_args`` passes further ServerArgs fields.
    ``prefill_graphs`` > 0 (CUDA, models with ``enable_prefill_graphs``: OPT)
    keeps up to that many CUDA graphs of the model for batches of whole
    prompts whose lengths repeat (fixed-length scoring windows, benchmarks).

    Tensor parallelism (one process per rank, as SGLang's one-batch benchmark
    runs them): ``tp_size`` ranks, this one ``tp_rank``; on CUDA it uses GPU
    ``tp_rank``. ``dist_port`` is the torch.distributed port that all ranks
    share: required when ``tp_size`` > 1 (with ``distributed="fresh"``), else a
    free port is picked. With ``distributed="reuse"`` the existing world must be
    this layout (world size ``tp_size``, rank ``tp_rank``) and ``dist_port`` is
    not used. On CPU, more ranks than NUMA nodes need
    ``SGLANG_CPU_OMP_THREADS_BIND`` (SGLang binds each rank's threads to cores).
    """

    model_path: str
    device: str = "auto"
    dtype: Optional[str] = None
    attention_backend: Optional[str] = None
    mem_fraction_static: Optional[float] = None
    max_total_tokens: Optional[int] = None
    max_running_requests: int = 64
    distributed: str = "fresh"
    random_seed: int = 0
    prefill_graphs: int = 0
    server_args: dict = field(default_factory=dict)
    tp_size: int = 1
    tp_rank: int = 0
    dist_port: Optional[int] = None

    def resolved(self) -> "RunnerConfig":
        """The config with the device's defaults filled in, validated."""
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cpu = device == "cpu"
        config = RunnerConfig(
            model_path=self.model_path,
            device=device,
            dtype=self.dtype or ("float32" if cpu else "auto"),
            attention_backend=self.attention_backend or ("torch_native" if cpu else "triton"),
            mem_fraction_static=self.mem_fraction_static or (0.05 if cpu else 0.3),
            max_total_tokens=self.max_total_tokens or (8192 if cpu else None),
            max_running_requests=self.max_running_requests,
            distributed=self.distributed,
            random_seed=self.random_seed,
            prefill_graphs=self.prefill_graphs,
            server_args=dict(self.server_args),
            tp_size=self.tp_size,
            tp_rank=self.tp_rank,
            dist_port=self.dist_port,
        )
        config.validate()
        return config

    def validate(self) -> None:
        path = Path(self.model_path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model_path {self.model_path!r} has no config.json: give a local HuggingFace model "
                "directory (save_pretrained output)"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not one of 'auto', 'cpu', 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device; use device='cpu'")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {_DTYPES}")
        if self.device == "cpu" and self.attention_backend not in (None, "torch_native"):
            raise ValueError(
                f"attention_backend {self.attention_backend!r} does not run on CPU; use 'torch_native'"
            )
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.prefill_graphs < 0:
            raise ValueError(f"prefill_graphs must be >= 0, got {self.prefill_graphs}")
        if self.prefill_graphs and self.device == "cpu":
            raise ValueError("prefill_graphs are CUDA graphs: use device='cuda' or prefill_graphs=0")
        if self.distributed not in ("fresh", "reuse"):
            raise ValueError(f"distributed must be 'fresh' or 'reuse', got {self.distributed!r}")
        self._validate_tensor_parallel()
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        if not architectures:
            raise ValueError(f"{path / 'config.json'} names no architectures; SGLang cannot pick a model class")

    def _validate_tensor_parallel(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}; use tp_size=1 for a single rank")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(
                f"tp_rank must be in [0, tp_size) = [0, {self.tp_size}), got {self.tp_rank}: build one runner per "
                f"rank, tp_rank=0..{self.tp_size - 1}, each in its own process"
            )
        if self.dist_port is not None and not 0 < self.dist_port < 65536:
            raise ValueError(f"dist_port must be a TCP port in [1, 65535], got {self.dist_port}")
        if self.tp_size == 1:
            return
        if self.dist_port is None and self.distributed == "fresh":
            raise ValueError(
                f"tp_size={self.tp_size} needs dist_port, the torch.distributed port that all {self.tp_size} ranks "
                "share: pick one free port in the process that starts the ranks and pass the same "
                "RunnerConfig(dist_port=...) to every rank"
            )
        if self.device == "cuda" and torch.cuda.device_count() < self.tp_size:
            raise ValueError(
                f"tp_size={self.tp_size} on CUDA puts rank r on GPU r, but torch sees {torch.cuda.device_count()} "
                f"GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): make {self.tp_size} GPUs "
                "visible to every rank or lower tp_size"
            )
        if self.device == "cpu" and not os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
            nodes = _numa_nodes()
            if nodes is not None and nodes < self.tp_size:
                raise ValueError(
                    f"tp_size={self.tp_size} on CPU: SGLang binds each rank's threads to one NUMA node and this "
                    f"machine has {nodes}; set SGLANG_CPU_OMP_THREADS_BIND to one core list per rank, separated "
                    "by '|' (e.g. '0-3|4-7' for tp_size=2), in every rank's environment"
                )


def _numa_nodes() -> Optional[int]:
    """NUMA nodes with CPUs (Linux sysfs), or None where that cannot be read."""
    nodes = Path("/sys/devices/system/node")
    try:
        return sum(1 for node in nodes.glob("node[0-9]*") if (node / "cpulist").read_text().strip()) or None
    except OSError:
        return None


def make_server_args(config: RunnerConfig):
    """ServerArgs for an in-process runner of ``config`` (validated and resolved)."""
    from sglang.srt.server_args import ServerArgs

    config = config.resolved()
    kwargs: dict[str, Any] = dict(
        model_path=config.model_path,
        device=config.device,
        attention_backend=config.attention_backend,
        sampling_backend="pytorch",
        skip_tokenizer_init=True,
        dtype=config.dtype,
        disable_cuda_graph=True,
        mem_fraction_static=config.mem_fraction_static,
        max_running_requests=config.max_running_requests,
        disable_radix_cache=True,
        random_seed=config.random_seed,
        tp_size=config.tp_size,
    )
    if config.max_total_tokens is not None:
        kwargs["max_total_tokens"] = config.max_total_tokens
    kwargs.update(config.server_args)
    return ServerArgs(**kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _env(name: str, value: Optional[str]) -> Iterator[None]:
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _distributed_exists() -> bool:
    from sglang.srt.distributed import parallel_state

    return torch.distributed.is_initialized() or parallel_state.model_parallel_is_initialized()


def _build_runtime_context_era(sa, port: int, tp_rank: int = 0):
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
    gpu_id = tp_rank  # as the benchmark places rank r (one node, no base_gpu_id)
    publish(sa, role="scheduler",
            ranks=SpawnRanks(world_rank=spawn_world_rank(sa, tp_rank=tp_rank, pp_rank=0), gpu_id=gpu_id))
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


def _build_bootstrap_era(sa, port: int, tp_rank: int = 0):
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
    gpu_id = tp_rank  # as the benchmark places rank r (one node, no base_gpu_id)
    attn_tp_rank, attn_tp_size, attn_dp_rank, attn_dp_size = compute_dp_attention_world_info(
        cfg.enable_dp_attention, tp_rank, cfg.tp_size, cfg.dp_size, cfg.attn_cp_size
    )
    dcp_size = getattr(cfg, "dcp_size", 1)
    # The ParallelState of the benchmark's load_model(). Its fields differ between
    # these releases (dcp_size, then attn_dcp_rank/size): pass those this release
    # has; trivial() would fill any other with its single-rank value.
    layout = dict(
        tp_rank=tp_rank, tp_size=cfg.tp_size, pp_rank=0, pp_size=1,
        dp_rank=None, dp_size=cfg.dp_size,
        attn_tp_rank=attn_tp_rank, attn_tp_size=attn_tp_size,
        attn_cp_rank=0, attn_cp_size=cfg.attn_cp_size,
        attn_dcp_rank=tp_rank % dcp_size, attn_dcp_size=dcp_size, dcp_size=dcp_size,
        attn_dp_rank=attn_dp_rank, attn_dp_size=attn_dp_size,
        moe_ep_rank=tp_rank // max(1, cfg.tp_size // cfg.ep_size), moe_ep_size=cfg.ep_size,
        moe_dp_rank=None, moe_dp_size=cfg.moe_dp_size,
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


def _build_model_runner_era(sa, port: int, tp_rank: int = 0):
    """Up to 0.5.15: the ModelRunner takes its ranks as arguments and initializes distributed."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import ModelRunner

    ep_size = getattr(sa, "ep_size", 1)  # releases before 0.4.10 have no expert parallelism
    kwargs = dict(
        model_config=ModelConfig.from_server_args(sa),
        mem_fraction_static=sa.mem_fraction_static,
        gpu_id=tp_rank, tp_rank=tp_rank, tp_size=sa.tp_size,
        moe_ep_rank=tp_rank // max(1, sa.tp_size // ep_size), moe_ep_size=ep_size, pp_rank=0, pp_size=1,
        nccl_port=port,
        server_args=sa,
    )
    accepted = inspect.signature(ModelRunner.__init__).parameters
    return ModelRunner(**{k: v for k, v in kwargs.items() if k in accepted})


def build_model_runner(server_args, *, tp_rank: int = 0, dist_port: Optional[int] = None):
    """A ready ModelRunner (memory pools, attention backend) for ``server_args``.

    Rank ``tp_rank`` of ``server_args.tp_size`` (on CUDA on GPU ``tp_rank``), its
    torch.distributed world on ``dist_port`` (every rank passes the same one; a
    free port when None, which only suits a single rank). The lower-level entry:
    no validation, no check of what distributed state exists;
    :class:`StandaloneRunner` is the checked one.
    """
    port = _free_port() if dist_port is None else dist_port
    try:
        from sglang.srt.distributed import bootstrap
    except ImportError:  # up to 0.5.15
        runner = _build_model_runner_era(server_args, port, tp_rank)
    else:
        if hasattr(bootstrap, "init_parallel_runtime"):
            runner = _build_runtime_context_era(server_args, port, tp_rank)
        else:
            runner = _build_bootstrap_era(server_args, port, tp_rank)
    # Where ModelRunner has alloc_memory_pool, the caller allocates the pools and
    # backends; older ModelRunners did it in __init__.
    if hasattr(runner, "alloc_memory_pool") and getattr(runner, "req_to_token_pool", None) is None:
        runner.alloc_memory_pool()
        runner.init_attention_backends()
        runner.init_cuda_graphs()
    if server_args.tp_size > 1:  # as the benchmark: every rank is built before any forward
        torch.distributed.barrier()
    return runner


def _page_size(runner) -> int:
    try:
        from sglang.srt.runtime_context import get_schedule
    except ImportError:
        return runner.server_args.page_size
    return get_schedule().page_size


@dataclass
class Forward:
    """One forward: the batch (to continue decoding), its LogitsProcessor output,
    and, when asked for, the final hidden states of every token and the head
    (after :func:`score`: those only, ``batch`` and ``logits_output`` are None)."""

    batch: Any
    logits_output: Any
    lengths: list[int]
    hidden_states: Optional[torch.Tensor] = None
    lm_head: Any = None

    @property
    def next_token_logits(self) -> torch.Tensor:
        return self.logits_output.next_token_logits

    def all_logits(self, vocab_size: int) -> list[torch.Tensor]:
        """fp32 logits at every position, one ``[length, vocab]`` tensor per sequence.

        At tensor parallelism > 1 a collective of the TP group (see :func:`head_logits`)."""
        logits = head_logits(self.every_hidden_state(), self.lm_head, vocab_size).float()
        return list(torch.split(logits, self.lengths))

    def every_hidden_state(self) -> torch.Tensor:
        """The final hidden states of every token, ``[sum(lengths), hidden]`` (``all_positions=True``)."""
        if self.hidden_states is None or self.hidden_states.shape[0] != sum(self.lengths):
            raise RuntimeError("the model did not hand every token's hidden state to its LogitsProcessor")
        return self.hidden_states


def head_logits(hidden_states: torch.Tensor, lm_head, vocab_size: int) -> torch.Tensor:
    """The head's logits ``[rows, vocab_size]`` (model dtype) of final hidden states ``[rows, hidden]``.

    At tensor parallelism > 1 the head is vocab-parallel: each rank holds a contiguous
    shard of the (padded) vocabulary. Each rank computes its shard's logits and the TP
    group all-gathers them, as the LogitsProcessor does; a collective, so every rank
    calls this with the same rows. Every rank gets all the logits."""
    tp_size = getattr(lm_head, "tp_size", 1)
    if tp_size == 1:
        return torch.nn.functional.linear(hidden_states, lm_head.weight[:vocab_size])
    from sglang.srt.distributed import parallel_state

    group = parallel_state.get_tp_group()
    shard = getattr(lm_head, "shard_indices", None)
    if getattr(lm_head, "use_attn_tp_group", False) or group.world_size != tp_size:
        raise RuntimeError(
            f"the head is sharded over {tp_size} ranks but not over the TP group ({group.world_size} ranks; "
            "attention data parallelism?): gathering its logits is not supported here"
        )
    if shard is not None and shard.num_added_elements_padded:
        raise RuntimeError("the head has added (LoRA) vocabulary shards: gathering its logits is not supported here")
    local = torch.nn.functional.linear(hidden_states, lm_head.weight)
    return group.all_gather(local.contiguous(), dim=-1)[:, :vocab_size]


def _bench_module():
    """SGLang's one-batch benchmark module (sglang/bench_one_batch.py up to 0.5.14)."""
    try:
        from sglang.benchmark import one_batch
    except ImportError:
        from sglang import bench_one_batch as one_batch
    return one_batch


def _new_req(index: int, ids: Sequence[int], params):
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


def extend_batch(model_runner, seqs: Sequence[Sequence[int]]):
    """A ScheduleBatch prepared to prefill ``seqs`` in one EXTEND forward, from empty KV pools
    (what was there is freed)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one token")
    model_runner.req_to_token_pool.clear()
    model_runner.token_to_kv_pool_allocator.clear()
    params = SamplingParams(temperature=0, max_new_tokens=1 << 20)
    reqs = [_new_req(i, ids, params) for i, ids in enumerate(seqs)]
    tree_cache_namespace = getattr(_bench_module(), "TreeCacheNamespace", None)  # 0.5.8+
    batch = ScheduleBatch.init_new(
        reqs=reqs,
        req_to_token_pool=model_runner.req_to_token_pool,
        token_to_kv_pool_allocator=model_runner.token_to_kv_pool_allocator,
        tree_cache=None if tree_cache_namespace is None else tree_cache_namespace(
            page_size=_page_size(model_runner),
            device=model_runner.device,
            token_to_kv_pool_allocator=model_runner.token_to_kv_pool_allocator,
        ),
        model_config=model_runner.model_config,
        enable_overlap=False,
        spec_algorithm=SpeculativeAlgorithm.NONE,
    )
    batch.prepare_for_extend()
    return batch


def prefill(model_runner, seqs: Sequence[Sequence[int]], *, all_positions: bool = False) -> Forward:
    """Prefill ``seqs`` in one EXTEND forward through ModelRunner.forward, from empty KV pools."""
    return run_batch(model_runner, extend_batch(model_runner, seqs), all_positions=all_positions,
                     lengths=[len(s) for s in seqs])


def _forward_batch(batch, model_runner):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    params = inspect.signature(ForwardBatch.init_new).parameters
    if "return_hidden_states_before_norm" in params:
        return ForwardBatch.init_new(batch, model_runner, return_hidden_states_before_norm=False)
    first = next(iter(params.values()))
    if "ModelWorkerBatch" in str(first.annotation):  # up to 0.5.13
        return ForwardBatch.init_new(batch.get_model_worker_batch(), model_runner)
    return ForwardBatch.init_new(batch, model_runner)


def to_forward_batch(model_runner, batch):
    """The ForwardBatch of ``batch`` (prepared for extend or decode), as the release's one-batch
    benchmark builds it."""
    _bench_module()._maybe_prepare_mlp_sync_batch(batch, model_runner)
    if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
        batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
        batch.prefill_input_ids_cpu = None
    return _forward_batch(batch, model_runner)


def _runner_forward(model_runner, forward_batch, all_positions: bool) -> tuple[Any, Optional[torch.Tensor], Any]:
    """ModelRunner.forward: the LogitsProcessor's output and, when ``all_positions``, the final
    hidden states it was handed (every token's in an EXTEND batch) and the head."""
    seen: dict[str, Any] = {}

    def record(module, args, kwargs):
        seen["hidden_states"], seen["lm_head"] = args[1], args[2]

    processor = model_runner.model.logits_processor
    handle = processor.register_forward_pre_hook(record, with_kwargs=True) if all_positions else None
    try:
        with torch.no_grad():
            out = model_runner.forward(forward_batch)
    finally:
        if handle is not None:
            handle.remove()
    logits_output = out[0] if isinstance(out, tuple) else out.logits_output  # a tuple up to 0.5.7
    return logits_output, seen.get("hidden_states"), seen.get("lm_head")


def run_batch(model_runner, batch, *, all_positions: bool = False, lengths: Optional[list[int]] = None) -> Forward:
    """Run ``batch`` (prepared for extend or decode) through ModelRunner.forward."""
    logits_output, hidden_states, lm_head = _runner_forward(
        model_runner, to_forward_batch(model_runner, batch), all_positions)
    return Forward(batch, logits_output, lengths or [1] * len(batch.reqs), hidden_states, lm_head)


def final_hidden_states(model_runner, forward_batch, *, keep_kv: bool = True) -> tuple[torch.Tensor, Any]:
    """The final hidden states of every token of an EXTEND ``forward_batch`` and the head.

    Through the model's own ``forward_dense`` where it has one and takes the batch (the native
    OPT on the GPU: whole prompts, no attention-backend metadata, no LogitsProcessor, and no
    K/V writes when ``keep_kv`` is False), else through ModelRunner.forward (which always
    writes the K/V)."""
    dense = getattr(model_runner.model, "forward_dense", None)
    if dense is not None:
        hidden_states = dense(forward_batch, model_runner.token_to_kv_pool, write_kv=keep_kv)
        if hidden_states is not None:
            return hidden_states, model_runner.model.lm_head
    _, hidden_states, lm_head = _runner_forward(model_runner, forward_batch, all_positions=True)
    return hidden_states, lm_head


def score(model_runner, seqs: Sequence[Sequence[int]]) -> Forward:
    """One EXTEND forward of ``seqs`` for the final hidden states of every token
    (``every_hidden_state()``, ``all_logits()``), from empty KV pools, keeping no K/V
    (:func:`final_hidden_states`): nothing decodes after it, so ``batch`` and
    ``logits_output`` are None."""
    forward_batch = to_forward_batch(model_runner, extend_batch(model_runner, seqs))
    hidden_states, lm_head = final_hidden_states(model_runner, forward_batch, keep_kv=False)
    return Forward(None, None, [len(s) for s in seqs], hidden_states, lm_head)


def decode(model_runner, batch, next_ids: torch.Tensor) -> Forward:
    """One DECODE forward of ``batch`` (after ``prefill`` or ``decode``) feeding ``next_ids``,
    one token id per sequence, as an int64 tensor on the runner's device (no host sync)."""
    batch.output_ids = next_ids
    batch.input_ids = next_ids
    batch.prepare_for_decode()
    return run_batch(model_runner, batch)


def target_logprobs(hidden_states: torch.Tensor, lm_head, vocab_size: int, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under the logits of final hidden state ``hidden_states[i]`` (fp32 ``[rows]``).

    The logits are computed in the model's dtype and normalized in fp32, as ``log_softmax(logits.float())``
    does, but without materializing them in fp32 (``sglang.srt.layers.target_logprobs``). At tensor
    parallelism > 1 from the gathered logits (:func:`head_logits`, a collective of the TP group)."""
    from sglang.srt.layers.target_logprobs import gather_logprobs

    return gather_logprobs(head_logits(hidden_states, lm_head, vocab_size), targets)


class StandaloneRunner:
    """A ModelRunner built in-process for one model (see the module docstring)."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config.resolved()
        if self.config.server_args.get("tp_size", self.config.tp_size) != self.config.tp_size:
            # make_server_args lets server_args override any field; a runner takes its ranks from the config.
            raise ValueError(
                f"server_args sets tp_size={self.config.server_args['tp_size']!r}, the config tp_size="
                f"{self.config.tp_size}: set it with RunnerConfig(tp_size=...) (with tp_rank and dist_port), "
                "not through server_args"
            )
        if self.config.distributed == "fresh" and _distributed_exists():
            raise ValueError(
                "torch.distributed or SGLang's model-parallel groups already exist in this process: build "
                "with RunnerConfig(distributed='reuse') to reuse them, or close the other runners first"
            )
        if self.config.distributed == "reuse" and torch.distributed.is_initialized():
            world = (torch.distributed.get_world_size(), torch.distributed.get_rank())
            if world != (self.config.tp_size, self.config.tp_rank):
                raise ValueError(
                    f"distributed='reuse' keeps the existing torch.distributed world (world size {world[0]}, rank "
                    f"{world[1]}), which is not this runner's layout (tp_size={self.config.tp_size}, tp_rank="
                    f"{self.config.tp_rank}): build with RunnerConfig(tp_size={world[0]}, tp_rank={world[1]}) or "
                    "close the other runners first"
                )
        self.server_args = make_server_args(self.config)
        with _env(REUSE_DISTRIBUTED_ENV, "1" if self.config.distributed == "reuse" else None):
            self.runner = build_model_runner(
                self.server_args, tp_rank=self.config.tp_rank, dist_port=self.config.dist_port
            )
        _LIVE_RUNNERS.append(self)
        if self.config.prefill_graphs:
            enable = getattr(self.runner.model, "enable_prefill_graphs", None)
            if enable is None:
                self.close()
                raise ValueError(
                    f"{type(self.runner.model).__name__} has no prefill CUDA graphs: build with prefill_graphs=0"
                )
            enable(self.config.prefill_graphs)

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def vocab_size(self) -> int:
        return self.runner.model_config.vocab_size

    def logits(self, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """fp32 logits at every position: one ``[len(seq), vocab]`` tensor per sequence."""
        return score(self.runner, seqs).all_logits(self.vocab_size)

    def token_logprobs(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """log p(target[t] | prompt, target[:t]) for every target token, one tensor per pair."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if any(len(p) == 0 for p in prompts) or any(len(t) == 0 for t in targets):
            raise ValueError("every prompt and every target needs at least one token")
        seqs = [list(p) + list(t) for p, t in zip(prompts, targets)]
        fwd = score(self.runner, seqs)
        rows, start = [], 0
        for prompt, target, length in zip(prompts, targets, fwd.lengths):
            rows.extend(range(start + len(prompt) - 1, start + len(prompt) - 1 + len(target)))
            start += length
        hidden = fwd.every_hidden_state()
        ids = torch.tensor([t for target in targets for t in target], device=hidden.device)
        rows = torch.tensor(rows, device=hidden.device)
        logprobs = target_logprobs(hidden[rows], fwd.lm_head, self.vocab_size, ids)
        return list(torch.split(logprobs, [len(t) for t in targets]))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations: ``max_new_tokens`` token ids after each prompt (no stop tokens).

        One prefill, then one decode forward per token for the whole batch (the decode CUDA graph
        when the runner has one); the token ids stay on the device until the end."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("give at least one prompt, each with at least one token")
        longest = max(map(len, prompts)) + max_new_tokens
        if longest > self.runner.model_config.context_len:
            raise ValueError(
                f"a prompt of {max(map(len, prompts))} tokens + {max_new_tokens} new tokens exceeds the model's "
                f"context length {self.runner.model_config.context_len}"
            )
        kv_tokens = sum(map(len, prompts)) + len(prompts) * max_new_tokens
        if kv_tokens > self.runner.max_total_num_tokens:
            raise ValueError(
                f"the batch needs {kv_tokens} KV slots, the runner's pool holds {self.runner.max_total_num_tokens}: "
                "build with a larger max_total_tokens or generate for fewer prompts / tokens"
            )
        vocab = self.vocab_size
        fwd = prefill(self.runner, prompts)
        ids = fwd.next_token_logits[:, :vocab].argmax(-1)
        out = [ids]
        for _ in range(max_new_tokens - 1):
            ids = decode(self.runner, fwd.batch, ids).next_token_logits[:, :vocab].argmax(-1)
            out.append(ids)
        return torch.stack(out, 1).tolist()

    def loss(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean negative log-likelihood over all target tokens of the batch (fp32 scalar)."""
        return -torch.cat(self.token_logprobs(prompts, targets)).mean()

    def close(self) -> None:
        """Release this runner; the last one alive also destroys the distributed setup."""
        if self not in _LIVE_RUNNERS:
            return
        _LIVE_RUNNERS.remove(self)
        self.runner.req_to_token_pool.clear()
        self.runner.token_to_kv_pool_allocator.clear()
        if not _LIVE_RUNNERS:
            from sglang.srt.distributed import parallel_state

            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()
        del self.runner

    def __enter__(self) -> "StandaloneRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
