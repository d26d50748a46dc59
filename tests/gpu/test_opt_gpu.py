"""Native OPT on the GPU: parity with HuggingFace at real OPT shapes, and runner reuse under NCCL.

Parity: random weights (HF init) at the opt-125m / 350m / 1.3b / 6.7b shapes, fp16 and bf16.
SGLang's logits at EVERY position (tests.support.logits.prefill: a forward pre-hook on the
model's logits_processor captures the final hidden states, the head is applied in fp32) are
compared with HF's at every position (HF's final hidden states, the same fp32 head), over ~2k
tokens in 7 sequences of mixed lengths prefilled in one EXTEND batch:
relative error ||sgl - hf|| / ||hf|| <= 2e-3 and argmax agreement >= 99.9%.
An fp32 HF forward is measured as well and reported (not asserted) to show how far each side
is from the exact result.

Set OPT_GPU_SHAPES (comma-separated) to restrict the shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu import common

REPO = Path(__file__).resolve().parents[2]
SHAPES = [s for s in os.environ.get("OPT_GPU_SHAPES", ",".join(common.SHAPES)).split(",") if s]
DTYPES = ["float16", "bfloat16"]
REL_TOL = 2e-3
ARGMAX_MIN = 0.999
LENGTHS = [512, 300, 128, 37, 5, 1000, 66]  # 2048 tokens

_REF32: dict = {}  # shape -> fp32 HF logits (CPU), for the report
REPORT = Path(os.environ.get("OPT_GPU_REPORT", "/tmp/opt_gpu_parity.jsonl"))


def _seqs():
    import torch

    g = torch.Generator().manual_seed(1234)
    return [[2] + torch.randint(3, 50000, (n - 1,), generator=g).tolist() for n in LENGTHS]


def _hf_logits(path, dtype, seqs):
    import torch
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).cuda().eval()
    vocab = model.config.vocab_size
    try:
        return torch.cat([common.head(common.hf_hidden(model, s), model.lm_head.weight, vocab) for s in seqs]).cpu()
    finally:
        del model
        common.free_cuda()


def _metrics(out, ref):
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, agree


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_all_positions(shape, dtype):
    import torch

    from tests.support import logits as L
    from tests.support.runtime import build_runner

    path = common.checkpoint(shape)
    seqs = _seqs()
    common.destroy_distributed_if_any()
    runner = build_runner(path, **common.gpu_overrides(dtype))
    try:
        assert type(runner.model).__module__ == "sglang.srt.models.opt", type(runner.model).__module__
        pf = L.prefill(runner, seqs)
        sgl = torch.cat(pf.logits).cpu()
        last_sgl = pf.next_token_logits.cpu()
    finally:
        del runner
        common.destroy_distributed_if_any()
        common.free_cuda()
    hf = _hf_logits(path, dtype, seqs)
    if shape not in _REF32:
        _REF32.clear()
        _REF32[shape] = _hf_logits(path, "float32", seqs)
    ref32 = _REF32[shape]

    rel, agree = _metrics(sgl, hf)
    rel32_sgl, agree32_sgl = _metrics(sgl, ref32)
    rel32_hf, agree32_hf = _metrics(hf, ref32)
    ends = torch.tensor(L_cumsum(LENGTHS)) - 1
    last_rel = ((last_sgl - sgl[ends]).norm() / sgl[ends].norm()).item()
    row = dict(shape=shape, dtype=dtype, tokens=sum(LENGTHS), rel_vs_hf=rel, argmax_vs_hf=agree,
               rel_sgl_vs_fp32=rel32_sgl, argmax_sgl_vs_fp32=agree32_sgl,
               rel_hf_vs_fp32=rel32_hf, argmax_hf_vs_fp32=agree32_hf, last_token_path_rel=last_rel)
    print("PARITY " + json.dumps(row), flush=True)
    with REPORT.open("a") as f:
        f.write(json.dumps(row) + "\n")
    # The LogitsProcessor's own last-position logits agree with the all-position capture.
    assert last_rel < 1e-2, row
    assert rel <= REL_TOL, row
    assert agree >= ARGMAX_MIN, row


def L_cumsum(xs):
    out, s = [], 0
    for x in xs:
        s += x
        out.append(s)
    return out


def test_three_runners_reuse_nccl():
    """Three ModelRunners in one process under NCCL with SGLANG_ALLOW_REUSE_DISTRIBUTED=1:
    identical logits (all positions and last-token path), NCCL backend, one world."""
    path = common.checkpoint("opt-125m")
    env = dict(os.environ, SGLANG_ALLOW_REUSE_DISTRIBUTED="1")
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.reuse_gpu", str(path), "3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(lines[-1][len("RESULT "):])
    print("REUSE " + json.dumps(res), flush=True)
    assert res["backend"] == "nccl", res
    assert res["equal_all_positions"] == [True, True], res
    assert res["equal_last"] == [True, True], res
    assert res["alive"] == 3, res
