"""MeZO's noise (sglang.overlay.mezo.noise): Philox against Random123's known answers, z independent of the
layout (fused, sharded by rows or by columns), and the Triton pass kernel against the torch definition
(run by Triton's interpreter on the CPU, in a subprocess: TRITON_INTERPRET is read at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parent.parent


def test_philox_matches_random123_known_answers() -> None:
    import torch

    from sglang.overlay.mezo.noise import philox4x32

    assert [int(w) for w in philox4x32(0, torch.tensor([0]))] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    q = 0x243F6A88 | (0x85A308D3 << 32)  # c1 >= 2^31: as a negative int64
    seed = 0xA4093822 | (0x299F31D0 << 32)
    words = philox4x32(seed, torch.tensor([q - (1 << 64)]), 0x13198A2E, 0x03707344)
    assert [int(w) for w in words] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    # Philox4x32-7 (MeZOConfig.z_rounds = 7), the same file's vectors
    assert [int(w) for w in philox4x32(0, torch.tensor([0]), rounds=7)] == [
        0x5F6FB709,
        0x0D893F64,
        0x4F121F81,
        0x4F730A48,
    ]
    words = philox4x32(seed, torch.tensor([q - (1 << 64)]), 0x13198A2E, 0x03707344, rounds=7)
    assert [int(w) for w in words] == [0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A]
    words = philox4x32((1 << 64) - 1, torch.tensor([-1]), 0xFFFFFFFF, 0xFFFFFFFF, rounds=7)
    assert [int(w) for w in words] == [0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662]


def test_normal_is_standard_normal_and_decorrelated() -> None:
    import torch

    from sglang.overlay.mezo.noise import normal

    z = normal(12345, torch.arange(1 << 20) + (1 << 40))
    assert abs(z.mean().item()) < 4e-3 and abs(z.std().item() - 1) < 4e-3
    assert abs((z[:-1] * z[1:]).mean().item()) < 4e-3
    assert abs((z * normal(12346, torch.arange(1 << 20) + (1 << 40))).mean().item()) < 4e-3
    assert torch.equal(z[5:9], normal(12345, torch.arange(5, 9) + (1 << 40)))  # a function of the offset


@pytest.mark.parametrize("rounds", [10, 7])
def test_z_is_normal_with_no_short_period_and_no_lag_correlation(rounds: int) -> None:
    """Over 2^20 offsets, for z of 10 and of 7 Philox rounds (MeZOConfig.z_rounds): the moments of a standard
    normal (mean, variance, skewness, excess kurtosis within 5 standard errors), its tails (|z| > 3 and > 4 as
    often as they should be, within 5 sigma of the binomial count); no correlation at lags 1 to 8 (one
    Philox call's four words and its neighbours), at 2^k up to 2^16, between two seeds or between
    neighbouring seeds' squares (|r| < 4e-3, 4 sigma); the Kolmogorov-Smirnov distance to the
    standard normal below its 1% critical value (a short period, repeated pairs or a wrong Box-Muller
    branch fail one of these)."""
    import math

    import torch

    from sglang.overlay.mezo.noise import normal

    n = 1 << 20
    z = normal(777, torch.arange(n) + (3 << 36), rounds).double()
    moments = [z.mean(), (z**2).mean() - 1, (z**3).mean(), (z**4).mean() - 3]
    errors = [1, math.sqrt(2), math.sqrt(15), math.sqrt(96)]  # standard deviations of z, z^2, z^3, z^4
    for k, (moment, sd) in enumerate(zip(moments, errors), 1):
        assert abs(moment.item()) < 5 * sd / math.sqrt(n), (k, moment.item())
    for cut in (3.0, 4.0):
        p = math.erfc(cut / math.sqrt(2))
        count = int((z.abs() > cut).sum())
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)), (cut, count, n * p)
    for lag in [*range(1, 9), *(1 << k for k in range(4, 17))]:
        r = (z[:-lag] * z[lag:]).mean().item()
        assert abs(r) < 4e-3, (lag, r)
    other = normal(778, torch.arange(n) + (3 << 36), rounds).double()
    assert abs((z * other).mean().item()) < 4e-3
    assert abs(((z**2 - 1) * (other**2 - 1)).mean().item() / 2) < 4e-3  # magnitudes too, not only signs
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    cdf = 0.5 * (1 + torch.erf(z.sort().values / math.sqrt(2)))
    distance = max((ecdf - cdf).abs().max().item(), (cdf - (ecdf - 1 / n)).abs().max().item())
    assert distance < 1.63 / math.sqrt(n), distance


def test_the_pass_draws_each_counter_once_and_equals_the_definition() -> None:
    """normal_range (the torch pass: one Philox call per 4 offsets, in blocks whose high counter word is
    fixed) equals normal() offset by offset: unaligned starts and ends, a block boundary, and a range whose
    counters cross 2^32 (the high word changes inside it)."""
    import torch

    from sglang.overlay.mezo.noise import RANGE_BLOCK, normal, normal_range

    cases = [(0, 9), (3, 4 * RANGE_BLOCK + 6), ((1 << 34) - 4 * RANGE_BLOCK - 7, 8 * RANGE_BLOCK + 13), (5 << 40, 1)]
    for seed in (0, 0x123456789ABCDEF):
        for start, count in cases:
            blocks = list(normal_range(seed, start, count))
            assert blocks[0][0] == start and sum(z.numel() for _, z in blocks) == count
            assert all(lo + z.numel() == nxt for (lo, z), (nxt, _) in zip(blocks, blocks[1:]))
            got = torch.cat([z for _, z in blocks])
            assert torch.equal(got, normal(seed, torch.arange(start, start + count))), (seed, start, count)


def test_z_does_not_depend_on_the_layout() -> None:
    """One HF matrix [6, 8] at global offset 1000: perturbed whole, as row thirds of a fused tensor, and as
    two column shards (rows 8 long in the HF layout, 4 in the shard): the same values."""
    import torch

    from sglang.overlay.mezo.noise import NoisePass, Stream

    g = torch.Generator().manual_seed(0)
    whole = torch.randn(6, 8, generator=g)
    streams = [Stream(99, 0.5)]
    full = whole.clone()
    NoisePass({"w": full}, {"w": 1000})(streams)
    fused = torch.cat([whole, torch.randn(2, 8, generator=g)])  # other rows after it: not touched
    before = fused.clone()
    NoisePass({"w": fused[:6]}, {"w": 1000})(streams)
    assert torch.equal(fused[:6], full) and torch.equal(fused[6:], before[6:])
    for c0 in (0, 4):
        shard = whole[:, c0 : c0 + 4].contiguous()
        NoisePass({"w": shard}, {"w": 1000 + c0}, rows={"w": (4, 8)})(streams)
        assert torch.equal(shard, full[:, c0 : c0 + 4])
    rows = whole[2:5].clone()
    NoisePass({"w": rows}, {"w": 1000 + 2 * 8})(streams)
    assert torch.equal(rows, full[2:5])


def test_a_pass_is_one_fp32_expression_with_decay_only_where_asked() -> None:
    import torch

    from sglang.overlay.mezo.noise import NoisePass, Stream, normal

    w = {"a.weight": torch.randn(10), "a.bias": torch.randn(3)}
    bases = {"a.weight": 0, "a.bias": 10}
    old = {k: v.clone() for k, v in w.items()}
    NoisePass(w, bases, decays=["a.weight"])([Stream(7, 0.1, -0.2), Stream(8, 0.0, 0.3)], keep=0.9)
    for name, k in (("a.weight", 0.9), ("a.bias", 1.0)):
        offsets = torch.arange(bases[name], bases[name] + old[name].numel())
        want = k * old[name] + (k * 0.1 - 0.2) * normal(7, offsets) + 0.3 * normal(8, offsets)
        assert torch.allclose(w[name], want, atol=1e-6)


def test_layout_2_takes_only_segments_aligned_to_four_elements() -> None:
    """NoisePass.LAYOUT 2 reads and writes 4 elements at once, so it may take a segment only where its global
    offset, its length and its address are multiples of 4 elements; the others go to layout 1, in the
    same pass. (A wrong choice shows on the GPU as a misaligned access; the interpreter cannot see it.)"""
    import torch

    from sglang.overlay.mezo.noise import NoisePass

    buffer = torch.zeros(4096)
    tensors = {
        "aligned": buffer[:64],
        "offset": buffer[64:128],  # global offset 2 past a multiple of 4
        "length": buffer[128:134],  # 6 elements
        "address": buffer[138:146],  # 2 elements past an aligned address
        "rows": buffer[256:512].view(16, 16),  # rows of 16 at a stride of 32: aligned rows
        "odd_rows": buffer[512:560].view(8, 6),  # rows of 6 at a stride of 8
    }
    bases = {"aligned": 0, "offset": 1002, "length": 2000, "address": 3000, "rows": 4000, "odd_rows": 8000}
    rows = {"rows": (16, 32), "odd_rows": (6, 8)}
    noise = NoisePass(tensors, bases, rows=rows)
    segments, launches = noise._build_table(2)
    names = [name for name, *_ in noise.segments]
    taken = {layout: sorted({names[i] for i in blk_seg.tolist()}) for layout, (blk_seg, _) in launches}
    assert taken == {2: ["aligned", "rows"], 1: ["address", "length", "odd_rows", "offset"]}
    for layout in (0, 1):  # a layout asked for takes every block
        _, only = noise._build_table(layout)
        assert [lay for lay, _ in only] == [layout] and sorted({names[i] for i in only[0][1][0].tolist()}) == sorted(
            set(names)
        )


def _interpreted(script: str, *args: int):
    """What ``script`` prints after ``RESULT `` (as JSON), run with ``args`` under Triton's interpreter in a
    subprocess (TRITON_INTERPRET is read when Triton is imported)."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


KERNEL_CHECK = r"""
import json, sys, torch
from sglang.overlay.mezo import noise as zo_noise
assert zo_noise.triton is not None
out = {}
for dtype in (torch.float32, torch.float16):
    g = torch.Generator().manual_seed(1)
    shapes = {"emb": (37, 24), "qkv": (3000,), "cols": (5, 6), "tiny": (3,), "carry": (50,), "rows": (40, 64),
              "view": (9, 8)}
    base = {"emb": (1 << 33) - 5, "qkv": (1 << 33) + 900, "cols": (1 << 34) + 2, "tiny": 11,
            "carry": (1 << 34) - 10,  # its Philox counters carry into the high word inside one block
            "rows": (1 << 35) - 1024, "view": 4096}
    # "rows" and "qkv" are aligned (layout 2 takes them; "rows" carries into the high word and decays).
    # "view": offset and length aligned, its address 2 elements past an aligned one (layout 1 takes it, as
    # it takes "cols", rows of 6 at a stride of 13, and the others)
    rows = {"cols": (6, 13)}
    start = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    ref = {k: v.clone() for k, v in start.items()}
    ker = {k: v.clone() for k, v in start.items()}
    ker["view"] = torch.cat([torch.zeros(2, dtype=dtype), start["view"].flatten()])[2:].view(9, 8)
    streams = [zo_noise.Stream(0x123456789ABC, 0.25, -0.5), zo_noise.Stream(1, 0.0, 1e-2)]
    layout, rounds = int(sys.argv[1]), int(sys.argv[2])
    zo_noise.NoisePass(ref, base, decays=["emb", "rows"], rows=rows, rounds=rounds)._torch_pass(streams, 0.75)
    p = zo_noise.NoisePass(ker, base, decays=["emb", "rows"], rows=rows, rounds=rounds)
    p._kernel_pass(streams, 0.75, layout=layout)
    for one in (streams[:1],):  # one stream too
        zo_noise.NoisePass(ref, base, rows=rows, rounds=rounds)._torch_pass(one, 1.0)
        zo_noise.NoisePass(ker, base, rows=rows, rounds=rounds)._kernel_pass(one, 1.0, layout=layout)
    assert ker["view"].storage_offset() == 2
    out[str(dtype)] = {k: [float((ker[k].float() - ref[k].float()).abs().max()),
                           float((ker[k] != ref[k]).float().mean())] for k in shapes}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize(
    "layout, rounds",
    [(0, 10), (1, 10), (2, 10), (2, 7)],
    ids=["joined", "rows_of_four", "vectors_of_four", "vectors_of_four_philox7"],
)
def test_the_triton_kernel_computes_the_definition(layout: int, rounds: int) -> None:
    """The pass kernel (two streams, decay, a column-sharded tensor, offsets past 2^32) in each block layout
    (NoisePass.LAYOUT), and with z of 7 Philox rounds (MeZOConfig.z_rounds), against the torch definition,
    under Triton's CPU interpreter: fp32 within 1e-6
    (transcendentals differ in the last bit), fp16 the same after rounding except where fp32 differed at a
    rounding boundary. (bf16 is checked on the GPU: the interpreter rounds fp32 to bf16 by truncation, not
    to nearest even as the GPU does.)"""
    result = _interpreted(KERNEL_CHECK, layout, rounds)
    for name, (max_diff, _) in result["torch.float32"].items():
        assert max_diff <= 1e-6, (name, result)
    for name, (max_diff, differ) in result["torch.float16"].items():
        assert differ <= 0.01 and max_diff <= 2**-8, (name, result)


FAST_CHECK = r"""
import sys, torch
from sglang.overlay.mezo import noise as zo_noise
n, base = 1 << 14, (1 << 34) - (1 << 13)
z = {"w": torch.zeros(n)}
zo_noise.NoisePass(z, {"w": base})._kernel_pass([zo_noise.Stream(99, 1.0, 0.0)], 1.0, fast=int(sys.argv[1]))
print("RESULT", float((z["w"] - zo_noise.normal(99, torch.arange(base, base + n))).abs().max()))
"""


@pytest.mark.parametrize("fast", [1, 2])
def test_the_fast_kernels_algebra_is_z(fast: int) -> None:
    """The fast kernels (NoisePass.FAST 1: sin / cos of 2 pi (u - 1/2), negated, instead of 2 pi u; 2: also
    log u by a polynomial in u - 1 above 3/4) against the definition, under Triton's interpreter, which
    computes the hardware's functions precisely: the reduction and the polynomial are z but for rounding
    (the hardware functions themselves are checked on the GPU). 2^14 offsets hold about 2,000 u above 3/4."""
    max_diff = _interpreted(FAST_CHECK, fast)
    assert max_diff <= 2e-6, max_diff
