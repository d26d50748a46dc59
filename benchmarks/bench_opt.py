#!/usr/bin/env python3
"""Native SGLang OPT vs HuggingFace on one GPU, measured side by side in one run; prints ONE table.

    PYTHONPATH=/tmp/site:. python3 benchmarks/bench_opt.py --shapes opt-125m,opt-350m,opt-1.3b

(scripts/device/run_gpu.sh runs it on the device.) Random weights at the real OPT shapes
(tests/gpu/common.py), one dtype (default bf16), CUDA events around each measured call,
median of --iters after warm-up.

Workloads (same work on both sides):
- prefill: B x S tokens, logits for the last token only (SGLang's LogitsProcessor default;
  HF with ``logits_to_keep=1``), no KV cache on the HF side (``use_cache=False``); SGLang writes its KV pool.
- loss (MeZO's forward): mean next-token NLL over all B x S tokens. SGLang: the final hidden states
  of every token (forward pre-hook on ``logits_processor``) -> lm_head (F.linear, model dtype)
  -> ``cross_entropy(logits.float())``; HF: ``model(ids, labels=ids, use_cache=False).loss``
  (the same upcast + cross entropy inside).
- decode: batch 64, prompt P tokens, N greedy steps. SGLang: ScheduleBatch.prepare_for_decode +
  ModelRunner.forward per step (decode CUDA graphs when they capture, eager otherwise; both reported);
  HF: ``generate`` (greedy, dynamic cache), decode time = generate(N+1 tokens) - generate(1 token).
MFU (prefill and loss): FLOP/token = 2 x (matmul params of the decoder, + lm_head for loss)
+ causal attention 2 x layers x hidden x S (QK^T and PV over S/2 keys on average), against
``--peak-tflops`` (800: the bf16 dense rate measured on the device's H100, 8192^3 matmul).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.gpu import common  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ timing
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


def flops_per_token(cfg, seq: int, with_head: bool) -> float:
    h, L, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.ffn_dim
    matmul = L * (4 * h * h + 2 * h * f)
    if cfg.word_embed_proj_dim != h:
        matmul += 2 * h * cfg.word_embed_proj_dim  # project_in / project_out
    if with_head:
        matmul += cfg.word_embed_proj_dim * cfg.vocab_size
    return 2 * matmul + 2 * L * h * seq


# ------------------------------------------------------------------------------------------ SGLang
def forward_batch(runner, seqs):
    """A ForwardBatch for one EXTEND of ``seqs`` (built by sglang.srt.standalone.prefill, which runs it
    once), to time ``runner.forward`` alone: the model and the attention backend's metadata."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.standalone import prefill

    fwd = prefill(runner, seqs)
    return ForwardBatch.init_new(fwd.batch, runner, return_hidden_states_before_norm=False)


def sgl_loss_fn(runner, fb, targets):
    """MeZO's loss forward: every token's final hidden state -> head (model dtype) -> fp32 cross entropy,
    as HF's ``labels=`` path does it. The hidden states are those the model hands its LogitsProcessor."""
    seen = {}

    def record(module, args, kwargs):
        seen["h"], seen["head"] = args[1], args[2]

    processor = runner.model.logits_processor
    vocab = runner.model_config.vocab_size

    def run():
        handle = processor.register_forward_pre_hook(record, with_kwargs=True)
        try:
            runner.forward(fb)
        finally:
            handle.remove()
        logits = F.linear(seen["h"], seen["head"].weight[:vocab])
        return F.cross_entropy(logits.float(), targets, ignore_index=-100)

    return run


def sgl_decode(runner, prompts, steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps of the whole batch after one prefill."""
    from sglang.srt.standalone import prefill
    from tests.support import logits as L

    with torch.no_grad():
        ext = prefill(runner, prompts)
        nxt = ext.next_token_logits.argmax(-1).tolist()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            nxt = L.decode(runner, ext.batch, nxt).argmax(-1).tolist()
        torch.cuda.synchronize()
        return time.perf_counter() - t


def ab_prefill(runner, fn, iters: int, tokens: int) -> dict:
    """Prefill tok/s with each of the native OPT's GPU fast paths switched off, on the same runner:
    ``DensePrefill`` (torch flash/cuDNN attention for whole prompts) and the fused fc1+ReLU GEMM."""
    from sglang.srt.models import opt

    layers = [m for m in runner.model.modules() if isinstance(m, opt.OPTDecoderLayer)]
    plan, fused = opt.DensePrefill.__dict__["plan"], [m.fuse_fc1_relu for m in layers]
    out = {}
    for label, attn_on, relu_on in (("base", False, False), ("+fc1_relu", False, True),
                                    ("+dense_prefill", True, False), ("both", True, True)):
        opt.DensePrefill.plan = plan if attn_on else classmethod(lambda cls, h, fb: None)
        for m, f in zip(layers, fused):
            m.fuse_fc1_relu = f and relu_on
        try:
            out[label] = tokens / cuda_time(fn, iters)
        finally:
            opt.DensePrefill.plan = plan
            for m, f in zip(layers, fused):
                m.fuse_fc1_relu = f
    log("  A/B prefill tok/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in out.items()))
    return out


# ------------------------------------------------------------------------------------------ profile
def kernel_summary(fn, label: str) -> dict:
    """One profiled call: GPU kernel time by category, and host wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

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
        if getattr(e, "device_type", None) != DeviceType.CUDA or getattr(e, "is_user_annotation", False) \
                or e.key.startswith("step["):  # annotation ranges, not kernels
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
    log(f"PROFILE {label}: wall {wall * 1e3:.2f} ms, GPU kernels {gpu:.2f} ms ({n} launches), "
        + ", ".join(f"{k} {v:.2f}" for k, v in cats.items()))
    for ms, cnt, name in kernels[:6]:
        log(f"    {ms:8.3f} ms  x{cnt:<4d} {name}")
    host = sorted(((e.self_cpu_time_total / 1e3, e.count, e.key[:70]) for e in averages
                   if getattr(e, "device_type", None) == DeviceType.CPU), reverse=True)[:12]
    return dict(label=label, wall_ms=wall * 1e3, gpu_ms=gpu, launches=n, **{f"{k}_ms": v for k, v in cats.items()},
                top_kernels=kernels[:12], top_host_ops=host)


# ------------------------------------------------------------------------------------------ main
def build(path, a, graphs: bool):
    """A StandaloneRunner; decode CUDA graphs (batch ``--decode-batch`` only) when ``graphs``."""
    kw = dict(max_total_tokens=a.kv_tokens, max_running_requests=max(64, a.batch, a.decode_batch),
              mem_fraction_static=0.6)
    if graphs:
        kw.update(disable_cuda_graph=False, disable_prefill_cuda_graph=True, cuda_graph_bs_decode=[a.decode_batch])
    return common.runner(path, a.dtype, **kw)


def close_all() -> None:
    """Close every live runner (also after a failed build: then tear the distributed state down)."""
    from sglang.srt import standalone
    from sglang.srt.distributed import parallel_state as ps

    for r in list(standalone._LIVE_RUNNERS):
        r.close()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.destroy_distributed_environment()
    common.free_cuda()


def bench_shape(name: str, a) -> dict:
    path = common.checkpoint(name)
    row: dict = dict(shape=name, dtype=a.dtype)
    t = time.perf_counter()
    graphs = True
    try:
        sr = build(path, a, graphs=True)
    except Exception:
        traceback.print_exc()
        log(f"{name}: decode CUDA graphs failed to build; eager runner instead")
        close_all()
        graphs = False
        sr = build(path, a, graphs=False)
    runner = sr.runner
    log(f"{name}: runner built in {time.perf_counter() - t:.1f}s, decode graphs "
        f"{type(runner.decode_cuda_graph_runner).__name__ if graphs else 'off'}, attn {type(runner.attn_backend).__name__}")
    hf = common.hf_model(path, a.dtype)
    cfg = hf.config
    g = torch.Generator().manual_seed(7)
    B, S = a.batch, a.seq
    seqs = [[2] + torch.randint(3, 50000, (S - 1,), generator=g).tolist() for _ in range(B)]
    ids = torch.tensor(seqs, device="cuda")
    peak = a.peak_tflops * 1e12

    def record(kind, t_sgl, t_hf, fpt):
        row.update({f"{kind}_sgl_tps": B * S / t_sgl, f"{kind}_hf_tps": B * S / t_hf, f"{kind}_ratio": t_hf / t_sgl,
                    f"{kind}_sgl_mfu": B * S * fpt / t_sgl / peak, f"{kind}_hf_mfu": B * S * fpt / t_hf / peak})
        log(f"{name} {kind}: sgl {B * S / t_sgl:,.0f} tok/s  hf {B * S / t_hf:,.0f} tok/s  sgl/hf {t_hf / t_sgl:.2f}"
            f"  MFU sgl {row[f'{kind}_sgl_mfu']:.1%} hf {row[f'{kind}_hf_mfu']:.1%}")

    with torch.no_grad():
        # prefill, last-token logits
        fb = forward_batch(runner, seqs)
        sgl_prefill = lambda: runner.forward(fb)  # noqa: E731
        hf_prefill = lambda: hf(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        record("prefill", cuda_time(sgl_prefill, a.iters), cuda_time(hf_prefill, a.iters),
               flops_per_token(cfg, S, with_head=False))
        if a.ab:
            row["prefill_ab"] = ab_prefill(runner, sgl_prefill, a.iters, B * S)
        if a.profile:
            row["profile_prefill_sgl"] = kernel_summary(sgl_prefill, f"{name} prefill sglang")
            row["profile_prefill_hf"] = kernel_summary(hf_prefill, f"{name} prefill hf")

        # loss forward (MeZO): mean NLL over all B x (S-1) predicted tokens
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)
        sgl_loss = sgl_loss_fn(runner, fb, targets)
        hf_loss = lambda: hf(ids, labels=ids, use_cache=False).loss  # noqa: E731
        row["loss_sgl"], row["loss_hf"] = sgl_loss().item(), hf_loss().item()
        record("loss", cuda_time(sgl_loss, a.iters), cuda_time(hf_loss, a.iters), flops_per_token(cfg, S, with_head=True))
        log(f"{name} loss values: sgl {row['loss_sgl']:.4f} hf {row['loss_hf']:.4f}")
        if a.profile:
            row["profile_loss_sgl"] = kernel_summary(sgl_loss, f"{name} loss sglang")
            row["profile_loss_hf"] = kernel_summary(hf_loss, f"{name} loss hf")
        del fb

    # decode, batch --decode-batch, greedy
    DB, P, N = a.decode_batch, a.decode_prompt, a.decode_steps
    prompts = [[2] + torch.randint(3, 50000, (P - 1,), generator=g).tolist() for _ in range(DB)]
    try:
        sgl_decode(runner, prompts, 4)  # warm-up
        row["decode_sgl_tps"] = DB * N / statistics.median(sgl_decode(runner, prompts, N) for _ in range(2))
        row["decode_sgl_graphs"] = graphs
        if graphs:  # the same runner with its decode graph runner switched off: eager decode
            saved, runner.decode_cuda_graph_runner = runner.decode_cuda_graph_runner, None
            try:
                sgl_decode(runner, prompts, 4)
                row["decode_sgl_eager_tps"] = DB * N / sgl_decode(runner, prompts, N)
            finally:
                runner.decode_cuda_graph_runner = saved
    except Exception:
        traceback.print_exc()
    pid = torch.tensor(prompts, device="cuda")
    kw = dict(attention_mask=torch.ones_like(pid), do_sample=False, pad_token_id=1, use_cache=True)

    def gen(n):
        return hf.generate(pid, max_new_tokens=n, min_new_tokens=n, **kw)

    with torch.no_grad():
        gen(4)
        t1 = cuda_time(lambda: gen(1), 3, warmup=1)
        tn = cuda_time(lambda: gen(N + 1), 2, warmup=0)
    row["decode_hf_tps"] = DB * N / (tn - t1)
    if "decode_sgl_tps" in row:
        row["decode_ratio"] = row["decode_sgl_tps"] / row["decode_hf_tps"]
    log(f"{name} decode: sgl {row.get('decode_sgl_tps', float('nan')):,.0f} tok/s "
        f"(eager {row.get('decode_sgl_eager_tps', float('nan')):,.0f})  hf {row['decode_hf_tps']:,.0f} tok/s")
    del hf, runner
    sr.close()
    common.free_cuda()
    if a.prefill_graph:
        prefill_graph_experiment(path, a, seqs, targets, row)
    return row


def prefill_graph_experiment(path, a, seqs, targets, row) -> None:
    """EXPERIMENT (not a supported configuration): SGLang's breakable prefill CUDA graph for the native
    OPT, one bucket of B x S tokens. 0.5.17 looks for the decoder layers as ``<model>.layers`` and skips
    the prefill graph for OPT ("model does not have a 'layers' attribute"); here OPTModel gets a
    ``layers`` property for the duration. Attention runs eagerly between graph segments (through the
    configured backend: DensePrefill does not run under capture), everything else replays."""
    from sglang.srt.models import opt

    B, S = a.batch, a.seq
    opt.OPTModel.layers = property(lambda self: self.decoder.layers)
    sr = None
    try:
        sr = common.runner(path, a.dtype, max_total_tokens=a.kv_tokens, max_running_requests=max(64, B),
                           mem_fraction_static=0.6, disable_cuda_graph=False, disable_decode_cuda_graph=True,
                           cuda_graph_backend_prefill="breakable", cuda_graph_bs_prefill=[B * S])
        runner = sr.runner
        log(f"{row['shape']} prefill graph runner: {type(runner.prefill_cuda_graph_runner).__name__}")
        with torch.no_grad():
            fb = forward_batch(runner, seqs)
            tps = B * S / cuda_time(lambda: runner.forward(fb), a.iters)
            loss = sgl_loss_fn(runner, fb, targets)
            value = loss().item()
            loss_tps = B * S / cuda_time(loss, a.iters)
        row.update(prefill_graph_tps=tps, prefill_graph_ratio=tps / row["prefill_hf_tps"], loss_graph_tps=loss_tps,
                   loss_graph_ratio=loss_tps / row["loss_hf_tps"], loss_graph_value=value)
        log(f"{row['shape']} EXPERIMENT breakable prefill graph: prefill {tps:,.0f} tok/s ({tps / row['prefill_hf_tps']:.2f}x HF),"
            f" loss {loss_tps:,.0f} tok/s ({loss_tps / row['loss_hf_tps']:.2f}x HF), loss value {value:.4f}"
            f" (eager {row['loss_sgl']:.4f})")
    except Exception:
        traceback.print_exc()
    finally:
        del opt.OPTModel.layers
        if sr is not None:
            sr.close()
        close_all()


def table(rows, a) -> str:
    def k(x):
        return f"{x / 1e3:,.0f}k" if x == x else "n/a"

    def r(x):
        return f"{x:.2f}" if isinstance(x, float) else "n/a"

    def p(x):
        return f"{100 * x:.1f}%" if isinstance(x, float) else "n/a"

    out = [f"OPT native SGLang vs HF, {a.dtype}, prefill/loss batch {a.batch}x{a.seq}, decode batch "
           f"{a.decode_batch} (prompt {a.decode_prompt}, {a.decode_steps} steps); tok/s; ratio = SGLang/HF; "
           f"MFU vs {a.peak_tflops:.0f} TFLOP/s",
           "| shape | prefill SGL | prefill HF | ratio | MFU SGL | MFU HF | loss SGL | loss HF | ratio | MFU SGL | MFU HF "
           "| decode SGL (graphs) | decode SGL (eager) | decode HF | ratio |",
           "|---|" + "---|" * 14]
    for x in rows:
        out.append(
            f"| {x['shape']} | {k(x.get('prefill_sgl_tps', float('nan')))} | {k(x.get('prefill_hf_tps', float('nan')))} "
            f"| {r(x.get('prefill_ratio'))} | {p(x.get('prefill_sgl_mfu'))} | {p(x.get('prefill_hf_mfu'))} "
            f"| {k(x.get('loss_sgl_tps', float('nan')))} | {k(x.get('loss_hf_tps', float('nan')))} | {r(x.get('loss_ratio'))} "
            f"| {p(x.get('loss_sgl_mfu'))} | {p(x.get('loss_hf_mfu'))} "
            f"| {k(x.get('decode_sgl_tps', float('nan'))) if x.get('decode_sgl_graphs') else 'n/a'} "
            f"| {k(x.get('decode_sgl_eager_tps', x.get('decode_sgl_tps', float('nan')) if not x.get('decode_sgl_graphs') else float('nan')))} "
            f"| {k(x.get('decode_hf_tps', float('nan')))} | {r(x.get('decode_ratio'))} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="opt-125m,opt-350m,opt-1.3b")
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--kv-tokens", type=int, default=32768, help="KV pool size (max_total_tokens)")
    ap.add_argument("--peak-tflops", type=float, default=800.0)
    ap.add_argument("--profile", action="store_true", help="also profile one prefill and one loss call per side")
    ap.add_argument("--ab", action="store_true", help="also measure prefill with each opt.py fast path switched off")
    ap.add_argument("--prefill-graph", action="store_true",
                    help="EXPERIMENT: also measure prefill/loss under a breakable prefill CUDA graph")
    ap.add_argument("--json", type=Path, help="write the rows here")
    a = ap.parse_args()
    import sglang
    import transformers

    log(f"sglang {sglang.__version__} ({Path(sglang.__file__).parent}), transformers {transformers.__version__}, "
        f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    rows = []
    for name in a.shapes.split(","):
        try:
            rows.append(bench_shape(name, a))
        except Exception:
            traceback.print_exc()
            rows.append(dict(shape=name, error=True))
            try:
                close_all()
            except Exception:
                traceback.print_exc()
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    log("\n" + table(rows, a))


if __name__ == "__main__":
    main()
