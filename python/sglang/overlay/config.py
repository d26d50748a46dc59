"""What an in-process runner is built from: ``RunnerConfig`` and its ServerArgs.

``RunnerConfig.validate()`` says what is wrong before anything is built;
``make_server_args`` turns a config into the ServerArgs of its ModelRunner.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from sglang.overlay import compat
from sglang.overlay.families import FAMILIES
from sglang.overlay.quiet import LOG_LEVELS

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class SettingError(ValueError):
    """A ValueError about the value of one ``RunnerConfig`` field: ``str()`` names it as the API does
    (``RunnerConfig(mem_fraction_static=0.05)``), ``named(flag)`` as a command line does
    (``--mem-fraction-static 0.05``)."""

    def __init__(self, template: str, field: str, value: Any) -> None:
        self.template, self.field, self.value = template, field, value
        super().__init__(template.format(setting=f"RunnerConfig({field}={value!r})"))

    def named(self, flag: str) -> str:
        return self.template.format(setting=f"{flag} {self.value}")


@dataclass(frozen=True)
class RunnerConfig:
    """What a :class:`StandaloneRunner` is built from; ``validate`` says what is wrong.

    ``device`` "auto" picks CUDA when available, else CPU. ``None`` fields take
    the device's default: on CPU fp32, the ``torch_native`` attention backend
    and a small KV pool; on CUDA the checkpoint's dtype, ``triton`` attention
    and 30% of GPU memory. ``server_args`` passes further ServerArgs fields.
    ``dense_engine`` (the default) scores through the dense scoring engine
    where it takes the model (``sglang.overlay.dense``: CUDA, half precision,
    one TP and PP rank; OPT, Llama, Mistral, Qwen2, Qwen3): the decoder on the
    model's own modules, with torch's flash attention and no batch objects;
    False sends every forward through ``ModelRunner.forward`` and the
    attention backend (benchmarks compare the two).
    ``prefill_graphs`` > 0 (CUDA, the models the dense scoring engine takes)
    keeps up to that many CUDA graphs of the decoder for scoring batches whose
    lengths repeat; None (the default): 8 where the engine takes the model on
    CUDA, else none; 0: off. While graphs are on, a scoring batch's sequences
    are padded at their end to one length, a multiple of ``graph_bucket``
    (0: no padding), so batches of similar lengths share a graph (MeZO's
    batches: 16 x 49 tokens ran its loss forward in 5.8 ms with a graph, 10.0
    without, on an H100). The padding comes after every real token, so causal
    attention leaves the scores of the real tokens as they were.

    Tensor parallelism (one process per rank, as SGLang's one-batch benchmark
    runs them): ``tp_size`` ranks, this one ``tp_rank``; on CUDA it uses GPU
    ``first_gpu + tp_rank`` (``first_gpu``: several replicas of a model, e.g. MeZO's data
    parallelism, each on GPUs of its own). ``dist_port`` is the torch.distributed port that all ranks
    share: required when ``tp_size`` > 1 (with ``distributed="fresh"``), else a
    free port is picked. With ``distributed="reuse"`` the existing world must be
    this layout (world size ``tp_size``, rank ``tp_rank``) and ``dist_port`` is
    not used. On CPU, more ranks than NUMA nodes need
    ``SGLANG_CPU_OMP_THREADS_BIND`` (SGLang binds each rank's threads to cores).

    ``log_level`` "quiet" (the default) drops the upstream messages listed in
    ``sglang.overlay.quiet.NOISE`` while the runner is built; "verbose" shows all.
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
    dense_engine: bool = True
    prefill_graphs: Optional[int] = None
    graph_bucket: int = 8
    server_args: dict = field(default_factory=dict)
    tp_size: int = 1
    tp_rank: int = 0
    dist_port: Optional[int] = None
    cuda_graphs: bool = False
    cuda_graph_batch_sizes: Optional[tuple[int, ...]] = None
    first_gpu: int = 0
    log_level: str = "quiet"
    check_family: bool = True
    # The model's parsed config.json, set by resolved(): a resolved config is not validated again.
    _checkpoint: Optional[dict] = field(default=None, init=False, repr=False, compare=False)

    def device_kind(self) -> str:
        """'cuda' or 'cpu': what ``device`` means on this machine ("auto": CUDA when torch sees it)."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved(self) -> "RunnerConfig":
        """The config with the device's defaults filled in, validated (once: a resolved config is its own
        resolution)."""
        if self._checkpoint is not None:
            return self
        checkpoint = self.validate()
        cpu = self.device_kind() == "cpu"
        out = dataclasses.replace(
            self,
            device=self.device_kind(),
            dtype=self.dtype or ("float32" if cpu else "auto"),
            attention_backend=self.attention_backend or ("torch_native" if cpu else "triton"),
            # On the CPU, SGLang sizes the KV pool from the machine's free memory (psutil) and max_total_tokens
            # caps it; a static fraction of 0.05 failed when other processes (data-parallel replicas) took
            # more than 5% of the free memory while this one loaded.
            mem_fraction_static=self.mem_fraction_static or (0.5 if cpu else 0.3),
            max_total_tokens=self.max_total_tokens or (8192 if cpu else None),
            server_args=dict(self.server_args),
            cuda_graph_batch_sizes=None if self.cuda_graph_batch_sizes is None else tuple(self.cuda_graph_batch_sizes),
        )
        object.__setattr__(out, "_checkpoint", checkpoint)
        return out

    def checkpoint_config(self) -> dict:
        """The model's config.json, parsed (read once, by ``resolved``)."""
        return dict(self.resolved()._checkpoint)

    def validate(self) -> dict:
        """ValueError saying what is wrong; returns the model's parsed config.json."""
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
        cpu = self.device_kind() == "cpu"
        if cpu and self.attention_backend not in (None, "torch_native"):
            raise ValueError(
                f"attention_backend {self.attention_backend!r} does not run on CPU (device={self.device!r} is the "
                "CPU here); use 'torch_native'"
            )
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.prefill_graphs is not None and self.prefill_graphs < 0:
            raise ValueError(f"prefill_graphs must be >= 0 or None (the device's default), got {self.prefill_graphs}")
        if not isinstance(self.dense_engine, bool):
            raise ValueError(f"dense_engine must be True or False, got {self.dense_engine!r}")
        if self.prefill_graphs and not self.dense_engine:
            raise ValueError(
                "prefill_graphs are the dense engine's CUDA graphs: use dense_engine=True or prefill_graphs=0"
            )
        if self.prefill_graphs and cpu:
            raise ValueError("prefill_graphs are CUDA graphs: use device='cuda' or prefill_graphs=0")
        if not isinstance(self.graph_bucket, int) or self.graph_bucket < 0:
            raise ValueError(f"graph_bucket must be an int >= 0 (0: no padding), got {self.graph_bucket!r}")
        if self.cuda_graphs and cpu:
            raise ValueError("cuda_graphs are CUDA graphs: use device='cuda' or cuda_graphs=False")
        if self.cuda_graph_batch_sizes is not None:
            if not self.cuda_graphs:
                raise ValueError("cuda_graph_batch_sizes is given but cuda_graphs is False: set cuda_graphs=True")
            sizes = list(self.cuda_graph_batch_sizes)
            if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
                raise ValueError(f"cuda_graph_batch_sizes must be a non-empty list of ints >= 1, got {sizes!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.distributed not in ("fresh", "reuse"):
            raise ValueError(f"distributed must be 'fresh' or 'reuse', got {self.distributed!r}")
        self._validate_tensor_parallel()
        try:
            checkpoint = json.loads((path / "config.json").read_text())
        except ValueError as error:
            raise ValueError(f"{path / 'config.json'} is not valid JSON ({error})") from None
        if not isinstance(checkpoint, dict) or not checkpoint.get("architectures"):
            raise ValueError(f"{path / 'config.json'} names no architectures; SGLang cannot pick a model class")
        architecture = checkpoint["architectures"][0]
        if self.check_family and architecture not in FAMILIES:
            served = ", ".join(f"{family} ({arch})" for arch, family in FAMILIES.items())
            raise ValueError(
                f"{path / 'config.json'} is a {architecture}, which the in-process runner does not serve: it serves "
                f"{served}. To try another of SGLang's models anyway, build with RunnerConfig(check_family=False)"
            )
        for weights in sorted(path.glob("*.safetensors")):
            _check_safetensors(weights)
        return checkpoint

    def _validate_tensor_parallel(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}; use tp_size=1 for a single rank")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(
                f"tp_rank must be in [0, tp_size) = [0, {self.tp_size}), got {self.tp_rank}: build one runner per "
                f"rank, tp_rank=0..{self.tp_size - 1}, each in its own process"
            )
        if not isinstance(self.first_gpu, int) or self.first_gpu < 0:
            raise ValueError(f"first_gpu must be an int >= 0, got {self.first_gpu!r}")
        gpus_needed = self.first_gpu + self.tp_size
        if self.first_gpu and self.device_kind() == "cuda" and torch.cuda.device_count() < gpus_needed:
            raise ValueError(
                f"first_gpu={self.first_gpu} with tp_size={self.tp_size} needs GPUs {self.first_gpu} to "
                f"{self.first_gpu + self.tp_size - 1}, but torch sees {torch.cuda.device_count()}"
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


def _check_safetensors(path: Path) -> None:
    """Raise ValueError naming ``path`` when it is not a whole safetensors file (its header and size)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise ValueError(f"a header of {header_len} bytes in a file of {size}")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): save or download it again") from None
    if 8 + header_len + end > size:
        raise ValueError(
            f"{path} is truncated: its header describes {8 + header_len + end} bytes, the file has {size}; save or "
            "download it again"
        )


def _numa_nodes() -> Optional[int]:
    """NUMA nodes with CPUs (Linux sysfs), or None where that cannot be read."""
    nodes = Path("/sys/devices/system/node")
    try:
        return sum(1 for node in nodes.glob("node[0-9]*") if (node / "cpulist").read_text().strip()) or None
    except OSError:
        return None


def make_server_args(config: RunnerConfig):
    """ServerArgs for an in-process runner of ``config`` (resolved, and so validated, once)."""
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
    kwargs.update(compat.no_piecewise_graphs_server_args())
    if config.max_total_tokens is not None:
        kwargs["max_total_tokens"] = config.max_total_tokens
    if config.cuda_graphs:
        kwargs.update(disable_cuda_graph=False, **compat.decode_graph_server_args(config.cuda_graph_batch_sizes))
    if config.device == "cpu" and config.tp_size > 1:
        kwargs["disable_custom_all_reduce"] = True  # a GPU all-reduce: off the GPU it only fails with a warning
    kwargs.update(config.server_args)
    return ServerArgs(**kwargs)
