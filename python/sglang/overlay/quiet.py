"""A quiet default: upstream messages that no step of the overlay explains are dropped.

Building a runner prints a dozen lines from upstream SGLang that say nothing about the user's run:
import-time warnings of modules every runner imports (AWQ, GGUF, Triton on a CPU machine), the
model registry's list of model files whose optional dependencies are missing, CPU notes, and
messages a second runner in one process triggers. ``scope(log_level)`` drops exactly the messages
of ``NOISE`` (one entry each: where it comes from, a pattern, why it may go) while the overlay
builds a runner (``StandaloneRunner``), saves a checkpoint (``MeZO.save_pretrained``) and runs the
demo; everything else passes: errors are exceptions, every other warning and log line of upstream
and of the overlay is shown. ``log_level="verbose"`` (``RunnerConfig(log_level="verbose")``,
``python -m sglang.overlay.mezo --verbose``, ``overlay.py demo --verbose``) drops nothing.

How, and what is global. Each mechanism is installed when the outermost ``scope`` is entered and
removed when it exits (nested scopes add nothing; the outermost decides):

- warnings: ``warnings.filterwarnings("ignore", message, UserWarning, module="sglang...")``
  entries, removed one by one afterwards (not ``catch_warnings``, which would also undo the filters
  upstream itself installs while a runner is built);
- logs: a ``logging.Filter`` on each named upstream logger (``logging.getLogger(name)``; loggers of
  modules not imported yet are created empty, and the module's own ``getLogger`` finds them);
- progress bars: ``sys.stderr`` is a pass-through that drops only the listed one-shard bars.

Warnings filters, loggers and ``sys.stderr`` are process-wide, so while a scope is open they apply
to other threads too (only to the listed messages). After it nothing is left installed; what stays
is what upstream does once per process: a module imported inside the scope emitted its import-time
warning there, and does not emit it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Iterator

LOG_LEVELS = ("quiet", "verbose")
# Whether the user set this variable: upstream's first ServerArgs sets it, so a second runner's
# "deprecated" warning is about upstream's own write, not a setting of the user's.
_USER_SET_IPC = "SGLANG_USE_CUDA_IPC_TRANSPORT" in os.environ


@dataclass(frozen=True)
class Noise:
    """One upstream message the quiet default drops."""

    kind: str  # "warning" (warnings.warn), "log" (a logger), "progress" (a tqdm bar on stderr)
    pattern: str  # a regex searched in the message (the bar's text for "progress")
    where: tuple[str, ...]  # "log": logger names (every supported release's); "warning": a module regex
    why: str
    cpu_only: bool = False  # dropped only where torch sees no CUDA device


NOISE: tuple[Noise, ...] = (
    Noise(
        "warning",
        r"Only CUDA, HIP and XPU support AWQ currently",
        (r"sglang\.",),
        "emitted when upstream's AWQ module is imported on a machine without a GPU, whatever the model",
    ),
    Noise(
        "warning",
        r"Only CUDA, MUSA and NPU support GGUF quantization currently",
        (r"sglang\.",),
        "emitted when upstream's GGUF module is imported without a GPU, whatever the model",
    ),
    Noise(
        "warning",
        r"Triton is not supported on current platform, roll back to CPU",
        (r"sglang\.",),
        "upstream's FLA kernels module on a CPU machine; the overlay's CPU path runs no Triton kernel",
    ),
    Noise(
        "log",
        r"^Cannot detect CUDA architecture\.$",
        ("sglang.kernels.jit.utils.arch", "sglang.jit_kernel.utils.arch", "sglang.jit_kernel.utils"),
        "upstream's JIT kernels probe the GPU at import; without one there is nothing to detect",
        cpu_only=True,
    ),
    Noise(
        "log",
        r"^Ignore import error when loading sglang\.srt\.models\.(?!(opt|gpt2|llama|mistral|qwen2|qwen3|gemma)\b)",
        ("sglang.srt.models.registry",),
        "the registry imports every model file and lists those whose optional packages (vllm, cutlass, "
        "torchaudio, mamba kernels) are missing; the import errors of the families the runner serves are kept",
    ),
    Noise(
        "log",
        r"^Cuda graph is disabled because of using torch native attention backend",
        ("sglang.srt.server_args", "sglang.srt.arg_groups.attention_hook"),
        "the CPU runner uses torch_native attention, and the CPU has no CUDA graphs",
        cpu_only=True,
    ),
    Noise(
        "log",
        r"^init_cpu_threads_env and shared memory based AllReduce is disabled",
        ("sglang.srt.distributed.bootstrap", "sglang.srt.model_executor.model_runner"),
        "a CPU all-reduce fast path needs AMX or arm64; one rank needs no all-reduce, and TP on CPU runs on "
        "gloo (tested)",
    ),
    Noise(
        "log",
        r"^(SGLANG_CPU_OMP_THREADS_BIND is set for explicit control of CPU cores|(The total number of ranks|TP "
        r"size) \(\d+\) ?is larger than numa node number)",
        (
            "sglang.srt.utils.common",
            "sglang.srt.utils.numa_utils",
            "sglang.srt.utils",
            "sglang.srt.model_executor.model_runner",
        ),
        "tensor parallelism on the CPU: both ask for --max-total-tokens, which the runner always sets on the "
        "CPU (RunnerConfig.max_total_tokens, 8192 by default)",
        cpu_only=True,
    ),
    Noise(
        "log",
        r"^publish\(role=\w+\) re-projected the config bags",
        ("sglang.srt.runtime_context",),
        "a second runner in one process publishes its config again; the override dropped is the previous "
        "runner's, and each ModelRunner takes its own when it initializes",
    ),
    Noise(
        "log",
        r"^SGLANG_USE_CUDA_IPC_TRANSPORT is deprecated",
        ("sglang.srt.server_args", "sglang.srt.arg_groups.serving_hook"),
        "a second runner in one process: upstream's first ServerArgs set the variable (kept when the user set it)",
    ),
    Noise(
        "progress",
        r"(Multi-thread loading shards|Loading (safetensors|pt) checkpoint shards|Writing model "
        r"shards):.*\| ?\d+/1 \[",
        (),
        "a progress bar over a single file (0% then 100%) says nothing; bars over several shards are kept",
    ),
)

_lock = threading.Lock()
_depth = 0


def _active(noise: Noise, cuda: bool) -> bool:
    if noise.cpu_only and cuda:
        return False
    return not (_USER_SET_IPC and "SGLANG_USE_CUDA_IPC_TRANSPORT" in noise.pattern)


class _LogFilter(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


class _Stderr:
    """``sys.stderr`` passed through, less the writes of the listed progress bars (and their newline)."""

    def __init__(self, stream, patterns: list[re.Pattern]) -> None:
        self._stream = stream
        self._patterns = patterns
        self._dropped_bar = False

    def write(self, text: str) -> int:
        if any(p.search(text) for p in self._patterns):
            self._dropped_bar = True
            return len(text)
        if self._dropped_bar and text.strip("\r\n") == "":
            return len(text)  # the newline that ends a dropped bar
        self._dropped_bar = False
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)  # fileno, isatty, encoding, ... of the real stream


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch: no CUDA
        return False


@contextlib.contextmanager
def scope(log_level: str = "quiet") -> Iterator[None]:
    """Drop ``NOISE`` inside the block (``log_level`` "quiet"); "verbose" drops nothing."""
    global _depth
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {log_level!r}")
    with _lock:
        _depth += 1
        outermost = _depth == 1
    try:
        if not outermost or log_level == "verbose":
            yield
            return
        with _installed([n for n in NOISE if _active(n, _cuda())]):
            yield
    finally:
        with _lock:
            _depth -= 1


@contextlib.contextmanager
def _installed(noise: list[Noise]) -> Iterator[None]:
    before = list(warnings.filters)
    for n in noise:
        if n.kind == "warning":
            for module in n.where:
                warnings.filterwarnings("ignore", message=n.pattern, category=UserWarning, module=module)
    ours = [f for f in warnings.filters if not any(f is b for b in before)]
    filters: dict[str, list[re.Pattern]] = {}
    for n in noise:
        if n.kind == "log":
            for name in n.where:
                filters.setdefault(name, []).append(re.compile(n.pattern))
    installed = [(logging.getLogger(name), _LogFilter(patterns)) for name, patterns in filters.items()]
    for logger, log_filter in installed:
        logger.addFilter(log_filter)
    stderr = sys.stderr
    sys.stderr = _Stderr(stderr, [re.compile(n.pattern) for n in noise if n.kind == "progress"])
    try:
        yield
    finally:
        if isinstance(sys.stderr, _Stderr) and sys.stderr._stream is stderr:
            sys.stderr = stderr  # else someone replaced it inside the block: leave theirs
        for logger, log_filter in installed:
            logger.removeFilter(log_filter)
        warnings.filters[:] = [f for f in warnings.filters if not any(f is o for o in ours)]
        mutated = getattr(warnings, "_filters_mutated", None)  # what filterwarnings itself calls (3.11-3.13)
        if mutated is not None:
            mutated()
