#!/usr/bin/env python3
"""Where the time of one SGLang prefill call goes, on one GPU (a diagnostic; bench_opt.py has the table).

    bash scripts/device/run_gpu.sh breakdown        # BENCH_SHAPES=opt-125m,opt-1.3b by default

Per shape (random weights, bf16, 16 x 512 tokens, prefill graphs on) and per SGLang path of
bench_opt.py ("prefill runner": ModelRunner.forward; "prefill+kv" / "prefill": the scoring path with
and without K/V writes; "loss"), median ms of: the whole call (CUDA events), the part before the
prefill graph's replay ("pre": host work while the GPU idles), the replay ("graph"), what follows
("post"), and the host time of the call; then the host timeline of one call (ms from its start at
which DenseEngine.forward, DensePrefill.plan, PrefillGraphs.run, the fingerprint walk and the replay are
entered and left), the replay's GPU time back to back, the eager paths, and HF's calls.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import bench_opt as bo  # noqa: E402
from gpu_shared import common  # noqa: E402

OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/gpu-out")
# Every CUDA graph replay in this process is bracketed by CUDA events (the pre / graph / post split).
MARKS: list = []
_replay = torch.cuda.CUDAGraph.replay


def _marked_replay(self):
    e1 = torch.cuda.Event(enable_timing=True)
    e2 = torch.cuda.Event(enable_timing=True)
    e1.record()
    _replay(self)
    e2.record()
    MARKS.append((e1, e2))


torch.cuda.CUDAGraph.replay = _marked_replay


def log(m):
    print(m, flush=True)


def warm_up(fn, calls=3):
    """A few calls first (a prefill graph is captured on the second), then an idle GPU."""
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()


def breakdown(fn, iters=12):
    """Median ms: whole call (events), before the graph replay, the replay, after it, host time."""
    warm_up(fn)
    rows = []
    for _ in range(iters):
        MARKS.clear()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t = time.perf_counter()
        fn()
        host = (time.perf_counter() - t) * 1e3
        b.record()
        b.synchronize()
        total = a.elapsed_time(b)
        if MARKS:
            e1, e2 = MARKS[0]
            rows.append((total, a.elapsed_time(e1), e1.elapsed_time(e2), e2.elapsed_time(b), host))
        else:
            rows.append((total, float("nan"), float("nan"), float("nan"), host))
    med = [statistics.median(c) for c in zip(*rows)]
    return dict(zip(("call", "pre", "graph", "post", "host"), med))


STAMPS: list = []


def stamped(obj, name, label):
    f = getattr(obj, name)

    def w(*a, **k):
        STAMPS.append((label + " in", time.perf_counter()))
        try:
            return f(*a, **k)
        finally:
            STAMPS.append((label + " out", time.perf_counter()))

    setattr(obj, name, w)
    return lambda: setattr(obj, name, f)


def host_timeline(fn, iters=15):
    """Median host offsets (ms from the call's start) of the stamped points."""
    warm_up(fn)
    runs = []
    for _ in range(iters):
        STAMPS.clear()
        t = time.perf_counter()
        fn()
        end = time.perf_counter()
        torch.cuda.synchronize()
        runs.append([(k, (v - t) * 1e3) for k, v in STAMPS] + [("return", (end - t) * 1e3)])
    keys = [k for k, _ in runs[0]]
    return {k: statistics.median(r[i][1] for r in runs if len(r) == len(keys)) for i, k in enumerate(keys)}


def host_ms(fn, iters=50):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t) / iters * 1e3
    torch.cuda.synchronize()
    return dt


def breakdown_shape(name, a):
    from sglang.overlay import dense
    from sglang.overlay.dense import DensePrefill
    from sglang.overlay.graphs import PrefillGraphs, enable_graphs

    path = common.checkpoint(name)
    sr = bo.build(path, a, graphs=False)
    runner = sr.runner
    engine = sr.engine
    decoder = engine.decoder
    g = torch.Generator().manual_seed(7)
    B, S = a.batch, a.seq
    seqs = [[2] + torch.randint(3, 50000, (S - 1,), generator=g).tolist() for _ in range(B)]
    ids = torch.tensor(seqs, device="cuda")
    res = {}
    with torch.no_grad():
        fb = bo.forward_batch(runner, seqs)
        pos = torch.arange(B * S, device="cuda").view(B, S)
        fns = bo.sgl_fns(runner, engine, fb, pos[:, -1], pos[:, :-1].reshape(-1), ids[:, 1:].reshape(-1))
        w = decoder.embed_positions.weight
        res["host_fingerprint_ms"] = host_ms(lambda: PrefillGraphs._fingerprint(decoder))
        res["host_plan_ms"] = host_ms(
            lambda: DensePrefill.plan(fb, engine.attention, w.dtype, w.device, runner.token_to_kv_pool, False)
        )
        for kind in ("prefill runner", "prefill+kv", "prefill", "loss"):
            res[kind] = breakdown(fns[kind])
            log(f"{name} {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in res[kind].items()))
        undo = [
            stamped(engine, "forward", "engine.forward"),
            stamped(dense.DensePrefill, "plan", "plan"),
            stamped(engine.graphs, "run", "graphs.run"),
            stamped(engine.graphs, "_fingerprint", "fingerprint"),
            stamped(torch.cuda.CUDAGraph, "replay", "replay"),
        ]
        try:
            for kind in ("prefill", "prefill runner"):
                res[kind + " host"] = host_timeline(fns[kind])
                log(f"{name} {kind} host ms: " + ", ".join(f"{k} {v:.3f}" for k, v in res[kind + " host"].items()))
        finally:
            for u in undo:
                u()
        entry = next(iter(engine.graphs.graphs.values()))
        e = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        entry.graph.replay()
        torch.cuda.synchronize()
        e[0].record()
        for _ in range(10):
            entry.graph.replay()
        e[1].record()
        e[1].synchronize()
        res["replay_back_to_back_ms"] = e[0].elapsed_time(e[1]) / 10
        enable_graphs(engine, 0)
        for kind in ("prefill", "prefill runner"):
            res[kind + " eager"] = breakdown(fns[kind])
            log(f"{name} {kind} eager: " + ", ".join(f"{k} {v:.3f}" for k, v in res[kind + " eager"].items()))
        hf = common.hf_model(path, a.dtype)
        res["hf_prefill"] = breakdown(lambda: hf(ids, use_cache=False, logits_to_keep=1))
        res["hf_loss"] = breakdown(lambda: hf(ids, labels=ids, use_cache=False).loss)
        hf = None
    log(f"{name}: " + json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}))
    log(
        f"{name} hf prefill {res['hf_prefill']['call']:.3f} ms, loss {res['hf_loss']['call']:.3f} ms; "
        f"ratios prefill {res['hf_prefill']['call'] / res['prefill']['call']:.2f}, "
        f"runner {res['hf_prefill']['call'] / res['prefill runner']['call']:.2f}, "
        f"loss {res['hf_loss']['call'] / res['loss']['call']:.2f}"
    )
    sr.close()
    common.free_cuda()
    return res


def main():
    a = types.SimpleNamespace(
        kv_tokens=32768, batch=16, decode_batch=64, prefill_graphs=4, dtype="bfloat16", seq=512, iters=10
    )
    OUT.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in sys.argv[1].split(","):
        try:
            out[name] = breakdown_shape(name, a)
        except Exception:
            traceback.print_exc()
            bo.close_all()
    (OUT / "breakdown.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
