"""How the GPU benchmarks measure: CUDA-event timing, the in-run ceilings (the bf16 matmul rate and the
device-to-device copy bandwidth, measured on the same GPU in the same run), and one profiled call's GPU
kernel time by category. ``bench_opt.py``, ``mezo_gpu.py``, ``zo_kernel_parts.py`` and ``gemm_small_m.py``
share them."""

from __future__ import annotations

import statistics
import time

import torch


def log(msg: str) -> None:
    print(msg, flush=True)


def cuda_time(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` measured with CUDA events (host overhead inside fn included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def matmul_peak_tflops(n: int = 8192, iters: int = 30) -> float:
    """The bf16 dense matmul rate of this GPU now: an n^3 GEMM, timed as the workloads are."""
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / cuda_time(lambda: x @ y, iters, warmup=10) / 1e12


def copy_bandwidth(nbytes: int = 1 << 31) -> float:
    """Bytes per second read + written by a device-to-device copy of ``nbytes``, timed like the workloads."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), 20, warmup=5)


def kernel_summary(fn, label: str, top: int = 6) -> dict:
    """One profiled call (after two unprofiled ones, so that a prefill graph is captured already):
    GPU kernel time by category, and host wall time; logs the ``top`` kernels by time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    cats = {"gemm": 0.0, "attention": 0.0, "layernorm": 0.0, "elementwise": 0.0, "copy/cat": 0.0, "other": 0.0}
    kernels, n = [], 0
    averages = prof.key_averages()
    for e in averages:
        if (
            getattr(e, "device_type", None) != DeviceType.CUDA
            or getattr(e, "is_user_annotation", False)
            or e.key.startswith("step[")
        ):  # annotation ranges, not kernels
            continue
        us = e.self_device_time_total
        n += e.count
        k = e.key.lower()
        if any(s in k for s in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")):
            c = "gemm"
        elif any(s in k for s in ("attn", "attention", "flash", "fmha", "_fwd_kernel", "extend", "decode_")):
            c = "attention"
        elif "norm" in k:
            c = "layernorm"
        elif any(s in k for s in ("copy", "cat", "memcpy", "memset", "index", "gather", "scatter")):
            c = "copy/cat"
        elif any(s in k for s in ("elementwise", "vectorized", "relu", "add", "mul", "unrolled")):
            c = "elementwise"
        else:
            c = "other"
        cats[c] += us / 1e3
        kernels.append((us / 1e3, e.count, e.key[:90]))
    kernels.sort(reverse=True)
    gpu = sum(cats.values())
    log(
        f"PROFILE {label}: wall {wall * 1e3:.2f} ms, GPU kernels {gpu:.2f} ms ({n} launches), "
        + ", ".join(f"{k} {v:.2f}" for k, v in cats.items())
    )
    for ms, cnt, name in kernels[:top]:
        log(f"    {ms:8.3f} ms  x{cnt:<4d} {name}")
    host = sorted(
        (
            (e.self_cpu_time_total / 1e3, e.count, e.key[:70])
            for e in averages
            if getattr(e, "device_type", None) == DeviceType.CPU
        ),
        reverse=True,
    )[:12]
    return dict(
        label=label,
        wall_ms=wall * 1e3,
        gpu_ms=gpu,
        launches=n,
        **{f"{k}_ms": v for k, v in cats.items()},
        top_kernels=kernels[:12],
        top_host_ops=host,
    )
