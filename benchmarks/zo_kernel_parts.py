#!/usr/bin/env python3
"""Where the time of one z pass goes: the pass kernel (sglang/overlay/zo_noise.py) timed in parts.

    PYTHONPATH=/tmp/site:. python3 benchmarks/zo_kernel_parts.py [--shape opt-1.3b --dtype bfloat16]

The weights of ``--shape`` (HF parameter shapes, tied head once; random values, made on the GPU) go
through ``NoisePass`` as MeZO's trainer builds it, and each variant of the kernel is timed with CUDA
events (median of 20 after 5 warm-ups), side by side in one run:

- copy: the same kernel without noise (``w = k * w``): the table walk, loads and stores;
- Philox rounds 0 / 5 / 7 / 10: noise from ``rounds`` Philox rounds (10 is z's definition; the others
  only time the cost of a round, their values are not z), one stream and two (the folded pass);
- a device-to-device copy of the same bytes: the memory floor.

Prints a table: ms per pass and the fraction of the copy floor; the cost of one Philox round and of
everything else (Box-Muller, the interleave) follow from the differences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from tests.gpu import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    a = ap.parse_args()
    from transformers import OPTConfig, OPTForCausalLM

    from bench_opt import copy_bandwidth, cuda_time
    from sglang.overlay.zo_noise import NoisePass, Stream

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
    floor = 2 * nbytes / copy_bandwidth(nbytes)  # a device-to-device copy of the same bytes
    one, two = [Stream(7, 0.0, 0.0)], [Stream(7, 0.0, 0.0), Stream(8, 0.0, 0.0)]
    rows = [("device-to-device copy of the same bytes", floor)]
    rows.append(("pass kernel, no noise (w = k w)", cuda_time(lambda: noise._kernel_pass(one, 1.0, noise=False), 20, 5)))
    for rounds in (0, 5, 7, 10):
        for label, streams in (("1 stream", one), ("2 streams", two)):
            t = cuda_time(lambda: noise._kernel_pass(streams, 1.0, rounds=rounds), 20, 5)
            rows.append((f"Philox {rounds} rounds, {label}" + (" (z)" if rounds == 10 else ""), t))
    print(f"z pass over the {a.shape} weights: {len(tensors)} tensors, {nbytes / 1e9:.2f} GB {a.dtype}, "
          f"{torch.cuda.get_device_name(0)}; copy floor {2 * nbytes / floor / 1e12:.2f} TB/s (read + written)")
    print("| variant | ms | x copy floor |")
    print("|---|---|---|")
    for label, t in rows:
        print(f"| {label} | {t * 1e3:.3f} | {t / floor:.2f} |")


if __name__ == "__main__":
    main()
