"""MeZO's noise z: a function of (step seed, global element offset), applied to the weights in one pass.

The z of element i of HF parameter p is ``normal(seed, base(p) + i)``, where
``base(p)`` is the number of elements of the parameters before p in HF
``OPTForCausalLM.named_parameters()`` order (a tied ``lm_head`` is not
repeated; LoRA's A/B tensors have an order of their own). It does not depend on
how SGLang stores p (fused QKV, padded vocabulary, tensor-parallel shards) or
on the device, so every layout, every rank and the HF reference draw the same z.

``normal(seed, o)``: Philox4x32-R (R = 10 rounds, or MeZOConfig.z_rounds: 7 to 10) with key ``(seed mod 2^32,
seed >> 32 mod 2^32)`` and counter ``(q mod 2^32, q >> 32, 0, 0)``, ``q = o >> 2``, gives four
uint32 words; each becomes a uniform ``u`` in [0, 1) (bit-cast to int32, ``~x``
where negative, times 4.6566127342e-10, in fp32), and the Box-Muller pairs
``(u0, u1)``, ``(u2, u3)`` give the normals of offsets ``4q .. 4q + 3``
(``r = sqrt(-2 log max(u_a, 1e-7))``, ``r cos(2 pi u_b)``, ``r sin(2 pi u_b)``).

One pass over the weights computes, in fp32 with one rounding per element,
``w = k * w + sum_s (k * a_s + b_s) * z_s`` for one or two noise streams
``(seed_s, a_s, b_s)``, where ``k`` is ``keep`` for tensors that decay and 1
for the others: a perturbation (``k = 1``), MeZO's restore-and-update, and the
update of one step folded into the next step's first perturbation. On CUDA one
Triton kernel (``noise_kernel``) runs the pass over a table of every tensor, reading and writing
each element once and storing no noise; elsewhere (and as the reference) the
same arithmetic in torch, in blocks of offsets (``normal_range``: one Philox
call per 4 offsets, Philox's 32x32 -> 64-bit products in int64, the blocks'
temporaries in cache; 3.3M offsets in about 60 ms on one CPU core). The kernel takes sin and cos of the angle reduced to
[-pi, pi), and log u where u <= 3/4, from the hardware (``NoisePass.FAST``): its z is within 4e-6 of the
definition (the same on every rank and layout, since each offset runs the same
code); with ``FAST = 0``, and under Triton's interpreter, it computes the
definition's precise functions (within 1e-6 of torch's).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

try:
    import triton
except ImportError:  # no Triton: the torch implementation everywhere
    triton = None
# Under Triton's interpreter (tests on the CPU) the kernel's hardware sin / cos are torch's precise ones:
# the angle reduction of NoisePass.FAST is checked there, the hardware functions on the GPU.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586


# Philox4x32's rounds that z may take (MeZOConfig.z_rounds): Salmon et al. (SC'11, "Parallel random numbers: as
# easy as 1, 2, 3") find 7 the fewest that pass TestU01's BigCrush, and recommend 10, the default, for margin.
PHILOX_ROUNDS = (7, 8, 9, 10)
ROUNDS = 10  # z's definition where no other is asked for


def _hi_lo(c, r: int):
    """(high, low) 32-bit words of ``c * r``, ``c`` a uint32 word (an int64 tensor, or a Python int where the
    word is the same for every counter). The product is below 2^64: int64 arithmetic wraps, and its 64 bits
    are the product's. A tensor ``c`` is not used after this."""
    p = c * r
    if isinstance(p, int):
        return p >> 32, p & _MASK32
    hi = p >> 32
    hi &= _MASK32
    p &= _MASK32
    return hi, p


def _xor(a, b):
    """a ^ b for words that are tensors or Python ints, in place in a tensor that is not used after."""
    if isinstance(a, int):
        a, b = b, a
    if isinstance(a, int) or (isinstance(b, int) and b == 0):
        return a ^ b if isinstance(a, int) else a
    a ^= b
    return a


def _philox(seed: int, c0, c1, c2=0, c3=0, rounds: int = ROUNDS) -> tuple:
    """Philox4x32 (``rounds`` rounds) of counters (c0, c1, c2, c3) under ``seed``; each word an int64 tensor of
    uint32 values or a Python int (the same for every counter: the words it reaches stay ints for the first
    rounds)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = _xor(_xor(hi_b, c1), k0), lo_b, _xor(_xor(hi_a, c3), k1), lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox4x32(seed: int, q: torch.Tensor, c2: int = 0, c3: int = 0, rounds: int = ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 (``rounds`` rounds) of counters ``(q lo, q hi, c2, c3)`` under ``seed``: four int64 tensors of
    uint32 words (z uses c2 = c3 = 0; the others are for Random123's known-answer vectors)."""
    words = _philox(seed, q & _MASK32, (q >> 32) & _MASK32, c2, c3, rounds)
    return tuple(w if isinstance(w, torch.Tensor) else torch.full_like(q, w) for w in words)


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """The uniform of a uint32 word (int64): its int32 bit pattern, ~x where negative, times the scale."""
    x = x.to(torch.int32)  # the low 32 bits: the word's int32 bit pattern
    x ^= x >> 31  # ~x where negative
    return x.to(torch.float32).mul_(torch.tensor(_UNIFORM_SCALE, dtype=torch.float32))


def _four_normals(words: tuple) -> torch.Tensor:
    """The four normals of each counter's words, ``[counters, 4]`` fp32: the Box-Muller pairs (u0, u1) and
    (u2, u3), r = sqrt(-2 log max(u_a, 1e-7)), r cos(2 pi u_b), r sin(2 pi u_b); computed in place."""
    u0, u1, u2, u3 = (_uniform(w) for w in words)
    z = torch.empty((u0.numel(), 4), dtype=torch.float32, device=u0.device)
    two_pi = torch.tensor(_TWO_PI, dtype=torch.float32)
    for column, u_a, u_b in ((0, u0, u1), (2, u2, u3)):
        r = u_a.clamp_(min=1e-7).log_().mul_(-2.0).sqrt_()
        theta = u_b.mul_(two_pi)
        torch.mul(r, torch.cos(theta), out=z[:, column])
        torch.mul(r, theta.sin_(), out=z[:, column + 1])
    return z


def normal(seed: int, offsets: torch.Tensor, rounds: int = ROUNDS) -> torch.Tensor:
    """z at the given global element offsets (int64 tensor), fp32: the definition (module docstring), with
    ``rounds`` Philox rounds."""
    z = _four_normals(philox4x32(seed, offsets >> 2, rounds=rounds))
    return z.gather(-1, (offsets & 3).unsqueeze(-1)).squeeze(-1)


# Counters per block of normal_range: 2^16 (2^18 offsets) keeps a block's temporaries (2 MiB each) in
# the CPU's caches; 2^14 or fewer spends more on torch's per-op overhead (measured: 3.3M offsets in
# 58 ms on one core at 2^16, 4 s for normal() over the same offsets).
RANGE_BLOCK = 1 << 16


def normal_range(
    seed: int, start: int, count: int, device=None, rounds: int = ROUNDS
) -> Iterator[tuple[int, torch.Tensor]]:
    """z of global offsets ``start .. start + count - 1``, in order, in blocks: (first offset, z of the
    block) pairs. Equal to ``normal`` of those offsets; each Philox counter is computed once (it gives 4
    consecutive offsets) and the high counter word is a Python int within a block."""
    end = start + count
    q = start >> 2
    while 4 * q < end:
        last = min((end - 1) >> 2, q + RANGE_BLOCK - 1, q | _MASK32)  # a block keeps q's high word
        counters = torch.arange(q & _MASK32, (last & _MASK32) + 1, dtype=torch.int64, device=device)
        z = _four_normals(_philox(seed, counters, q >> 32, rounds=rounds)).view(-1)
        lo, hi = max(start, 4 * q), min(end, 4 * last + 4)
        yield lo, z[lo - 4 * q : hi - 4 * q]
        q = last + 1


@dataclass(frozen=True)
class Stream:
    """One noise stream of a pass: z of ``seed``, coefficient ``keep * a + b`` (``keep`` where a tensor decays)."""

    seed: int
    a: float
    b: float = 0.0


class NoisePass:
    """Passes ``w = k * w + sum_s (k * a_s + b_s) * z_s`` over named tensors at given global offsets.

    ``tensors`` are contiguous views (HF parameters, or their shards: ``bases`` gives, for each, the
    global offset of its element 0, and ``rows`` a row stride ``(row_length, global_row_stride)``
    when its rows are not contiguous in the HF parameter). ``decays`` names the tensors ``keep``
    applies to. ``transposed`` names tensors that hold their HF parameter transposed (``[out, in]``
    for HF's ``[in, out]``, GPT-2's Conv1D weights): their z is drawn in HF's order and transposed,
    by torch (the kernel skips them).
    """

    # The kernel's variant, measured side by side over the opt-1.3b weights (2.63 GB bf16) on an H100
    # (benchmarks/zo_kernel_parts.py, benchmarks/NOTES.md "2026-12-07, sixth session"), ms for 1 / 2 streams
    # against a 1.746 ms copy: rows of four, FAST 2, BLOCK 1024, 4 warps (the earlier default) 2.537 / 3.644;
    # vectors of four (layout 2), BLOCK 4096, 8 warps (these defaults) 1.977 / 3.291, with the same z (3.46e-6
    # at most from the precise kernel, all).
    # BLOCK: offsets per program (benchmarks/mezo_gpu.py --z-block).
    BLOCK = 4096
    # FAST, the transcendentals (noise_kernel._pairs): 0 the definition's precise ones; 1 the hardware's
    # sin / cos (z within 4e-6 of the definition); 2 also the hardware's log where u <= 3/4 and a polynomial
    # above (noise_kernel._log_times), with no loss against 1; 3 (the hardware's log everywhere, 2e-4 off where u
    # is near 1) is for benchmarks only (benchmarks/mezo_gpu.py --z-math).
    FAST = 2
    # LAYOUT, how a program holds its block (noise_kernel.zo_pass_kernel): 0, one tensor in the block's order
    # (the 4 normals of a Philox call interleaved through shared memory); 1, 4 rows of stride 4 (row c:
    # offsets 4 i + c, z = word c), so that no value moves between threads; 2, rows of 4 consecutive
    # elements, one thread's and one access each, for the segments aligned to 4 elements (offset, length,
    # address), and layout 1 for the others, in a second launch (benchmarks/mezo_gpu.py --z-layout).
    LAYOUT = 2
    # Warps per program (benchmarks/mezo_gpu.py --z-warps): with BLOCK, how many Philox counters a thread
    # holds (BLOCK / (128 * WARPS)).
    WARPS = 8
    # A cap on the kernel's registers per thread (None: the compiler's choice; benchmarks/zo_kernel_parts.py).
    MAXNREG: Optional[int] = None

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        bases: dict[str, int],
        decays: Sequence[str] = (),
        rows: Optional[dict[str, tuple[int, int]]] = None,
        transposed: Sequence[str] = (),
        rounds: int = ROUNDS,
    ) -> None:
        if rounds not in PHILOX_ROUNDS:
            raise ValueError(f"z takes Philox4x32 with {PHILOX_ROUNDS[0]} to {PHILOX_ROUNDS[-1]} rounds, got {rounds}")
        self.rounds = rounds
        rows = rows or {}
        self.tensors = tensors
        self.decays = frozenset(decays)
        self.transposed = {name: bases[name] for name in transposed}
        # Segments: (name, first local element, length, global offset of that element).
        self.segments: list[tuple[str, int, int, int]] = []
        for name, tensor in tensors.items():
            if not tensor.is_contiguous():
                raise ValueError(f"{name}: the noise pass needs a contiguous tensor (view)")
            if name in self.transposed:
                continue
            if name in rows:
                length, stride = rows[name]
                self.segments += [
                    (name, r * length, length, bases[name] + r * stride) for r in range(tensor.numel() // length)
                ]
            else:
                self.segments.append((name, 0, tensor.numel(), bases[name]))
        devices = {t.device for t in tensors.values()}
        dtypes = {t.dtype for t in tensors.values()}
        self.device = next(iter(devices)) if len(devices) == 1 else None
        self.dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
        self._tables: dict[int, tuple] = {}

    def uses_kernel(self) -> bool:
        return (
            triton is not None
            and self.device is not None
            and self.device.type == "cuda"
            and self.dtype in (torch.float32, torch.float16, torch.bfloat16)
        )

    def __call__(self, streams: Sequence[Stream], keep: float = 1.0) -> None:
        if not 1 <= len(streams) <= 2:
            raise ValueError(f"a noise pass takes one or two streams, got {len(streams)}")
        if self.uses_kernel():
            if self.segments:
                self._kernel_pass(streams, keep, fast=self.FAST)
            self._transposed_pass(streams, keep)
        else:
            self._torch_pass(streams, keep)

    def _transposed_pass(self, streams: Sequence[Stream], keep: float) -> None:
        """The pass over the transposed tensors: z of the whole HF tensor, in HF's order, transposed."""
        for name, base in self.transposed.items():
            tensor = self.tensors[name]
            k = keep if name in self.decays else 1.0
            out = tensor.float() * k if k != 1.0 else tensor.to(torch.float32, copy=True)
            hf_shape = (tensor.numel() // tensor.shape[0], tensor.shape[0])
            for s in streams:
                z = torch.cat([z for _, z in normal_range(s.seed, base, tensor.numel(), tensor.device, self.rounds)])
                out += z.view(hf_shape).T.reshape(tensor.shape).mul_(k * s.a + s.b)
            tensor.copy_(out)

    def _torch_pass(self, streams: Sequence[Stream], keep: float) -> None:
        self._transposed_pass(streams, keep)
        for name, start, length, base in self.segments:
            flat = self.tensors[name].view(-1)[start : start + length]
            k = keep if name in self.decays else 1.0
            blocks = [normal_range(s.seed, base, length, flat.device, self.rounds) for s in streams]
            for parts in zip(*blocks):
                lo = parts[0][0] - base
                part = flat[lo : lo + parts[0][1].numel()]
                out = part.float() * k if k != 1.0 else part.to(torch.float32, copy=True)
                for s, (_, z) in zip(streams, parts):
                    out += z.mul_(k * s.a + s.b)
                part.copy_(out)

    def _kernel_pass(
        self,
        streams: Sequence[Stream],
        keep: float,
        rounds: Optional[int] = None,
        noise: bool = True,
        fast: int = 0,
        layout: Optional[int] = None,
    ) -> None:
        """The Triton pass. ``rounds`` (Philox rounds, default the pass's own), ``noise`` (False: only ``k * w``),
        ``fast`` (hardware transcendentals, see ``noise_kernel._pairs``) and ``layout`` (``LAYOUT``) exist for
        benchmarks/zo_kernel_parts.py, which times the kernel's parts; z is defined with the pass's rounds and
        precise transcendentals."""
        layout = self.LAYOUT if layout is None else layout
        if layout not in self._tables:
            self._tables[layout] = self._build_table(layout)
        (seg_ptr, seg_len, seg_base, seg_decay), launches = self._tables[layout]
        second = streams[1] if len(streams) == 2 else Stream(0, 0.0, 0.0)
        from .noise_kernel import TL_DTYPES, zo_pass_kernel

        decay = keep != 1.0 and bool(self.decays)
        for kernel_layout, (blk_seg, blk_g) in launches:
            zo_pass_kernel[(blk_seg.numel(),)](
                blk_seg,
                blk_g,
                seg_ptr,
                seg_len,
                seg_base,
                seg_decay,
                streams[0].seed,
                float(streams[0].a),
                float(streams[0].b),
                second.seed,
                float(second.a),
                float(second.b),
                float(keep),
                DTYPE=TL_DTYPES[self.dtype],
                TWO=len(streams) == 2,
                BLOCK=self.BLOCK,
                ROUNDS=self.rounds if rounds is None else rounds,
                NOISE=noise,
                FAST=-fast if _INTERPRETED else fast,
                LAYOUT=kernel_layout,
                DECAY=decay,
                ALIGN=4 * self.dtype.itemsize,
                num_warps=self.WARPS,
                **({} if self.MAXNREG is None else {"maxnreg": self.MAXNREG}),
            )

    def _build_table(self, layout: int):
        """Per segment: element pointer, length, global offset, decays; and the launches: (kernel layout,
        (per block: segment, first global offset)). Layout 2 launches the aligned segments' blocks as
        layout 2 and the others' as layout 1; layouts 0 and 1 launch every block as themselves."""
        block = self.BLOCK
        ptr, length, base, decay = [], [], [], []
        blocks: dict[int, tuple[list[int], list[int]]] = {}
        for i, (name, start, n, g) in enumerate(self.segments):
            if n >= 2**31 - block:
                raise ValueError(
                    f"{name}: {n} elements; the noise pass indexes a tensor with 32-bit offsets "
                    f"(fewer than {2**31 - block}): split it into row segments (rows=)"
                )
            tensor = self.tensors[name]
            address = tensor.data_ptr() + start * tensor.element_size()
            ptr.append(address)
            length.append(n)
            base.append(g)
            decay.append(1 if name in self.decays else 0)
            first = g & ~3  # blocks start on a multiple of 4: one Philox call serves 4 offsets
            count = math.ceil((g + n - first) / block)
            # Layout 2 takes a segment whose global offset, length and address are multiples of 4 elements:
            # each Philox call's 4 offsets are then one aligned access of the segment's, or none of it.
            aligned = g % 4 == 0 and n % 4 == 0 and address % (4 * tensor.element_size()) == 0
            kernel_layout = layout if layout != 2 or aligned else 1
            blk_seg, blk_g = blocks.setdefault(kernel_layout, ([], []))
            blk_seg += [i] * count
            blk_g += [first + j * block for j in range(count)]
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=self.device)  # noqa: E731
        segments = (
            as_tensor(ptr, torch.int64),
            as_tensor(length, torch.int64),
            as_tensor(base, torch.int64),
            as_tensor(decay, torch.int32),
        )
        launches = [
            (kernel_layout, (as_tensor(blk_seg, torch.int32), as_tensor(blk_g, torch.int64)))
            for kernel_layout, (blk_seg, blk_g) in sorted(blocks.items(), reverse=True)
        ]
        return segments, launches
