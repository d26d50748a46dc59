#!/usr/bin/env python3
"""How far half-precision OPT forwards stray from fp32, over many token sets; prints ONE table.

    PYTHONPATH=/tmp/site:. python3 benchmarks/parity_spread.py --shapes opt-125m --sets 8

(``bash scripts/device/run_gpu.sh spread`` runs it on the device.) The parity test
(tests/gpu/test_opt_gpu.py) asks that SGLang's argmax agree with an fp32 forward at least as often
as HF's own half-precision forward does, less a margin. This script measures how much that agreement
moves from one token set to the next, and which of the native model's GPU paths move it: each token
set is the test's 7 sequences (2048 tokens) drawn with another seed, and each variant's final hidden
states at every position go through the same fp32 head (gpu_shared/common.py).

Variants: ``sgl`` (the native OPT as shipped), ``sgl-torch-ln`` (torch's add and LayerNorm instead
of the fused Triton kernel), ``sgl-backend-attn`` (the Triton backend's extend attention instead of
the dense engine's torch flash kernels), ``hf-sdpa`` (HF as the test runs it), ``hf-eager`` (HF's eager
attention: another valid half-precision forward).
Columns: mean argmax agreement with fp32 over the sets, its standard deviation and minimum, the mean
relative error vs fp32, the per-set difference to ``hf-sdpa`` (mean, standard deviation, worst), and
McNemar's paired count over all sets: positions only the variant gets wrong, only ``hf-sdpa`` gets
wrong, and z = (worse - better) / sqrt(worse + better) (|z| < 3 for two equally accurate forwards).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gpu_shared import common  # noqa: E402

SGL_VARIANTS = ("sgl", "sgl-torch-ln", "sgl-backend-attn")
HF_VARIANTS = ("hf-sdpa", "hf-eager")


def metrics(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Relative error vs fp32 and, per position, whether the argmax is fp32's."""
    rel = ((out - ref).norm() / ref.norm()).item()
    return rel, out.argmax(-1) == ref.argmax(-1)


@contextlib.contextmanager
def sgl_variant(name: str):
    """The native OPT's scoring path with one of its GPU paths swapped for the generic one."""
    from sglang.overlay import dense
    from sglang.srt.layers import add_layernorm

    saved_triton, saved_plan = add_layernorm.triton, dense.DensePrefill.__dict__["for_lengths"]
    if name == "sgl-torch-ln":
        add_layernorm.triton = None
    elif name == "sgl-backend-attn":  # the engine declines every plan: ModelRunner.forward with the backend
        dense.DensePrefill.for_lengths = classmethod(lambda cls, *args, **kwargs: None)
    try:
        yield
    finally:
        add_layernorm.triton, dense.DensePrefill.for_lengths = saved_triton, saved_plan


def measure(shape: str, dtypes: list[str], sets_count: int) -> list[dict]:
    path = common.checkpoint(shape)
    sets = common.token_sets(sets_count)
    ref32 = common.hf_logits_per_set(path, "float32", sets)
    rows = []
    for dtype in dtypes:
        per_variant: dict[str, list[tuple[float, torch.Tensor]]] = {}
        with common.runner(path, dtype) as r:
            for name in SGL_VARIANTS:
                with sgl_variant(name):
                    per_variant[name] = [metrics(common.sgl_logits(r, seqs)[0], ref) for seqs, ref in zip(sets, ref32)]
        common.free_cuda()
        for name in HF_VARIANTS:
            outs = common.hf_logits_per_set(path, dtype, sets, name.split("-", 1)[1])
            per_variant[name] = [metrics(out, ref) for out, ref in zip(outs, ref32)]
        base = [right for _, right in per_variant["hf-sdpa"]]
        for name, values in per_variant.items():
            agrees = [right.float().mean().item() for _, right in values]
            diffs = [a - b.float().mean().item() for a, b in zip(agrees, base)]
            # McNemar: positions only this variant gets wrong vs only hf-sdpa gets wrong, over all sets.
            worse = sum(int((~right & hf).sum()) for (_, right), hf in zip(values, base))
            better = sum(int((right & ~hf).sum()) for (_, right), hf in zip(values, base))
            rows.append(
                dict(
                    shape=shape,
                    dtype=dtype,
                    variant=name,
                    sets=len(values),
                    positions=sum(common.PARITY_LENGTHS),
                    agree_mean=statistics.fmean(agrees),
                    agree_std=statistics.stdev(agrees) if len(agrees) > 1 else 0.0,
                    agree_min=min(agrees),
                    rel_mean=statistics.fmean(rel for rel, _ in values),
                    diff_mean=statistics.fmean(diffs),
                    diff_std=statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                    diff_worst=min(diffs),
                    only_variant_wrong=worse,
                    only_hf_wrong=better,
                    mcnemar_z=(worse - better) / max(1.0, (worse + better) ** 0.5),
                    per_set=agrees,
                )
            )
            print("SPREAD " + json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="opt-125m")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        rows += measure(shape, args.dtypes.split(","), args.sets)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(
        f"\n{args.sets} token sets x {sum(common.PARITY_LENGTHS)} positions; argmax agreement with an fp32 forward; "
        "diff = the variant's agreement minus hf-sdpa's on the same set; worse / better = positions only the "
        "variant / only hf-sdpa gets wrong (all sets); z = (worse - better) / sqrt(worse + better)"
    )
    print(
        "| shape | dtype | variant | agree mean | std | min | rel vs fp32 | diff mean | diff std | diff worst "
        "| worse | better | z |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['dtype']} | {r['variant']} | {100 * r['agree_mean']:.2f}% | "
            f"{100 * r['agree_std']:.2f}% | {100 * r['agree_min']:.2f}% | {r['rel_mean']:.2e} | "
            f"{100 * r['diff_mean']:+.2f}% | {100 * r['diff_std']:.2f}% | {100 * r['diff_worst']:+.2f}% | "
            f"{r['only_variant_wrong']} | {r['only_hf_wrong']} | {r['mcnemar_z']:+.2f} |"
        )


if __name__ == "__main__":
    main()
