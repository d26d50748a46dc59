"""The Triton kernel of MeZO's noise pass (sglang.overlay.mezo.noise.NoisePass on CUDA): one program per block
of ``NoisePass.BLOCK`` global offsets, z from (seed, offset) as ``noise``'s docstring defines it, applied in
fp32 with one rounding per element. Imported only where Triton is."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _pairs(seed, c0, c1, ROUNDS: tl.constexpr, FAST: tl.constexpr):
    """The Box-Muller pairs of Philox counter (c0, c1, 0, 0) under seed: (r01, cos01, sin01, r23, cos23, sin23),
    where the normals of offsets 4q .. 4q + 3 (q = c1:c0) are _sign(FAST) * (r01 cos01, r01 sin01, r23 cos23,
    r23 sin23). The sign is the caller's to fold into its coefficient (a scalar), and r its to scale once per
    pair: no multiply per normal is spent on either.

    FAST = 0: precise log / sin / cos (the definition); 1: hardware sin / cos of the argument
    reduced to [-pi, pi) (sin(2 pi u) = -sin(2 pi (u - 1/2)), hence the sign); 2: also the log of ``_log``;
    3: also the hardware log everywhere (benchmarks only). Negative: Triton's interpreter (its |FAST|, with
    precise functions where the hardware's would run)."""
    seed = seed.to(tl.int64)  # below 2^31 a seed arrives as int32 (never a constexpr: do_not_specialize)
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(ROUNDS):
        # One 32 x 32 -> 64-bit product gives both words (a single wide multiply on the GPU).
        p2 = c2.to(tl.uint64) * 0xCD9E8D57
        p0 = c0.to(tl.uint64) * 0xD2511F53
        c0 = (p2 >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (p0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = p2.to(tl.uint32)
        c3 = p0.to(tl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    # r = sqrt(-2 log u): _log_times gives -2 log u with the -2 in its constants (exact: a power of two).
    r01 = tl.sqrt(_log_times(tl.maximum(_uniform_tl(c0), 1e-7), -2.0, FAST))
    r23 = tl.sqrt(_log_times(tl.maximum(_uniform_tl(c2), 1e-7), -2.0, FAST))
    if FAST == 0:
        t01 = 6.283185307179586 * _uniform_tl(c1)
        t23 = 6.283185307179586 * _uniform_tl(c3)
        return r01, tl.cos(t01), tl.sin(t01), r23, tl.cos(t23), tl.sin(t23)
    t01 = 6.283185307179586 * (_uniform_tl(c1) - 0.5)
    t23 = 6.283185307179586 * (_uniform_tl(c3) - 0.5)
    if FAST < 0:  # Triton's interpreter, which has no hardware functions: the reduced angle's algebra alone
        return r01, tl.cos(t01), tl.sin(t01), r23, tl.cos(t23), tl.sin(t23)
    return (
        r01,
        libdevice.fast_cosf(t01),
        libdevice.fast_sinf(t01),
        r23,
        libdevice.fast_cosf(t23),
        libdevice.fast_sinf(t23),
    )


@triton.jit
def _sign(FAST: tl.constexpr):
    """The sign of _pairs' normals: -1 where the angle is reduced to [-pi, pi) (FAST != 0)."""
    if FAST == 0:
        return 1.0
    return -1.0


@triton.jit
def _normals(seed, c0, c1, f, ROUNDS: tl.constexpr, FAST: tl.constexpr):
    """f times the four normals of Philox counter (c0, c1, 0, 0) under seed: offsets 4q .. 4q + 3, q = c1:c0.
    f (a scalar) and _pairs' sign are folded into r, once per pair (f = 1.0: z itself, the same bits)."""
    r01, cos01, sin01, r23, cos23, sin23 = _pairs(seed, c0, c1, ROUNDS, FAST)
    f = f * _sign(FAST)
    r01 = f * r01
    r23 = f * r23
    return r01 * cos01, r01 * sin01, r23 * cos23, r23 * sin23


@triton.jit
def _add_noise(w0, w1, w2, w3, seed, c0, c1, f, ROUNDS: tl.constexpr, FAST: tl.constexpr):
    """w_c + f * z_c for the four normals of each counter (layout 1's rows)."""
    z0, z1, z2, z3 = _normals(seed, c0, c1, f, ROUNDS, FAST)
    return w0 + z0, w1 + z1, w2 + z2, w3 + z3


@triton.jit
def _log_times(u, c: tl.constexpr, FAST: tl.constexpr):
    """c * log u, u in [1e-7, 1), c a power of two (folded into the constants: the product is exact, so this is
    c times the log below, bit for bit). |FAST| < 2: precise. 2: above 3/4, a polynomial in t = u - 1 (exact
    there; relative error 1.2e-7, so r = sqrt(-2 log u) keeps its precision where it is small); at or below, the
    hardware's log2 times ln 2 (absolute error about 1e-7, where r >= 0.75). 3: the hardware's everywhere (2e-4
    off in z where u is near 1). Under the interpreter (FAST < 0) the polynomial is computed as on the GPU and
    the hardware's log is the precise one."""
    if FAST == 3:
        return libdevice.fast_log2f(u) * (c * 0.6931471805599453)
    if FAST != 2 and FAST != -2:
        return c * tl.log(u)
    t = u - 1.0
    p = (c * 0.33390906) * t - (c * 0.08952039)
    p = p * t + (c * 0.21425246)
    p = p * t - (c * 0.24869019)
    p = p * t + (c * 0.33338976)
    p = p * t - (c * 0.49999911)
    p = p * t + c
    if FAST < 0:
        return tl.where(u > 0.75, p * t, c * tl.log(u))
    return tl.where(u > 0.75, p * t, libdevice.fast_log2f(u) * (c * 0.6931471805599453))


@triton.jit
def _uniform_tl(x):
    x = x.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _counters(g0, ROWS: tl.constexpr):
    """Philox counters (c0, c1) of q = g0 / 4 + row, row < ROWS, in 32-bit words (g0 a multiple of 4)."""
    q0 = g0 >> 2
    lo0 = (q0 & 0xFFFFFFFF).to(tl.uint32)
    hi0 = ((q0 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = lo0 + tl.arange(0, ROWS).to(tl.uint32)
    return c0, hi0 + (c0 < lo0).to(tl.uint32)


@triton.jit
def _noise_block(seed, g0, BLOCK: tl.constexpr, ROUNDS: tl.constexpr, FAST: tl.constexpr):
    """z of global offsets g0 .. g0 + BLOCK (g0 a multiple of 4), in order.

    (A [BLOCK/4, 4] tile with the four normals selected per column, measured on the H200, was 5x
    slower: Triton spreads the 4 columns over threads and each computes the row's Philox and
    Box-Muller again.)"""
    c0, c1 = _counters(g0, BLOCK // 4)
    z0, z1, z2, z3 = _normals(seed, c0, c1, 1.0, ROUNDS, FAST)
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])


# Triton turns an int argument equal to 1 into a constexpr (a Python int, no .to()) unless told not to;
# tl.to_tensor would do too, but the device's Triton (torch 2.11) lacks it.
@triton.jit(do_not_specialize=["seed0", "seed1"])
def zo_pass_kernel(
    blk_seg,
    blk_g,
    seg_ptr,
    seg_len,
    seg_base,
    seg_decay,
    seed0,
    a0,
    b0,
    seed1,
    a1,
    b1,
    keep,
    DTYPE: tl.constexpr,
    TWO: tl.constexpr,
    BLOCK: tl.constexpr,
    ROUNDS: tl.constexpr,
    NOISE: tl.constexpr,
    FAST: tl.constexpr,
    LAYOUT: tl.constexpr,
    DECAY: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """One program a block of BLOCK global offsets (blk_seg, blk_g: its segment and first offset, a multiple
    of 4). DECAY = 0: no tensor decays in this pass (k = 1, no multiply). ALIGN: LAYOUT 2's access width
    in bytes (4 elements)."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    g0 = tl.load(blk_g + pid)
    n = tl.load(seg_len + seg).to(tl.int32)  # a segment has fewer than 2^31 elements (_build_table)
    start = (g0 - tl.load(seg_base + seg)).to(tl.int32)  # the block's first element, -3 .. n
    ptr = tl.load(seg_ptr + seg).to(tl.pointer_type(DTYPE))
    if LAYOUT == 2:  # hints where the values are made: Triton drops them on a function's arguments
        start = tl.multiple_of(start, 4)
        ptr = tl.multiple_of(ptr, ALIGN)
    if DECAY:
        k = tl.where(tl.load(seg_decay + seg) != 0, keep, 1.0)
    else:
        k = 1.0
    f0 = k * a0 + b0
    f1 = k * a1 + b1
    if LAYOUT == 0:  # one tensor of the block's offsets in order (_noise_block interleaves the 4 normals)
        local = start + tl.arange(0, BLOCK)
        mask = (local >= 0) & (local < n)
        out = k * tl.load(ptr + local, mask=mask, other=0.0).to(tl.float32)
        if NOISE:
            out += f0 * _noise_block(seed0, g0, BLOCK, ROUNDS, FAST)
            if TWO:
                out += f1 * _noise_block(seed1, g0, BLOCK, ROUNDS, FAST)
        _store(ptr + local, out, mask, DTYPE)
    elif LAYOUT == 1:
        w0, w1, w2, w3, ptrs, mask = _load_rows(ptr, start, n, k, BLOCK)
        if NOISE:
            c0, c1 = _counters(g0, BLOCK // 4)
            w0, w1, w2, w3 = _add_noise(w0, w1, w2, w3, seed0, c0, c1, f0, ROUNDS, FAST)
            if TWO:
                w0, w1, w2, w3 = _add_noise(w0, w1, w2, w3, seed1, c0, c1, f1, ROUNDS, FAST)
        m0, m1, m2, m3 = mask
        _store(ptrs, w0, m0, DTYPE)
        _store(ptrs + 1, w1, m1, DTYPE)
        _store(ptrs + 2, w2, m2, DTYPE)
        _store(ptrs + 3, w3, m3, DTYPE)
    else:
        _vectors(ptr, start, n, g0, k, seed0, f0, seed1, f1, DTYPE, TWO, BLOCK, ROUNDS, NOISE, FAST, ALIGN)


@triton.jit
def _load_rows(ptr, start, n, k, BLOCK: tl.constexpr):
    """LAYOUT 1: the block as 4 rows of stride 4. Each thread's Philox call gives the normals of 4
    consecutive offsets, row c takes word c, and nothing is exchanged between threads. The loads come
    first, so that they are in flight while Philox runs. Any segment: a row masks its own elements."""
    local = start + 4 * tl.arange(0, BLOCK // 4)
    m0 = (local >= 0) & (local < n)
    m1 = (local >= -1) & (local < n - 1)
    m2 = (local >= -2) & (local < n - 2)
    m3 = (local >= -3) & (local < n - 3)
    w0 = k * tl.load(ptr + local, mask=m0, other=0.0).to(tl.float32)
    w1 = k * tl.load(ptr + local + 1, mask=m1, other=0.0).to(tl.float32)
    w2 = k * tl.load(ptr + local + 2, mask=m2, other=0.0).to(tl.float32)
    w3 = k * tl.load(ptr + local + 3, mask=m3, other=0.0).to(tl.float32)
    return w0, w1, w2, w3, ptr + local, (m0, m1, m2, m3)


@triton.jit
def _vectors(
    ptr,
    start,
    n,
    g0,
    k,
    seed0,
    f0,
    seed1,
    f1,
    DTYPE: tl.constexpr,
    TWO: tl.constexpr,
    BLOCK: tl.constexpr,
    ROUNDS: tl.constexpr,
    NOISE: tl.constexpr,
    FAST: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """LAYOUT 2: the block as [BLOCK / 4, 4], a row the 4 consecutive elements of one Philox call, held by one
    thread and read and written in one access of ALIGN bytes; the normals are joined into the row in the
    thread's registers. Only for segments whose global offset, length and address are multiples of 4
    elements (NoisePass._build_table): a row is then wholly in the segment or wholly out of it."""
    rows = start + 4 * tl.arange(0, BLOCK // 4)
    ptrs = ptr + (rows[:, None] + tl.arange(0, 4)[None, :])
    mask = ((rows >= 0) & (rows < n))[:, None]
    w = k * tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if NOISE:
        c0, c1 = _counters(g0, BLOCK // 4)
        w += _row_of_noise(seed0, c0, c1, f0, BLOCK, ROUNDS, FAST)
        if TWO:
            w += _row_of_noise(seed1, c0, c1, f1, BLOCK, ROUNDS, FAST)
    _store(ptrs, w, mask, DTYPE)


@triton.jit
def _row_of_noise(seed, c0, c1, f, BLOCK: tl.constexpr, ROUNDS: tl.constexpr, FAST: tl.constexpr):
    """f * z of each counter's 4 offsets as the rows of a [BLOCK / 4, 4] tile (layout 2)."""
    z0, z1, z2, z3 = _normals(seed, c0, c1, f, ROUNDS, FAST)
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK // 4, 4])


@triton.jit
def _store(ptr, value, mask, DTYPE: tl.constexpr):
    if DTYPE == tl.float32:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value.to(DTYPE, fp_downcast_rounding="rtne"), mask=mask)
