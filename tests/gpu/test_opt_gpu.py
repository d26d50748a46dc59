"""Native OPT on the GPU: parity with HuggingFace at real OPT shapes, and runner reuse under NCCL.

Parity: random weights (HF init) at the opt-125m / 350m / 1.3b / 6.7b shapes, fp16 and bf16.
SGLang's final hidden states at EVERY position (the scoring path, ``sglang.overlay.forward.score``)
of 4 token sets, each 7 sequences of mixed lengths (2048 tokens) prefilled in one EXTEND batch, and
HF's for the same sequences, go through the same fp32 head. An fp32 HF forward is the exact
reference. Each row is appended to $OPT_GPU_REPORT (JSON lines). Asserted over the 8192 positions:

- fp16: relative error ||sgl - hf|| / ||hf|| <= 2e-3;
- both dtypes: SGLang at least as close to the fp32 result as HF is: relative error <= 1.1x HF's,
  and McNemar's paired bound on the argmax: the positions only SGLang gets wrong exceed those only
  HF gets wrong by at most 3 sqrt(their sum) (a one-sided 3-sigma test that the two half-precision
  forwards are equally accurate);
- argmax agreement with HF >= 99.9% at every position whose fp32 top-2 margin exceeds 6x the
  rms logit error of HF's own half-precision forward there (the "clear" positions).

Why not 2e-3 / 99.9% everywhere: random-weight OPTs have near-flat logits (std ~0.5 over 50k
tokens, so the top-2 gap is often below half-precision noise), and bf16 keeps 8 bits of
mantissa. Measured at opt-125m: HF's own fp16 forward agrees with fp32 on 99.5% of the argmaxes
and its bf16 forward is 1.05e-2 from fp32 (97.8% argmax), so those bounds fail for HF itself.
Why McNemar and not a fixed margin: at bf16 each forward misses fp32's argmax at ~2.5% of the
positions, mostly different ones, so the difference of two forwards' agreement over one set of
2048 positions has a standard deviation of ~0.3% (measured over 8 sets at opt-125m: HF's eager
attention against HF sdpa was -0.59% on its worst set, SGLang -0.54%); the earlier fixed
"HF's - 0.5%" margin on one set failed by chance (benchmarks/NOTES.md, "Parity spread"). The
all-position numbers are reported in every row.

OPT_GPU_SHAPES (comma-separated) restricts the shapes.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_shared import common

REPO = Path(__file__).resolve().parents[2]
SHAPES = [s for s in os.environ.get("OPT_GPU_SHAPES", ",".join(common.SHAPES)).split(",") if s]
DTYPES = ["float16", "bfloat16"]
REL_TOL = 2e-3
ARGMAX_MIN = 0.999
LENGTHS = common.PARITY_LENGTHS  # 2048 tokens per set
SETS = 4
REPORT = Path(os.environ.get("OPT_GPU_REPORT", "/tmp/opt_gpu_parity.jsonl"))


def _hf(path, dtype, sets):
    import torch

    return torch.cat(common.hf_logits_per_set(path, dtype, sets))


@functools.lru_cache(maxsize=1)  # one shape's fp32 reference (~1.6 GB on the CPU) at a time
def _fp32_reference(shape):
    return _hf(common.checkpoint(shape), "float32", common.token_sets(SETS))


def _rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def _metrics(out, ref):
    return _rel(out, ref), (out.argmax(-1) == ref.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_all_positions(shape, dtype):
    import torch

    path = common.checkpoint(shape)
    sets = common.token_sets(SETS)
    with common.runner(path, dtype) as r:
        assert type(r.model).__module__ == "sglang.srt.models.opt", type(r.model).__module__
        sgl, last_sgl = (torch.cat(parts) for parts in zip(*(common.sgl_logits(r, seqs) for seqs in sets)))
    common.free_cuda()
    hf = _hf(path, dtype, sets)
    ref32 = _fp32_reference(shape)

    top_sgl, top_hf, top32 = sgl.argmax(-1), hf.argmax(-1), ref32.argmax(-1)
    same, sgl_right, hf_right = top_sgl == top_hf, top_sgl == top32, top_hf == top32
    rel, rel32_sgl, rel32_hf = _rel(sgl, hf), _rel(sgl, ref32), _rel(hf, ref32)
    only_sgl_wrong, only_hf_wrong = int((hf_right & ~sgl_right).sum()), int((sgl_right & ~hf_right).sum())
    ends = [n - 1 for n in itertools.accumulate(LENGTHS * SETS)]
    last_rel = _rel(last_sgl, sgl[ends])
    top2 = ref32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 6 * (hf - ref32).pow(2).mean(-1).sqrt()
    row = dict(
        shape=shape,
        dtype=dtype,
        tokens=SETS * sum(LENGTHS),
        rel_vs_hf=rel,
        argmax_vs_hf=same.float().mean().item(),
        rel_sgl_vs_fp32=rel32_sgl,
        argmax_sgl_vs_fp32=sgl_right.float().mean().item(),
        rel_hf_vs_fp32=rel32_hf,
        argmax_hf_vs_fp32=hf_right.float().mean().item(),
        only_sgl_wrong=only_sgl_wrong,
        only_hf_wrong=only_hf_wrong,
        last_token_path_rel=last_rel,
        clear_positions=clear.float().mean().item(),
        argmax_vs_hf_clear=same[clear].float().mean().item(),
    )
    print("PARITY " + json.dumps(row), flush=True)
    with REPORT.open("a") as f:
        f.write(json.dumps(row) + "\n")
    # The LogitsProcessor's own last-position logits (model-dtype head) match the all-position capture.
    assert last_rel < 1e-2, row
    if dtype == "float16":
        assert rel <= REL_TOL, row
    # SGLang's error against fp32 is HF's own half-precision error, relatively and absolutely (bf16 puts
    # HF's forward ~1e-2 from fp32, so 1.1x alone would admit 1e-3 more).
    assert rel32_sgl <= 1.1 * rel32_hf and rel32_sgl <= rel32_hf + 5e-4, row
    assert only_sgl_wrong - only_hf_wrong <= 3 * math.sqrt(only_sgl_wrong + only_hf_wrong), row
    assert row["argmax_vs_hf_clear"] >= ARGMAX_MIN, row


@pytest.mark.parametrize("lengths", [[256] * 4, [300, 7, 128, 1]], ids=["equal", "ragged"])
def test_dense_engine_matches_backend(lengths):
    """The dense scoring engine (torch SDPA for equal lengths, flash varlen otherwise, its own QKV and fc1
    GEMMs) gives the logits of the model's RadixAttention path through ModelRunner.forward with the
    configured backend, and, keeping the K/V, writes the same layer-0 K/V to the pool."""
    import torch

    from sglang.overlay import compat, forward

    path = common.checkpoint("opt-125m")
    g = torch.Generator().manual_seed(5)
    seqs = [[2] + torch.randint(3, 50000, (n - 1,), generator=g).tolist() if n > 1 else [2] for n in lengths]
    with common.runner(path, "float16") as r:
        runner, vocab, pool = r.runner, r.vocab_size, r.runner.token_to_kv_pool
        fb = compat.forward_batch_of(runner, forward.extend_batch(runner, seqs))
        hidden = r.engine.forward(fb, pool, write_kv=True)
        assert hidden is not None, "the engine declined the batch"
        fast = common.fp32_head(hidden, r.model.lm_head.weight, vocab).cpu()
        kv_fast = [b[fb.out_cache_loc].clone() for b in pool.get_kv_buffer(0)]  # layer 0: same inputs
        ref = forward.prefill(runner, seqs, all_positions=True)
        slow = common.fp32_head(ref.every_hidden_state(), ref.lm_head.weight, vocab).cpu()
        loc = ref.batch.out_cache_loc
        kv_slow = [b[loc].clone() for b in pool.get_kv_buffer(0)]
    rel, agree = _metrics(fast, slow)
    kv_equal = all(torch.equal(a, b) for a, b in zip(kv_fast, kv_slow))
    print(f"DENSE_ENGINE {lengths}: rel {rel:.2e} argmax {agree:.4f} kv_equal {kv_equal}", flush=True)
    assert kv_equal
    assert rel < 2e-3, rel


def test_three_runners_reuse_nccl():
    """Three runners alive in one process under NCCL with SGLANG_ALLOW_REUSE_DISTRIBUTED=1: one
    world, NCCL backend, identical logits (all positions and the last-token path). A fresh
    interpreter (tests/gpu/reuse_gpu.py), since distributed state is process-global."""
    path = common.checkpoint("opt-125m")
    env = dict(os.environ, SGLANG_ALLOW_REUSE_DISTRIBUTED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.gpu.reuse_gpu", str(path), "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(lines[-1][len("RESULT ") :])
    print("REUSE " + json.dumps(res), flush=True)
    assert res["alive"] == 3 and res["backend"] == "nccl" and res["world_size"] == 1, res
    assert res["closed_cleanly"] is True, res
    assert res["equal_all_positions"] == [True, True], res
    assert res["equal_last"] == [True, True], res


def test_tp2_matches_tp1():
    """Tensor parallelism: two processes, one rank each (``RunnerConfig(tp_size=2, tp_rank=r, dist_port=...)``,
    rank r on GPU r, NCCL, NVLink multicast off), against one rank on the same sequences (opt-125m, fp16):
    final hidden states at every position and the LogitsProcessor's last-token logits within 2e-3, the head's
    all-position logits (gathered over the TP group) with the same argmax at >= 99% of the positions.
    Fresh interpreters (tests/gpu/tp_gpu.py), since distributed state is process-global."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"TP=2 needs 2 GPUs, torch sees {torch.cuda.device_count()}")
    path = common.checkpoint("opt-125m")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    env.pop("SGLANG_ALLOW_REUSE_DISTRIBUTED", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.gpu.tp_gpu", str(path), "float16", "--timeout", "240"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-6000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]
    res = json.loads(lines[-1][len("RESULT ") :])
    print("TP " + json.dumps(res), flush=True)
    assert res["world_size"] == 2 and res["backend"] == "nccl", res
    assert res["devices"] == ["cuda:0", "cuda:1"], res
    assert all(rows < res["vocab"] for rows in res["head_rows"]), res  # the head really is vocab-parallel
    assert res["hidden_rel"] <= 2e-3, res
    assert res["last_logits_rel"] <= 2e-3, res
    assert res["argmax"] >= 0.99, res
