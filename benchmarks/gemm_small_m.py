#!/usr/bin/env python3
"""The loss forward's GEMMs at MeZO's task shapes: cuBLAS (what the dense engine calls) against an autotuned
Triton GEMM (torch.compile's max-autotune), side by side in one run.

    PYTHONPATH=/tmp/site:. python3 benchmarks/gemm_small_m.py [--shape opt-1.3b --tokens 784,4096]

For each linear layer of ``--shape`` (OPT: q/k/v fused, one of q/k/v as the dense engine runs them from
hidden size 2048 on, out, fc1, fc2) and each row count M in ``--tokens`` (16 × 49 = 784 is 16 × (48 + 1),
4096 is 16 × 256), ``F.linear`` with its bias in bf16, and the same call compiled with
``mode="max-autotune-no-cudagraphs"`` (Inductor benchmarks its Triton templates against cuBLAS and keeps the
faster: a row where it kept cuBLAS shows about 1.00). Each is timed as a CUDA graph of 20 calls (median of
20 replays, per call): GPU time, without the host's launch (a compiled call's guards cost more than these
GEMMs take). Prints a table: ms, TFLOP/s, the fraction of the bf16 matmul peak measured in the run, and the
ratio. Issue 33: at M = 784 the forward's GEMMs ran at about two thirds of the peak.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_shared import common  # noqa: E402


def graph_time(fn, cuda_time, calls: int = 20) -> float:
    """Seconds of one ``fn()`` on the GPU: a CUDA graph of ``calls`` calls, replayed (median of 20)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_time(graph.replay, 20, 3) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--tokens", default="784,4096", help="row counts M, comma-separated")
    a = ap.parse_args()
    from measure import cuda_time, matmul_peak_tflops

    cfg = common.SHAPES[a.shape]
    h, ffn = cfg["hidden_size"], cfg["ffn_dim"]
    layers = {"qkv": (3 * h, h), "q": (h, h), "out": (h, h), "fc1": (ffn, h), "fc2": (h, ffn)}  # (N, K)
    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name(0)}; bf16 matmul peak in this run {peak:.0f} TFLOP/s; {a.shape}")
    print("| layer | M x N x K | cuBLAS ms | TFLOP/s | of peak | autotuned ms | of peak | cuBLAS / autotuned |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {}
    for m in [int(t) for t in a.tokens.split(",")]:
        for name, (n, k) in layers.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            tuned = torch.compile(lambda x, w, b: F.linear(x, w, b), mode="max-autotune-no-cudagraphs", dynamic=False)
            args = (x, w, b)
            t_blas = graph_time(lambda args=args: F.linear(*args), cuda_time)
            t_tuned = graph_time(lambda tuned=tuned, args=args: tuned(*args), cuda_time)
            tflops = 2 * m * n * k / t_blas / 1e12
            if name != "q":  # the layer's four GEMMs: q/k/v fused
                totals.setdefault(m, [0.0, 0.0, 0.0])
                totals[m][0] += t_blas
                totals[m][1] += t_tuned
                totals[m][2] += 2 * m * n * k
            print(
                f"| {name} | {m} x {n} x {k} | {t_blas * 1e3:.4f} | {tflops:.0f} | {tflops / peak:.1%} | "
                f"{t_tuned * 1e3:.4f} | {2 * m * n * k / t_tuned / 1e12 / peak:.1%} | {t_blas / t_tuned:.2f} |"
            )
            torch._dynamo.reset()
    for m, (t_blas, t_tuned, flops) in totals.items():
        print(
            f"M = {m}, one layer's four GEMMs: cuBLAS {t_blas * 1e3:.3f} ms ({flops / t_blas / 1e12 / peak:.1%} of "
            f"the peak), autotuned {t_tuned * 1e3:.3f} ms ({flops / t_tuned / 1e12 / peak:.1%})"
        )


if __name__ == "__main__":
    main()
