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

Several runners can live in one process: ``distributed="reuse"`` builds a
runner on the torch.distributed and model-parallel groups that already exist
(SGLANG_ALLOW_REUSE_DISTRIBUTED, see ``sglang.srt.distributed.reuse``).
Runners do not share KV pools; each holds its own weights and pools.
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
    server_args: dict = field(default_factory=dict)

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
            server_args=dict(self.server_args),
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
        if self.distributed not in ("fresh", "reuse"):
            raise ValueError(f"distributed must be 'fresh' or 'reuse', got {self.distributed!r}")
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        if not architectures:
            raise ValueError(f"{path / 'config.json'} names no architectures; SGLang cannot pick a model class")


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


def _build_runtime_context_era(sa, port: int):
    """0.5.21+: publish ServerArgs, the caller initializes the parallel runtime."""
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
    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=spawn_world_rank(sa, tp_rank=0, pp_rank=0), gpu_id=0))
    _init_process_global_configs()
    model_config = ModelConfig.from_server_args(sa)
    bootstrap.init_parallel_runtime(server_args=sa, device=get_device().device, dist_port=port)
    bootstrap.init_layer_runtime(model_config=model_config)
    return ModelRunner(
        model_config=model_config,
        mem_fraction_static=resolving_view(sa).mem_fraction_static,
        gpu_id=0,
        nccl_port=port,
        server_args=sa,
    )


def _build_bootstrap_era(sa, port: int):
    """0.5.16-0.5.20: the ModelRunner takes a ParallelState and initializes distributed."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed.parallel_state_wrapper import ParallelState
    from sglang.srt.layers.dp_attention import compute_dp_attention_world_info
    from sglang.srt.model_executor.model_runner import ModelRunner

    publish = getattr(_bench_module(), "publish", None)
    if publish is not None:  # 0.5.19-0.5.20: the process entry publishes ServerArgs first, as the benchmark does
        publish(sa, role="scheduler")
    attn_tp_rank, attn_tp_size, attn_dp_rank, attn_dp_size = compute_dp_attention_world_info(
        sa.enable_dp_attention, 0, sa.tp_size, sa.dp_size, sa.attn_cp_size
    )
    # ParallelState's fields differ between these releases (dcp_size, then
    # attn_dcp_rank/size); trivial() fills every field of a single-rank layout.
    ps = ParallelState.trivial(
        dp_rank=None, moe_dp_rank=None,
        attn_tp_rank=attn_tp_rank, attn_tp_size=attn_tp_size,
        attn_dp_rank=attn_dp_rank, attn_dp_size=attn_dp_size,
    )
    return ModelRunner(
        model_config=ModelConfig.from_server_args(sa),
        mem_fraction_static=sa.mem_fraction_static,
        gpu_id=0,
        ps=ps,
        nccl_port=port,
        server_args=sa,
    )


def _build_model_runner_era(sa, port: int):
    """Up to 0.5.15: the ModelRunner takes its ranks as arguments and initializes distributed."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import ModelRunner

    kwargs = dict(
        model_config=ModelConfig.from_server_args(sa),
        mem_fraction_static=sa.mem_fraction_static,
        gpu_id=0, tp_rank=0, tp_size=1, moe_ep_rank=0, moe_ep_size=1, pp_rank=0, pp_size=1,
        nccl_port=port,
        server_args=sa,
    )
    accepted = inspect.signature(ModelRunner.__init__).parameters
    return ModelRunner(**{k: v for k, v in kwargs.items() if k in accepted})


def build_model_runner(server_args):
    """A ready ModelRunner (memory pools, attention backend) for ``server_args``.

    The lower-level entry: no validation, no check of what distributed state
    exists; :class:`StandaloneRunner` is the checked one.
    """
    port = _free_port()
    try:
        from sglang.srt.distributed import bootstrap
    except ImportError:  # up to 0.5.15
        runner = _build_model_runner_era(server_args, port)
    else:
        if hasattr(bootstrap, "init_parallel_runtime"):
            runner = _build_runtime_context_era(server_args, port)
        else:
            runner = _build_bootstrap_era(server_args, port)
    # Where ModelRunner has alloc_memory_pool, the caller allocates the pools and
    # backends; older ModelRunners did it in __init__.
    if hasattr(runner, "alloc_memory_pool") and getattr(runner, "req_to_token_pool", None) is None:
        runner.alloc_memory_pool()
        runner.init_attention_backends()
        runner.init_cuda_graphs()
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
    and, when asked for, the final hidden states of every token and the head."""

    batch: Any
    logits_output: Any
    lengths: list[int]
    hidden_states: Optional[torch.Tensor] = None
    lm_head: Any = None

    @property
    def next_token_logits(self) -> torch.Tensor:
        return self.logits_output.next_token_logits

    def all_logits(self, vocab_size: int) -> list[torch.Tensor]:
        """fp32 logits at every position, one ``[length, vocab]`` tensor per sequence."""
        if self.hidden_states is None or self.hidden_states.shape[0] != sum(self.lengths):
            raise RuntimeError("the model did not hand every token's hidden state to its LogitsProcessor")
        logits = torch.nn.functional.linear(self.hidden_states, self.lm_head.weight[:vocab_size]).float()
        return list(torch.split(logits, self.lengths))


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


def prefill(model_runner, seqs: Sequence[Sequence[int]], *, all_positions: bool = False) -> Forward:
    """Prefill ``seqs`` in one EXTEND forward, from empty KV pools (what was there is freed)."""
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
    return run_batch(model_runner, batch, all_positions=all_positions, lengths=[len(s) for s in seqs])


def _forward_batch(batch, model_runner):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    params = inspect.signature(ForwardBatch.init_new).parameters
    if "return_hidden_states_before_norm" in params:
        return ForwardBatch.init_new(batch, model_runner, return_hidden_states_before_norm=False)
    first = next(iter(params.values()))
    if "ModelWorkerBatch" in str(first.annotation):  # up to 0.5.13
        return ForwardBatch.init_new(batch.get_model_worker_batch(), model_runner)
    return ForwardBatch.init_new(batch, model_runner)


def run_batch(model_runner, batch, *, all_positions: bool = False, lengths: Optional[list[int]] = None) -> Forward:
    """Run ``batch`` (prepared for extend or decode) through the model."""
    _bench_module()._maybe_prepare_mlp_sync_batch(batch, model_runner)
    if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
        batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
        batch.prefill_input_ids_cpu = None
    forward_batch = _forward_batch(batch, model_runner)
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
    return Forward(batch, logits_output, lengths or [1] * len(batch.reqs),
                   seen.get("hidden_states"), seen.get("lm_head"))


class StandaloneRunner:
    """A ModelRunner built in-process for one model (see the module docstring)."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config.resolved()
        if self.config.distributed == "fresh" and _distributed_exists():
            raise ValueError(
                "torch.distributed or SGLang's model-parallel groups already exist in this process: build "
                "with RunnerConfig(distributed='reuse') to reuse them, or close the other runners first"
            )
        self.server_args = make_server_args(self.config)
        with _env(REUSE_DISTRIBUTED_ENV, "1" if self.config.distributed == "reuse" else None):
            self.runner = build_model_runner(self.server_args)
        _LIVE_RUNNERS.append(self)

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def vocab_size(self) -> int:
        return self.runner.model_config.vocab_size

    def logits(self, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """fp32 logits at every position: one ``[len(seq), vocab]`` tensor per sequence."""
        return prefill(self.runner, seqs, all_positions=True).all_logits(self.vocab_size)

    def token_logprobs(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """log p(target[t] | prompt, target[:t]) for every target token, one tensor per pair."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if any(len(p) == 0 for p in prompts) or any(len(t) == 0 for t in targets):
            raise ValueError("every prompt and every target needs at least one token")
        seqs = [list(p) + list(t) for p, t in zip(prompts, targets)]
        out = []
        for logits, prompt, target in zip(self.logits(seqs), prompts, targets):
            predicting = logits[len(prompt) - 1 : len(prompt) - 1 + len(target)]
            ids = torch.as_tensor(list(target), device=predicting.device)
            out.append(torch.log_softmax(predicting, dim=-1).gather(-1, ids[:, None])[:, 0])
        return out

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
