#!/usr/bin/env python3
"""Native SGLang OPT vs HuggingFace on one GPU, measured side by side in one run; prints ONE table.

    PYTHONPATH=/tmp/site:. python3 benchmarks/bench_opt.py --shapes opt-125m,opt-350m,opt-1.3b

(scripts/device/run_gpu.sh runs it on the device.) Random weights at the real OPT shapes
(gpu_shared/common.py), one dtype (default bf16), CUDA events around each measured call,
median of --iters after warm-up.

Workloads (same work on both sides):
- prefill: B x S tokens, logits for the last token only, no KV cache on the HF side
  (``use_cache=False``, ``logits_to_keep=1``). SGLang: the scoring path of ``sglang.overlay``
  (``final_hidden_states`` without keeping the K/V: the dense scoring engine, ``sglang.overlay.dense``, no attention
  backend metadata, no K/V writes), then the head at the last rows. Also reported: the same with
  the K/V written ("prefill+kv") and through ``ModelRunner.forward`` ("prefill runner": backend
  metadata, K/V writes, the LogitsProcessor). SGLang's runner keeps prefill CUDA graphs
  (``--prefill-graphs``), so repeated calls replay one.
- loss (MeZO's forward): mean next-token NLL over all B x (S-1) predicted tokens. SGLang: the same
  scoring path -> ``forward.target_logprobs`` (lm_head in the model dtype, fp32 log-sum-exp in
  one read), what ``StandaloneRunner.loss`` runs; HF: ``model(ids, labels=ids, use_cache=False).loss``
  (head in the model dtype, ``cross_entropy`` of the fp32 upcast).
- decode: batch 64, prompt P tokens, N greedy tokens; both sides: time of N+1 new tokens minus time
  of 1. SGLang: ``StandaloneRunner.generate`` (decode CUDA graphs when they capture, eager
  otherwise; both reported); HF: ``generate`` (greedy, dynamic cache).
Decode against the hardware: a decode step must read every weight once (the tied embedding as the head) and
the K/V of the whole batch (2 x layers x hidden x dtype bytes a token, at the mean context P + (N+1)/2);
those bytes over the step time (batch / tok/s) are reported as a fraction of the HBM bandwidth measured at
the start of the run (a device-to-device copy, bytes read + written).
MFU (prefill and loss): FLOP/token = 2 x (matmul params of the decoder, + lm_head for loss)
+ causal attention 2 x layers x hidden x S (QK^T and PV over S/2 keys on average), against
the bf16 matmul peak measured at the start of the run on the same GPU (an 8192^3 GEMM, CUDA events,
median; ~800 TFLOP/s on the device's H100), or ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from measure import copy_bandwidth, cuda_time, kernel_summary, log, matmul_peak_tflops  # noqa: E402

from gpu_shared import common  # noqa: E402


def decode_step_bytes(model, batch: int, prompt: int, steps: int) -> float:
    """Bytes one decode step of ``batch`` sequences must read: the weights once + the K/V at the mean context."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    elt = next(model.parameters()).element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.hidden_size * elt
    return weights + batch * kv_per_token * (prompt + (steps + 1) / 2)


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
    """The ForwardBatch of one EXTEND of ``seqs`` (``sglang.overlay``), built once: the timed
    calls are the forward alone."""
    from sglang.overlay import compat, forward

    return compat.forward_batch_of(runner, forward.extend_batch(runner, seqs))


def sgl_fns(runner, engine, fb, last_rows, rows, targets) -> dict:
    """SGLang's side of the workloads on one ForwardBatch. "prefill" / "loss": the final hidden
    states from ``forward.final_hidden_states`` without keeping the K/V (what StandaloneRunner's
    scoring calls run: the dense scoring engine on the GPU), then the head at the last
    rows (prefill) or ``target_logprobs`` at the predicting rows (loss: MeZO's forward).
    "prefill+kv": the same, writing the K/V. "prefill runner": ``ModelRunner.forward`` (attention
    backend metadata, K/V writes, the LogitsProcessor's last-token logits)."""
    from sglang.overlay.forward import final_hidden_states, head_logits, target_logprobs

    vocab = runner.model_config.vocab_size

    def prefill(keep_kv: bool):
        def run():
            hidden, head = final_hidden_states(runner, fb, engine=engine, keep_kv=keep_kv)
            return head_logits(hidden[last_rows], head, vocab)

        return run

    def loss():
        hidden, head = final_hidden_states(runner, fb, engine=engine, keep_kv=False)
        return -target_logprobs(hidden[rows], head, vocab, targets).mean()

    return {
        "prefill": prefill(False),
        "prefill+kv": prefill(True),
        "prefill runner": lambda: runner.forward(fb),
        "loss": loss,
    }


FAST_PATHS = ("dense_prefill", "fc1_relu", "add_layer_norm", "prefill_graphs")


@contextlib.contextmanager
def fast_paths_off(engine, off: set):
    """The dense scoring engine with the named GPU fast paths switched off (FAST_PATHS;
    "dense_prefill" off: the engine declines and ModelRunner.forward runs), and fresh prefill graphs
    (captured again for what is on) when they stay on."""
    from sglang.overlay import dense
    from sglang.overlay.graphs import enable_graphs
    from sglang.srt.layers import add_layernorm

    plan, triton = dense.DensePrefill.__dict__["plan"], add_layernorm.triton
    fused = engine.fuse_fc1_relu
    max_graphs = 0 if engine.graphs is None else engine.graphs.max_graphs
    if "dense_prefill" in off:
        dense.DensePrefill.plan = classmethod(lambda cls, *a: None)
    if "add_layer_norm" in off:
        add_layernorm.triton = None
    engine.fuse_fc1_relu = fused and "fc1_relu" not in off
    enable_graphs(engine, 0 if "prefill_graphs" in off else max_graphs)
    try:
        yield
    finally:
        dense.DensePrefill.plan, add_layernorm.triton = plan, triton
        engine.fuse_fc1_relu = fused
        enable_graphs(engine, max_graphs)


def ab_prefill(engine, fns: dict, iters: int, tokens: int) -> dict:
    """Prefill tok/s on the same runner with every fast path on, with each one switched off alone,
    and with all of them off; then with the K/V written, and through ModelRunner.forward."""
    out = {}
    for label, off in [("all on", set())] + [(f"-{p}", {p}) for p in FAST_PATHS] + [("all off", set(FAST_PATHS))]:
        with fast_paths_off(engine, off):
            out[label] = tokens / cuda_time(fns["prefill"], iters)
    out["-skip_kv_writes"] = tokens / cuda_time(fns["prefill+kv"], iters)
    out["-dense_engine"] = tokens / cuda_time(fns["prefill runner"], iters)
    log("  A/B prefill tok/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in out.items()))
    return out


# ------------------------------------------------------------------------------------------ main
def build(path, a, graphs: bool):
    """A StandaloneRunner; decode CUDA graphs (batch ``--decode-batch`` only) when ``graphs``."""
    kw = dict(
        max_total_tokens=a.kv_tokens,
        max_running_requests=max(64, a.batch, a.decode_batch),
        mem_fraction_static=0.6,
        prefill_graphs=a.prefill_graphs,
    )
    if graphs:
        kw.update(cuda_graphs=True, cuda_graph_batch_sizes=(a.decode_batch,))
    return common.runner(path, a.dtype, **kw)


def close_all() -> None:
    """Close every live runner (also after a failed build: then tear the distributed state down)."""
    from sglang.overlay import runner as overlay_runner
    from sglang.srt.distributed import parallel_state as ps

    for r in list(overlay_runner._LIVE_RUNNERS):
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
    log(
        f"{name}: runner built in {time.perf_counter() - t:.1f}s, decode graphs "
        f"{type(runner.decode_cuda_graph_runner).__name__ if graphs else 'off'}, attn {type(runner.attn_backend).__name__}"
    )
    hf = common.hf_model(path, a.dtype)
    cfg = hf.config
    g = torch.Generator().manual_seed(7)
    B, S = a.batch, a.seq
    seqs = [[2] + torch.randint(3, 50000, (S - 1,), generator=g).tolist() for _ in range(B)]
    ids = torch.tensor(seqs, device="cuda")
    peak = a.peak_tflops * 1e12

    def record(kind, t_sgl, t_hf, fpt):
        row.update(
            {
                f"{kind}_sgl_tps": B * S / t_sgl,
                f"{kind}_hf_tps": B * S / t_hf,
                f"{kind}_ratio": t_hf / t_sgl,
                f"{kind}_sgl_mfu": B * S * fpt / t_sgl / peak,
                f"{kind}_hf_mfu": B * S * fpt / t_hf / peak,
            }
        )
        log(
            f"{name} {kind}: sgl {B * S / t_sgl:,.0f} tok/s  hf {B * S / t_hf:,.0f} tok/s  sgl/hf {t_hf / t_sgl:.2f}"
            f"  MFU sgl {row[f'{kind}_sgl_mfu']:.1%} hf {row[f'{kind}_hf_mfu']:.1%}"
        )

    with torch.no_grad():
        # prefill (last-token logits) and loss (MeZO: mean NLL over all B x (S-1) predicted tokens)
        fb = forward_batch(runner, seqs)
        pos = torch.arange(B * S, device="cuda").view(B, S)
        fns = sgl_fns(runner, sr.engine, fb, pos[:, -1], pos[:, :-1].reshape(-1), ids[:, 1:].reshape(-1))
        hf_prefill = lambda: hf(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        t_hf = cuda_time(hf_prefill, a.iters)
        record("prefill", cuda_time(fns["prefill"], a.iters), t_hf, flops_per_token(cfg, S, with_head=False))
        for kind in ("prefill+kv", "prefill runner"):
            t = cuda_time(fns[kind], a.iters)
            row[f"{kind}_ratio".replace(" ", "_")] = t_hf / t
            log(f"{name} {kind}: sgl {B * S / t:,.0f} tok/s  sgl/hf {t_hf / t:.2f}")
        if a.ab:
            row["prefill_ab"] = ab_prefill(sr.engine, fns, a.iters, B * S)
        if a.profile:
            row["profile_prefill_sgl"] = kernel_summary(fns["prefill"], f"{name} prefill sglang")
            row["profile_prefill_hf"] = kernel_summary(hf_prefill, f"{name} prefill hf")

        hf_loss = lambda: hf(ids, labels=ids, use_cache=False).loss  # noqa: E731
        row["loss_sgl"], row["loss_hf"] = fns["loss"]().item(), hf_loss().item()
        record(
            "loss",
            cuda_time(fns["loss"], a.iters),
            cuda_time(hf_loss, a.iters),
            flops_per_token(cfg, S, with_head=True),
        )
        log(f"{name} loss values: sgl {row['loss_sgl']:.4f} hf {row['loss_hf']:.4f}")
        if a.profile:
            row["profile_loss_sgl"] = kernel_summary(fns["loss"], f"{name} loss sglang")
            row["profile_loss_hf"] = kernel_summary(hf_loss, f"{name} loss hf")
        fb = fns = None

    # decode, batch --decode-batch, greedy; both sides: time of N+1 new tokens minus time of 1
    DB, P, N = a.decode_batch, a.decode_prompt, a.decode_steps
    prompts = [[2] + torch.randint(3, 50000, (P - 1,), generator=g).tolist() for _ in range(DB)]

    def decode_tps(gen) -> float:
        with torch.no_grad():
            gen(4)
            t1 = cuda_time(lambda: gen(1), 3, warmup=1)
            tn = cuda_time(lambda: gen(N + 1), 2, warmup=0)
        return DB * N / (tn - t1)

    try:
        row["decode_sgl_tps"] = decode_tps(lambda n: sr.generate(prompts, n))
        row["decode_sgl_graphs"] = graphs
        if graphs:  # the same runner with its decode graph runner switched off: eager decode
            saved, runner.decode_cuda_graph_runner = runner.decode_cuda_graph_runner, None
            try:
                row["decode_sgl_eager_tps"] = decode_tps(lambda n: sr.generate(prompts, n))
            finally:
                runner.decode_cuda_graph_runner = saved
    except Exception:
        traceback.print_exc()
    pid = torch.tensor(prompts, device="cuda")
    kw = dict(attention_mask=torch.ones_like(pid), do_sample=False, pad_token_id=1, use_cache=True)
    row["decode_hf_tps"] = decode_tps(lambda n: hf.generate(pid, max_new_tokens=n, min_new_tokens=n, **kw))
    if "decode_sgl_tps" in row:
        row["decode_ratio"] = row["decode_sgl_tps"] / row["decode_hf_tps"]
    row["decode_step_bytes"] = decode_step_bytes(hf, DB, P, N)
    for side in ("sgl", "sgl_eager", "hf"):  # bytes / step time, step time = batch / tok/s
        if f"decode_{side}_tps" in row:
            row[f"decode_{side}_hbm"] = row["decode_step_bytes"] * row[f"decode_{side}_tps"] / DB / (a.hbm_tb_s * 1e12)
    log(
        f"{name} decode: sgl {row.get('decode_sgl_tps', float('nan')):,.0f} tok/s "
        f"(eager {row.get('decode_sgl_eager_tps', float('nan')):,.0f})  hf {row['decode_hf_tps']:,.0f} tok/s"
    )
    hf = runner = None  # the runner closes below; HF goes first
    sr.close()
    common.free_cuda()
    return row


def table(rows, a) -> str:
    def k(x):
        return f"{x / 1e3:,.0f}k" if x == x else "n/a"

    def r(x):
        return f"{x:.2f}" if isinstance(x, float) else "n/a"

    def p(x):
        return f"{100 * x:.1f}%" if isinstance(x, float) else "n/a"

    out = [
        f"OPT native SGLang vs HF, {a.dtype}, prefill/loss batch {a.batch}x{a.seq}, decode batch "
        f"{a.decode_batch} (prompt {a.decode_prompt}, {a.decode_steps} steps); tok/s; ratio = SGLang/HF; "
        f"MFU vs {a.peak_tflops:.0f} TFLOP/s",
        "| shape | prefill SGL | prefill HF | ratio | MFU SGL | MFU HF | ratio +K/V | ratio runner | loss SGL | loss HF "
        "| ratio | MFU SGL | MFU HF | decode SGL (graphs) | decode SGL (eager) | decode HF | ratio |",
        "|---|" + "---|" * 16,
    ]
    for x in rows:
        out.append(
            f"| {x['shape']} | {k(x.get('prefill_sgl_tps', float('nan')))} | {k(x.get('prefill_hf_tps', float('nan')))} "
            f"| {r(x.get('prefill_ratio'))} | {p(x.get('prefill_sgl_mfu'))} | {p(x.get('prefill_hf_mfu'))} "
            f"| {r(x.get('prefill+kv_ratio'))} | {r(x.get('prefill_runner_ratio'))} "
            f"| {k(x.get('loss_sgl_tps', float('nan')))} | {k(x.get('loss_hf_tps', float('nan')))} | {r(x.get('loss_ratio'))} "
            f"| {p(x.get('loss_sgl_mfu'))} | {p(x.get('loss_hf_mfu'))} "
            f"| {k(x.get('decode_sgl_tps', float('nan'))) if x.get('decode_sgl_graphs') else 'n/a'} "
            f"| {k(x.get('decode_sgl_eager_tps', x.get('decode_sgl_tps', float('nan')) if not x.get('decode_sgl_graphs') else float('nan')))} "
            f"| {k(x.get('decode_hf_tps', float('nan')))} | {r(x.get('decode_ratio'))} |"
        )
    out += [
        "",
        f"Decode against the hardware: batch {a.decode_batch}, prompt {a.decode_prompt}, {a.decode_steps} steps; "
        f"bytes a step must read (weights + K/V at the mean context) over the step time, against the "
        f"{a.hbm_tb_s:.2f} TB/s a device-to-device copy moved in this run",
        "| shape | MB / step | SGL step ms | SGL TB/s | SGL % of HBM | SGL eager % | HF step ms | HF % of HBM |",
        "|---|" + "---|" * 7,
    ]
    for x in rows:
        if "decode_step_bytes" not in x:
            continue

        def ms(side: str, x: dict = x) -> str:
            return f"{1e3 * a.decode_batch / x[f'decode_{side}_tps']:.2f}" if f"decode_{side}_tps" in x else "n/a"

        out.append(
            f"| {x['shape']} | {x['decode_step_bytes'] / 1e6:,.0f} | {ms('sgl')} "
            f"| {r(x['decode_sgl_hbm'] * a.hbm_tb_s) if 'decode_sgl_hbm' in x else 'n/a'} "
            f"| {p(x.get('decode_sgl_hbm'))} | {p(x.get('decode_sgl_eager_hbm'))} | {ms('hf')} | {p(x.get('decode_hf_hbm'))} |"
        )
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
    ap.add_argument("--peak-tflops", type=float, help="the bf16 peak for MFU (default: measured at the start)")
    ap.add_argument("--profile", action="store_true", help="also profile one prefill and one loss call per side")
    ap.add_argument("--ab", action="store_true", help="also measure prefill with each opt.py fast path switched off")
    ap.add_argument(
        "--prefill-graphs",
        type=int,
        default=4,
        help="RunnerConfig.prefill_graphs: CUDA graphs of the decoder for repeated prefills (0: off)",
    )
    ap.add_argument("--json", type=Path, help="write the rows here")
    a = ap.parse_args()
    import transformers

    import sglang

    log(
        f"sglang {sglang.__version__} ({Path(sglang.__file__).parent}), transformers {transformers.__version__}, "
        f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    if a.peak_tflops is None:
        a.peak_tflops = matmul_peak_tflops()
        log(f"bf16 matmul peak measured: {a.peak_tflops:.0f} TFLOP/s (8192^3)")
    a.hbm_tb_s = copy_bandwidth() / 1e12
    log(f"HBM bandwidth measured: {a.hbm_tb_s:.2f} TB/s (a 2 GiB device-to-device copy, read + written)")
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
