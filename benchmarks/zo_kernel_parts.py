#!/usr/bin/env python3
"""Where the time of one z pass goes: the pass kernel (sglang/overlay/mezo/noise.py) timed in parts.

    PYTHONPATH=/tmp/site:. python3 benchmarks/zo_kernel_parts.py [--shape opt-1.3b --dtype bfloat16]

The weights of ``--shape`` (HF parameter shapes, tied head once; random values, made on the GPU) go
through ``NoisePass`` as MeZO's trainer builds it, and each variant of the kernel is timed with CUDA
events (median of 20 after 5 warm-ups), side by side in one run:

- copy: the same kernel without noise (``w = k * w``): the table walk, loads and stores;
- Philox rounds 0 / 10 (10 is z's definition; 0 only times the cost of the rounds, its values are not z),
  one stream and two (the folded pass);
- hardware transcendentals (``fast`` 1: sin / cos, 2: also log with a polynomial near u = 1, 3: the
  hardware log everywhere) against the precise ones, with the largest |z - z| against the precise kernel
  over the model's whole offset range (fp32 zeros plus z);
- the block layouts (``NoisePass.LAYOUT``: joined, rows of four, vectors of four);
- the block size (elements per program) and the warps per program, with the fast functions;
- a device-to-device copy of the same bytes: the memory floor.

Prints a table: ms per pass and the fraction of the copy floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from gpu_shared import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument(
        "--blocks-only",
        action="store_true",
        help="only layout 2's sweep (BLOCK 2048 / 4096, 4 / 8 warps, no cap / 48 / 40 registers), not the variants",
    )
    ap.add_argument(
        "--once",
        action="store_true",
        help="only the default pass, 1 stream then 2, twice each (for a profiler: ncu -k regex:zo_pass_kernel)",
    )
    a = ap.parse_args()
    from measure import copy_bandwidth, cuda_time
    from transformers import OPTConfig, OPTForCausalLM

    from sglang.overlay.mezo.noise import NoisePass, Stream

    dtype = getattr(torch, a.dtype)
    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig(**common.COMMON, **common.SHAPES[a.shape]))
    tensors, bases, base = {}, {}, 0
    for name, p in model.named_parameters():  # tied lm_head is listed once
        tensors[name] = torch.randn(p.shape, device="cuda", dtype=dtype) * 0.02
        bases[name], base = base, base + p.numel()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    noise = NoisePass(tensors, bases)
    assert noise.uses_kernel()
    if a.once:
        for _ in range(2):
            noise([Stream(7, 1e-3, 0.0)])
            noise([Stream(7, 1e-3, 0.0), Stream(8, 1e-3, 0.0)])
        torch.cuda.synchronize()
        return
    floor = 2 * nbytes / copy_bandwidth(nbytes)  # a device-to-device copy of the same bytes
    one, two = [Stream(7, 0.0, 0.0)], [Stream(7, 0.0, 0.0), Stream(8, 0.0, 0.0)]
    rows = [("device-to-device copy of the same bytes", floor, "")]
    rows.append(
        (
            "pass kernel, no noise (w = k w), layout 2",
            cuda_time(lambda: noise._kernel_pass(one, 1.0, noise=False), 20, 5),
            "",
        )
    )
    rows.append(
        (
            "pass kernel, no noise (w = k w), layout 1",
            cuda_time(lambda: noise._kernel_pass(one, 1.0, noise=False, layout=1), 20, 5),
            "",
        )
    )
    variants = [  # (label, _kernel_pass arguments); rounds 7 only times a cheaper Philox: its values are not z
        ("joined, Philox 0, precise", dict(rounds=0, layout=0)),
        ("joined, Philox 10, precise (z)", dict(layout=0)),
        ("joined, fast 1 (sin/cos)", dict(fast=1, layout=0)),
        ("joined, fast 2 (sin/cos, log + polynomial)", dict(fast=2, layout=0)),
        ("joined, fast 3 (sin/cos/log)", dict(fast=3, layout=0)),
        ("rows of four, Philox 10, precise", dict(layout=1)),
        ("rows of four, fast 1", dict(fast=1, layout=1)),
        ("rows of four, fast 2", dict(fast=2, layout=1)),
        ("rows of four, fast 2, Philox 7 (not z)", dict(fast=2, layout=1, rounds=7)),
        ("rows of four, fast 2, Philox 0 (not z)", dict(fast=2, layout=1, rounds=0)),
        ("vectors of four, fast 2", dict(fast=2, layout=2)),
        ("vectors of four, fast 2, Philox 7 (not z)", dict(fast=2, layout=2, rounds=7)),
        ("vectors of four, fast 2, Philox 0 (not z)", dict(fast=2, layout=2, rounds=0)),
    ]

    def z(**kw) -> dict[str, torch.Tensor]:
        """z itself over every offset (fp32 zeros + z) from the kernel variant ``kw``."""
        out = {name: torch.zeros(t.shape, device="cuda", dtype=torch.float32) for name, t in tensors.items()}
        NoisePass(out, bases)._kernel_pass([Stream(7, 1.0, 0.0)], 1.0, **kw)
        return out

    exact = z(layout=0)
    for label, kw in [] if a.blocks_only else variants:
        for n_label, streams in (("1 stream", one), ("2 streams", two)):
            t = cuda_time(lambda streams=streams, kw=kw: noise._kernel_pass(streams, 1.0, **kw), 20, 5)
            accuracy = ""
            if n_label == "1 stream" and kw.get("rounds", 10) == 10:
                accuracy = f"{max(float((v - exact[k]).abs().max()) for k, v in z(**kw).items()):.2e}"
            rows.append((f"{label}, {n_label}", t, accuracy))
    if a.blocks_only:  # layout 2: the block, the warps and a register cap (occupancy against spills)
        sweep = [(2, b, w, r) for b in (2048, 4096) for w in (4, 8) for r in (None, 48, 40)]
    else:
        sweep = [(layout, block, 4, None) for layout in (1, 2) for block in (1024, 4096)]
        sweep += [(2, block, 8, None) for block in (1024, 2048, 4096, 8192)]
    for layout, block, warps, maxnreg in sweep:  # with the fast functions
        sized = NoisePass(tensors, bases)
        sized.BLOCK, sized.WARPS, sized.MAXNREG = block, warps, maxnreg
        for n_label, streams in (("1 stream", one), ("2 streams", two)):
            t = cuda_time(
                lambda sized=sized, streams=streams, layout=layout: sized._kernel_pass(
                    streams, 1.0, fast=2, layout=layout
                ),
                20,
                5,
            )
            cap = "" if maxnreg is None else f", at most {maxnreg} registers"
            default = f"default {NoisePass.LAYOUT}, {NoisePass.BLOCK}, {NoisePass.WARPS}"
            rows.append((f"layout {layout}, fast 2, BLOCK {block}, {warps} warps{cap} ({default}), {n_label}", t, ""))
    print(
        f"z pass over the {a.shape} weights: {len(tensors)} tensors, {nbytes / 1e9:.2f} GB {a.dtype}, "
        f"{torch.cuda.get_device_name(0)}; copy floor {2 * nbytes / floor / 1e12:.2f} TB/s (read + written)"
    )
    print("| variant | ms | x copy floor | max abs z diff vs the precise kernel (fp32) |")
    print("|---|---|---|---|")
    for label, t, accuracy in rows:
        print(f"| {label} | {t * 1e3:.3f} | {t / floor:.2f} | {accuracy} |")


if __name__ == "__main__":
    main()
