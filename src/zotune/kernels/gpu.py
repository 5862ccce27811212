"""The Triton GPU backend: fused, multi-tensor sweeps with the keyed generator of :mod:`zotune.rng`.

One launch sweeps every tensor of one dtype::

    theta <- scale * theta + c0 * z(s0) [+ c1 * z(s1)]      (read once, write once, in theta's dtype)

(Rademacher: any number of terms, up to MAX_TERMS, the ones past two read from a small int32 buffer: FZOO's
N-term update in the one pass)

with z made on the fly, so the restore + update + next perturbation of a MeZO step is one pass over
the weights. bf16/fp16 weights are loaded in their dtype, combined in float32 and stored back in
their dtype (no float32 buffer), rounded to nearest or, in the update sweep, stochastically with
the keyed rounding stream (stream 1, one word per element, the rule of
:func:`zotune.optim.functional.stochastic_round_`: E[result] = the float32 value).

How z matches the reference: each program owns a tile of ``BLOCK`` consecutive *global* element
indices (aligned to ``BLOCK``, so the Philox blocks of a tile never straddle tiles); it runs one
Philox-4x32-10 call per block of 4 Gaussians (or of 128 Rademacher signs). A Gaussian tile is a
(BLOCK/4, 4) array whose row j holds block j's four lanes, picked by selects in registers (no shuffle
through shared memory); a Rademacher tile is a (BLOCK/128, 4, 32) array (block, word, bit), each word
picked by a select and broadcast over its 32 elements, and c * z is the select ``bit ? c : -c`` (exact:
no int-to-float conversion or multiply per element). Full tiles load and store in 16-byte vectors
(8-byte for the Gaussian's 16-bit tiles). Box–Muller uses the same branch-free float32
algorithm as the numba CPU kernel (:mod:`zotune.kernels.cpu`): the exponent and mantissa of u taken
from its bits and a Cephes ``logf`` polynomial, an exact quadrant reduction of the 24-bit angle and
Cephes ``sinf``/``cosf`` polynomials on [-pi/4, pi/4]. These are a handful of FMAs each (no
libdevice calls, no range reduction), accurate to a few float32 ulps, so z equals the reference to
float32 tolerance while the Gaussian sweep stays close to the memory floor. On the GPU the Gaussian
kernels are compiled with FMA contraction (named at launch, so that a Triton whose default differs
makes the same bits): z and the update then differ from the CPU kernels by float32 rounding only. The
Rademacher kernels are compiled without it, so ``x * scale`` is rounded before ``+-c`` is added: the
reference's arithmetic, bit for bit, and the previous kernel's (whose contraction fused the exact
``c * z`` into ``fma(c, z, x * scale)``).

The fast Gaussian (``gaussian-fast``, :func:`zotune.rng.gaussian_fast`) takes eight normals from a Philox call
(a (BLOCK/8, 8) tile, a row a block: a thread's 16-byte vector of fp16 is one block) and computes Box–Muller with
the hardware's approximate log2, sqrt, sin and cos (``lg2.approx`` and so on, the MUFU unit: one instruction
each, where the polynomials above take a dozen): about half the instructions a fp16 element of the Gaussian
(benchmarks/sass.py). Those are accurate to a few 1e-7 (|z| up to 1e-4 off where r is near 0, from log2 near 1),
not to float32 rounding, so z on a GPU differs from the CPU kernels' by that much (tests/test_triton.py bounds it);
the interpreter uses NumPy's functions in their place.

Many tensors per launch: a tensor is addressed as an element offset from the first tensor of the
group (all of one dtype, hence all aligned to its element size), and a per-program table maps each
tile to its tensor. The tables are built once per list of tensors (the parameters keep their
storage) and kept in a bounded least-recently-used cache. A single tensor (the sweeps issued one
tensor at a time: layerwise scales, more than two Gaussian terms) needs no table: its kernel takes the
tensor's size, start and key as scalar arguments, so such a sweep costs one launch and no copy.

Sparse directions (Sparse-MeZO) have their own one-pass kernel, ``masked_axpy``: a float32 chunk, z, the
packed mask bit of each element and the update together (one FMA a term, torch's ``addcmul_`` rounding);
functional's masked path calls it per chunk of at most ``FALLBACK_CHUNK`` elements on the float32 work.

Interpreter: ``TRITON_INTERPRET=1`` must be set before this module is imported (Triton reads it when
the kernels are decorated); the kernels then run on CPU tensors through NumPy, which the tests use.
"""

from __future__ import annotations

import operator
import os
from collections import OrderedDict

import torch
import triton  # ImportError propagates: zotune.kernels then runs without this backend
import triton.language as tl

from zotune import rng
from zotune.kernels import Backend

__all__ = ["BACKEND", "INTERPRETED", "axpy", "fill", "masked_axpy", "supports", "sweep", "table_stats", "words"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MUFU = tl.constexpr(not INTERPRETED)  # gaussian-fast: the hardware's approximate functions (the interpreter: numpy's)
BLOCK = 512 if INTERPRETED else 2048  # elements per program; a multiple of 128 (one Rademacher block)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TERMS = 64  # terms one Rademacher sweep takes (each its own unrolled Philox call a tile; FZOO's update: N + 1)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on uint32 tensors (counter c0..c3, key k0, k1), as rng.philox4x32."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = tl.mul(a2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(a0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _words(first_block, NB: tl.constexpr, stream, key_lo, key_hi, seed_lo, seed_hi):
    """The four words of Philox blocks first_block .. first_block + NB - 1 (uint32 tensors)."""
    c0 = (first_block + tl.arange(0, NB)).to(tl.uint32)
    c1 = tl.full([NB], 0, tl.uint32) + stream
    c2 = tl.full([NB], 0, tl.uint32) + key_lo
    c3 = tl.full([NB], 0, tl.uint32) + key_hi
    k0 = tl.full([NB], 0, tl.uint32) + seed_lo
    k1 = tl.full([NB], 0, tl.uint32) + seed_hi
    return _philox(c0, c1, c2, c3, k0, k1)


@triton.jit
def _lanes(a, b, c, d):
    """The (N, 4) tile whose row j is (a[j], b[j], c[j], d[j]): block j's four lanes, in element order.

    A broadcast and three selects in registers (no shuffle through shared memory, unlike a reshape).
    """
    lane = tl.arange(0, 4)[None, :]
    cd = tl.where(lane == 2, c[:, None], d[:, None])
    return tl.where(lane == 0, a[:, None], tl.where(lane == 1, b[:, None], cd))


@triton.jit
def _box_muller(wa, wb):
    """(r cos 2 pi v, r sin 2 pi v) for the words (wa, wb): the float32 algorithm of kernels.cpu."""
    # u = n * 2**-24, n = (wa >> 8) + 1 exact in float32; ln u from u's exponent and mantissa
    n = ((wa >> 8) + 1).to(tl.int32, bitcast=True).to(tl.float32)
    bits = n.to(tl.int32, bitcast=True) + (0x3F800000 - 0x3F3504F3)
    e = ((bits >> 23) - 151).to(tl.float32)
    m = ((bits & 0x007FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True)
    f = m - 1.0
    f2 = f * f
    p = 7.0376836292e-2 * f + -1.1514610310e-1
    p = p * f + 1.1676998740e-1
    p = p * f + -1.2420140846e-1
    p = p * f + 1.4249322787e-1
    p = p * f + -1.6668057665e-1
    p = p * f + 2.0000714765e-1
    p = p * f + -2.4999993993e-1
    p = p * f + 3.3333331174e-1
    y = p * f * f2
    y = y + -2.12194440e-4 * e
    y = y - 0.5 * f2
    lnu = f + y
    lnu = lnu + 0.693359375 * e
    r = tl.sqrt(-2.0 * lnu)
    # angle 2 pi v, v = k * 2**-24: quadrant q = round(k / 2**22) mod 4, exact remainder t
    k = (wb >> 8).to(tl.int32, bitcast=True)
    qq = (k + (1 << 21)) >> 22
    t = k - (qq << 22)
    q = qq & 3
    th = t.to(tl.float32) * 3.745070617697095e-07  # pi/2 / 2**22
    z = th * th
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z + -1.6666654611e-1) * z * th + th
    c = ((2.443315711809948e-5 * z + -1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    swap = (q & 1) != 0
    cq = tl.where(swap, s, c)
    sq = tl.where(swap, c, s)
    flip_c = ((q + 1) & 2) << 30  # sign bit: cos(q pi/2 + th) < 0 for q in {1, 2}
    flip_s = (q & 2) << 30  # sign bit: sin(q pi/2 + th) < 0 for q in {2, 3}
    zc = ((r * cq).to(tl.int32, bitcast=True) ^ flip_c).to(tl.float32, bitcast=True)
    zs = ((r * sq).to(tl.int32, bitcast=True) ^ flip_s).to(tl.float32, bitcast=True)
    return zc, zs


@triton.jit
def _gaussian(g0, seed_lo, seed_hi, key_lo, key_hi, BLOCK: tl.constexpr):
    """Gaussian z of the global elements g0 .. g0 + BLOCK - 1 (g0 a multiple of BLOCK), float32: a
    (BLOCK // 4, 4) tile, row j the four lanes of Philox block j."""
    w0, w1, w2, w3 = _words(g0 // 4, BLOCK // 4, 0, key_lo, key_hi, seed_lo, seed_hi)
    za, zb = _box_muller(w0, w1)
    zc, zd = _box_muller(w2, w3)
    return _lanes(za, zb, zc, zd)


@triton.jit
def _approx(x, ASM: tl.constexpr):
    """x through one of the hardware's approximate functions (the MUFU unit, one instruction), named by its PTX."""
    return tl.inline_asm_elementwise(ASM, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _fast_pair(w):
    """(r cos 2 pi v, r sin 2 pi v) of rng.gaussian_fast for one word: u from its high 16 bits, v from its low 16.

    -2 ln u = -2 ln 2 log2 u with u = (hi + 1) * 2**-16 exact (log2 of u itself, not 16 - log2(hi + 1): no
    cancellation near u = 1), clamped at 0 (an approximate log2 of 1 may come out a hair above 0); the angle
    from the low half sign-extended, k - 2**16 for k >= 2**15: the same sine and cosine, and an argument in
    [-pi, pi), where the hardware's sin and cos are accurate to 2**-20.9. On a GPU log2, sqrt, cos and sin are
    the hardware's (lg2.approx ...); under the interpreter NumPy's."""
    u = ((w >> 16) + 1).to(tl.int32, bitcast=True).to(tl.float32) * 1.52587890625e-05  # 2**-16
    k = (w << 16).to(tl.int32, bitcast=True) >> 16
    angle = k.to(tl.float32) * 9.587379924285257e-05  # 2 pi / 2**16
    if _MUFU:
        r = _approx(
            tl.maximum(_approx(u, "lg2.approx.f32 $0, $1;") * -1.3862943611198906, 0.0), "sqrt.approx.f32 $0, $1;"
        )
        c = _approx(angle, "cos.approx.f32 $0, $1;")
        s = _approx(angle, "sin.approx.f32 $0, $1;")
    else:
        r = tl.sqrt(tl.maximum(tl.log2(u) * -1.3862943611198906, 0.0))  # -2 ln 2
        c = tl.cos(angle)
        s = tl.sin(angle)
    return r * c, r * s


@triton.jit
def _gaussian_fast(g0, seed_lo, seed_hi, key_lo, key_hi, BLOCK: tl.constexpr):
    """rng.gaussian_fast of the global elements g0 .. g0 + BLOCK - 1 (g0 a multiple of BLOCK), float32: a
    (BLOCK // 8, 8) tile, row j the eight lanes of Philox block j (word i: lanes 2i, 2i + 1)."""
    w0, w1, w2, w3 = _words(g0 // 8, BLOCK // 8, 0, key_lo, key_hi, seed_lo, seed_hi)
    a0, a1 = _fast_pair(w0)
    b0, b1 = _fast_pair(w1)
    c0, c1 = _fast_pair(w2)
    d0, d1 = _fast_pair(w3)
    lane = tl.arange(0, 8)[None, :]
    low = tl.where(
        lane < 2, tl.where(lane == 0, a0[:, None], a1[:, None]), tl.where(lane == 2, b0[:, None], b1[:, None])
    )
    high = tl.where(
        lane < 6, tl.where(lane == 4, c0[:, None], c1[:, None]), tl.where(lane == 6, d0[:, None], d1[:, None])
    )
    return tl.where(lane < 4, low, high)


@triton.jit
def _z(g0, seed_lo, seed_hi, key_lo, key_hi, FAST: tl.constexpr, BLOCK: tl.constexpr):
    """The Gaussian tile of either stream: ``gaussian`` (FAST false) or ``gaussian-fast``."""
    if FAST:
        z = _gaussian_fast(g0, seed_lo, seed_hi, key_lo, key_hi, BLOCK)
    else:
        z = _gaussian(g0, seed_lo, seed_hi, key_lo, key_hi, BLOCK)
    return z


@triton.jit
def _rademacher_bits(g0, seed_lo, seed_hi, key_lo, key_hi, BLOCK: tl.constexpr):
    """The Rademacher signs of the global elements g0 .. g0 + BLOCK - 1 (g0 a multiple of BLOCK): a
    (BLOCK // 128, 4, 32) boolean tile, [b, j, k] = bit k of word j of Philox block b (set: +1).

    The tile's shape is the stream's own (block, word, bit), so each word is picked once per thread by a
    select on the (BLOCK // 128, 4, 1) slice and broadcast along its 32 bits, in registers: no join or
    reshape (each a round trip through shared memory) and no int-to-float conversion per element.
    """
    w0, w1, w2, w3 = _words(g0 // 128, BLOCK // 128, 0, key_lo, key_hi, seed_lo, seed_hi)
    j = tl.arange(0, 4)[None, :, None]
    w = tl.where(
        j < 2,
        tl.where(j == 0, w0[:, None, None], w1[:, None, None]),
        tl.where(j == 2, w2[:, None, None], w3[:, None, None]),
    )
    return ((w >> tl.arange(0, 32).to(tl.uint32)[None, None, :]) & 1) != 0


@triton.jit
def _to_nearest(v, DTYPE: tl.constexpr):
    """v (float32) rounded to nearest-even in DTYPE; bfloat16 by its bits (exact on every target)."""
    if DTYPE == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)  # NaN stays NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _round_stochastic(v, g0, seed_lo, seed_hi, key_lo, key_hi, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """v (float32, a (BLOCK // 4, 4) tile) rounded to DTYPE (16-bit) up or down with probability by distance
    (stream 1)."""
    nearest = _to_nearest(v, DTYPE)
    diff = v - nearest.to(tl.float32)
    nb = nearest.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    neg = nb >= 0x8000
    mag = nb & 0x7FFF
    away = (diff > 0) != neg  # the neighbour toward diff's sign has the larger magnitude
    cross = (~away) & (mag == 0)  # from +-0 toward the other sign: the smallest subnormal there
    new_mag = tl.where(away, mag + 1, tl.where(mag == 0, 1, mag - 1))
    new_sign = tl.where(cross, (nb & 0x8000) ^ 0x8000, nb & 0x8000)
    neighbour = (new_sign | new_mag).to(tl.int16).to(DTYPE, bitcast=True)
    gap = neighbour.to(tl.float32) - nearest.to(tl.float32)
    prob = tl.where(gap != 0, diff / gap, 0.0)
    w0, w1, w2, w3 = _words(g0 // 4, BLOCK // 4, 1, key_lo, key_hi, seed_lo, seed_hi)
    w = _lanes(w0, w1, w2, w3)
    u = (w >> 8).to(tl.int32, bitcast=True).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    return tl.where(u < prob, neighbour, nearest)


@triton.jit
def _tile_index(RADEMACHER: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr = False):
    """A tile's element offsets in the stream's own layout. Gaussian: (BLOCK // 4, 4), one Philox block per row
    (lanes picked in registers); Rademacher: (BLOCK // 128, 4, 32), (Philox block, word, bit), contiguous along
    its last two axes; fast Gaussian (FAST): (BLOCK // 8, 8), a Philox block a row."""
    if RADEMACHER:  # a static branch (one assignment each, one return: the form the kernels compiled with)
        idx = (
            tl.arange(0, BLOCK // 128)[:, None, None] * 128
            + tl.arange(0, 4)[None, :, None] * 32
            + tl.arange(0, 32)[None, None, :]
        )
    elif FAST:
        idx = tl.arange(0, BLOCK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
    else:
        idx = tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    return idx


@triton.jit
def _sweep_tile(
    base,
    offset,
    n,
    start,
    key_lo,
    key_hi,
    tile,
    s0_lo,
    s0_hi,
    s1_lo,
    s1_hi,
    r_lo,
    r_hi,
    scale,
    c0,
    c1,
    extra,
    NT: tl.constexpr,
    FILL: tl.constexpr,
    RADEMACHER: tl.constexpr,
    FAST: tl.constexpr,
    ROUND: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Tile ``tile`` of the tensor at element ``offset`` from base: x <- (FILL ? 0 : x * scale) + c0 z(s0) [+ c1 z(s1)]
    [+ the terms in ``extra``: Rademacher only, NT > 2, int32 (seed lo, seed hi, coefficient's float32 bits) a term].

    The tensor holds elements start .. start + n - 1 of the parameter keyed (key_lo, key_hi) (uint32);
    s*_lo, s*_hi: the 32-bit halves of the seeds of the terms and of the rounding stream (int32 bit
    patterns). ALIGN: elements every tensor's offset and start are multiples of (the host checked it),
    so that whole tiles load and store in 16-byte vectors. A tile inside the tensor (all but at most
    two of each tensor) takes a branch of its own with no mask: its bounds (64-bit compares per
    element) are computed only on the other branch, where a tile straddles the tensor's ends.
    """
    g0 = (start // BLOCK + tile) * BLOCK  # first global element index of this tile
    first = offset + (g0 - start)  # element offset of the tile's first element from base
    if ALIGN > 1:  # (first // ALIGN) * ALIGN == first: a form the compiler's alignment analysis sees, where
        first = (
            first // ALIGN
        ) * ALIGN  # tl.multiple_of on this scalar was dropped (scalar 2-byte loads, seen in the PTX)
    tile_idx = _tile_index(RADEMACHER, BLOCK, FAST)
    ptrs = base + first + tile_idx
    if (g0 >= start) & (g0 + BLOCK <= start + n):
        out = _tile_values(
            ptrs, None, g0, key_lo, key_hi, s0_lo, s0_hi, s1_lo, s1_hi, r_lo, r_hi, scale, c0, c1, extra,
            NT, FILL, RADEMACHER, FAST, ROUND, BLOCK,
        )  # fmt: skip
        tl.store(ptrs, out)
    else:
        local = g0 - start + tile_idx
        mask = (local >= 0) & (local < n)
        out = _tile_values(
            ptrs, mask, g0, key_lo, key_hi, s0_lo, s0_hi, s1_lo, s1_hi, r_lo, r_hi, scale, c0, c1, extra,
            NT, FILL, RADEMACHER, FAST, ROUND, BLOCK,
        )  # fmt: skip
        tl.store(ptrs, out, mask=mask)


@triton.jit
def _tile_values(
    ptrs, mask, g0, key_lo, key_hi, s0_lo, s0_hi, s1_lo, s1_hi, r_lo, r_hi, scale, c0, c1, extra,
    NT: tl.constexpr, FILL: tl.constexpr, RADEMACHER: tl.constexpr, FAST: tl.constexpr, ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The new values of the tile at ``ptrs`` (global elements g0 .. g0 + BLOCK - 1) in the tensor's dtype;
    ``mask``: the elements inside the tensor, or None for a whole tile (no mask on its load)."""
    s0_lo = s0_lo.to(tl.uint32, bitcast=True)
    s0_hi = s0_hi.to(tl.uint32, bitcast=True)
    if RADEMACHER:  # c * z is +-c exactly: a select of the sign, no multiply (launched without FMA contraction,
        # so x * scale is rounded before the add, as in the reference)
        b0 = _rademacher_bits(g0, s0_lo, s0_hi, key_lo, key_hi, BLOCK)
        if FILL:
            v = tl.where(b0, 1.0, -1.0)
        else:
            v = _load(ptrs, mask) * scale + tl.where(b0, c0, -c0)
            if NT >= 2:
                b1 = _rademacher_bits(
                    g0, s1_lo.to(tl.uint32, bitcast=True), s1_hi.to(tl.uint32, bitcast=True), key_lo, key_hi, BLOCK
                )
                v = v + tl.where(b1, c1, -c1)
            for t in tl.static_range(2, NT):  # the terms past two (FZOO's update, n-SPSA): added one at a time
                lo = tl.load(extra + 3 * (t - 2)).to(tl.uint32, bitcast=True)
                hi = tl.load(extra + 3 * (t - 2) + 1).to(tl.uint32, bitcast=True)
                c = tl.load(extra + 3 * (t - 2) + 2).to(tl.float32, bitcast=True)
                v = v + tl.where(_rademacher_bits(g0, lo, hi, key_lo, key_hi, BLOCK), c, -c)
    else:
        z0 = _z(g0, s0_lo, s0_hi, key_lo, key_hi, FAST, BLOCK)
        if FILL:
            v = z0
        else:
            v = _load(ptrs, mask) * scale + c0 * z0
            if NT == 2:
                z1 = _z(
                    g0,
                    s1_lo.to(tl.uint32, bitcast=True),
                    s1_hi.to(tl.uint32, bitcast=True),
                    key_lo,
                    key_hi,
                    FAST,
                    BLOCK,
                )
                v = v + c1 * z1
    if ROUND:
        r_lo = r_lo.to(tl.uint32, bitcast=True)
        r_hi = r_hi.to(tl.uint32, bitcast=True)
        if RADEMACHER:  # the rounding stream's (block, lane) tile, as for the Gaussian; rare (16-bit updates)
            out = tl.reshape(
                _round_stochastic(
                    tl.reshape(v, [BLOCK // 4, 4]), g0, r_lo, r_hi, key_lo, key_hi, ptrs.dtype.element_ty, BLOCK
                ),
                [BLOCK // 128, 4, 32],
            )
        elif FAST:  # rows of 8 as rows of 4 (element order kept), and back
            out = tl.reshape(
                _round_stochastic(
                    tl.reshape(v, [BLOCK // 4, 4]), g0, r_lo, r_hi, key_lo, key_hi, ptrs.dtype.element_ty, BLOCK
                ),
                [BLOCK // 8, 8],
            )
        else:
            out = _round_stochastic(v, g0, r_lo, r_hi, key_lo, key_hi, ptrs.dtype.element_ty, BLOCK)
    else:
        out = _to_nearest(v, ptrs.dtype.element_ty)
    return out


@triton.jit
def _load(ptrs, mask):
    """The tile at ``ptrs`` as float32; ``mask`` None: a whole tile, loaded without one."""
    if mask is None:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit(do_not_specialize=["s0_lo", "s0_hi", "s1_lo", "s1_hi", "r_lo", "r_hi"])
def _sweep_kernel(
    base,
    table,
    tiles,
    s0_lo,
    s0_hi,
    s1_lo,
    s1_hi,
    r_lo,
    r_hi,
    scale,
    c0,
    c1,
    extra,
    NT: tl.constexpr,
    FILL: tl.constexpr,
    RADEMACHER: tl.constexpr,
    FAST: tl.constexpr,
    ROUND: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One tile of one of many tensors (see _sweep_tile), found through the launch table.

    table: int64 rows (element offset from base, n, start, key lo, key hi, first tile) per tensor;
    tiles: int32 tensor index per program; extra: the terms past two (see _sweep_tile), read only if NT > 2.
    """
    pid = tl.program_id(0)
    t = tl.load(tiles + pid).to(tl.int64)
    row = table + 6 * t
    offset = tl.load(row)
    n = tl.load(row + 1)
    start = tl.load(row + 2)
    key_lo = tl.load(row + 3).to(tl.uint32)
    key_hi = tl.load(row + 4).to(tl.uint32)
    tile = pid - tl.load(row + 5)
    _sweep_tile(
        base,
        offset,
        n,
        start,
        key_lo,
        key_hi,
        tile,
        s0_lo,
        s0_hi,
        s1_lo,
        s1_hi,
        r_lo,
        r_hi,
        scale,
        c0,
        c1,
        extra,
        NT,
        FILL,
        RADEMACHER,
        FAST,
        ROUND,
        ALIGN,
        BLOCK,
    )


@triton.jit(do_not_specialize=["n", "start", "key_lo", "key_hi", "s0_lo", "s0_hi", "s1_lo", "s1_hi", "r_lo", "r_hi"])
def _sweep_kernel_one(
    base,
    n,
    start,
    key_lo,
    key_hi,
    s0_lo,
    s0_hi,
    s1_lo,
    s1_hi,
    r_lo,
    r_hi,
    scale,
    c0,
    c1,
    extra,
    NT: tl.constexpr,
    FILL: tl.constexpr,
    RADEMACHER: tl.constexpr,
    FAST: tl.constexpr,
    ROUND: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One tile of a single tensor (see _sweep_tile), described by scalar arguments: no launch table.

    A sweep issued one tensor at a time (layerwise scales, the path for more than two Gaussian terms) then
    costs a launch and nothing else: no table to build, cache or copy to the device. key_lo, key_hi: int32
    bit patterns; n, start: integers (int32 or int64, as Triton passes them); extra: as _sweep_tile's.
    """
    _sweep_tile(
        base,
        0,
        n.to(tl.int64),
        start.to(tl.int64),
        key_lo.to(tl.uint32, bitcast=True),
        key_hi.to(tl.uint32, bitcast=True),
        tl.program_id(0),
        s0_lo,
        s0_hi,
        s1_lo,
        s1_hi,
        r_lo,
        r_hi,
        scale,
        c0,
        c1,
        extra,
        NT,
        FILL,
        RADEMACHER,
        FAST,
        ROUND,
        ALIGN,
        BLOCK,
    )


@triton.jit(do_not_specialize=["n", "start", "key_lo", "key_hi", "s0_lo", "s0_hi", "s1_lo", "s1_hi"])
def _masked_kernel(
    base,
    bits,
    n,
    start,
    key_lo,
    key_hi,
    s0_lo,
    s0_hi,
    s1_lo,
    s1_hi,
    scale,
    c0,
    c1,
    NT: tl.constexpr,
    RADEMACHER: tl.constexpr,
    FAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Sparse directions, one tile of a float32 tensor holding elements start .. start + n - 1 (start a multiple
    of 8): x <- fma(c1 m, z1, fma(c0 m, z0, x * scale)), m in {0., 1.} the element's bit in ``bits`` (bit i of
    byte k: element 8k + i of x), so masked-off elements only scale. One rounding a term, as torch's addcmul_
    (the path this replaces, and the numba kernel's rule). key_lo .. s1_hi: int32 bit patterns. A tile inside
    the tensor takes a branch with no bounds (as _sweep_tile)."""
    g0 = (start.to(tl.int64) // BLOCK + tl.program_id(0)) * BLOCK
    first = ((g0 - start) // 8) * 8  # g0 - start (both multiples of 8), in a form the alignment analysis sees
    ptrs = base + first + _tile_index(RADEMACHER, BLOCK, FAST)
    if (first >= 0) & (first + BLOCK <= n):
        v = _masked_values(ptrs, None, bits, g0, first, n, key_lo, key_hi, s0_lo, s0_hi, s1_lo, s1_hi, scale, c0, c1,
                           NT, RADEMACHER, FAST, BLOCK)  # fmt: skip
        tl.store(ptrs, v)
    else:
        local = first + _tile_index(RADEMACHER, BLOCK, FAST)
        inside = (local >= 0) & (local < n)
        v = _masked_values(ptrs, inside, bits, g0, first, n, key_lo, key_hi, s0_lo, s0_hi, s1_lo, s1_hi, scale, c0, c1,
                           NT, RADEMACHER, FAST, BLOCK)  # fmt: skip
        tl.store(ptrs, v, mask=inside)


@triton.jit
def _masked_values(
    ptrs, inside, bits, g0, first, n, key_lo, key_hi, s0_lo, s0_hi, s1_lo, s1_hi, scale, c0, c1,
    NT: tl.constexpr, RADEMACHER: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """_masked_kernel's new values of the tile at ``ptrs``: global elements g0 .. g0 + BLOCK - 1, element ``first``
    of the tensor on; ``inside``: None for a whole tile, else the elements inside the tensor."""
    key_lo = key_lo.to(tl.uint32, bitcast=True)
    key_hi = key_hi.to(tl.uint32, bitcast=True)
    m = _mask_tile(bits, first, n, inside, RADEMACHER, FAST, BLOCK)
    lo0, hi0 = s0_lo.to(tl.uint32, bitcast=True), s0_hi.to(tl.uint32, bitcast=True)
    if RADEMACHER:
        z0 = tl.where(_rademacher_bits(g0, lo0, hi0, key_lo, key_hi, BLOCK), 1.0, -1.0)
    else:
        z0 = _z(g0, lo0, hi0, key_lo, key_hi, FAST, BLOCK)
    v = tl.fma(c0 * m, z0, _load(ptrs, inside) * scale)
    if NT == 2:
        lo1, hi1 = s1_lo.to(tl.uint32, bitcast=True), s1_hi.to(tl.uint32, bitcast=True)
        if RADEMACHER:
            z1 = tl.where(_rademacher_bits(g0, lo1, hi1, key_lo, key_hi, BLOCK), 1.0, -1.0)
        else:
            z1 = _z(g0, lo1, hi1, key_lo, key_hi, FAST, BLOCK)
        v = tl.fma(c1 * m, z1, v)
    return v


@triton.jit
def _mask_tile(bits, first, n, inside, RADEMACHER: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    """The mask of the tile of elements first .. first + BLOCK - 1 (first a multiple of 8) as float32 0 / 1, in the
    tile's layout. Gaussian (rows of 4): one byte load a row, broadcast over its 4 lanes (rows 2r and 2r + 1 share
    byte r: its low and high nibble), not one a element; fast Gaussian (rows of 8): one byte a row, a bit a lane;
    Rademacher: a byte load an element."""
    if FAST:  # the byte's address per element (a row's eight share it): a load of its own row layout would be
        # converted to the tile's through shared memory where a row spans two threads (float32)
        local = first + _tile_index(RADEMACHER, BLOCK, FAST)
        if inside is None:
            byte = tl.load(bits + (local >> 3))
        else:
            byte = tl.load(bits + (local >> 3), mask=inside, other=0)
        m = (byte.to(tl.int32) >> tl.arange(0, 8)[None, :]) & 1
    elif RADEMACHER:
        local = first + _tile_index(RADEMACHER, BLOCK)
        if inside is None:
            byte = tl.load(bits + (local >> 3))
        else:
            byte = tl.load(bits + (local >> 3), mask=inside, other=0)
        m = (byte.to(tl.int32) >> (local & 7).to(tl.int32)) & 1
    else:
        row = tl.arange(0, BLOCK // 4)
        if inside is None:
            byte = tl.load(bits + (first >> 3) + (row >> 1))
        else:
            byte = tl.load(
                bits + (first >> 3) + (row >> 1), mask=(first + 4 * row >= 0) & (first + 4 * row < n), other=0
            )
        shift = (row & 1) * 4
        m = (byte.to(tl.int32)[:, None] >> (shift[:, None] + tl.arange(0, 4)[None, :])) & 1
    return m.to(tl.float32)


@triton.jit(do_not_specialize=["start", "seed_lo", "seed_hi", "key_lo", "key_hi"])  # an int argument equal
# to 1 is otherwise compiled as a constant, which has no .to()
def _words_kernel(out, n, start, seed_lo, seed_hi, key_lo, key_hi, BLOCK: tl.constexpr):
    """out[i] = rounding word of element start + i (stream 1), as int32 bits."""
    g0 = (start // BLOCK + tl.program_id(0)) * BLOCK
    local = g0 - start + tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = (local >= 0) & (local < n)
    w0, w1, w2, w3 = _words(
        g0 // 4, BLOCK // 4, 1, key_lo.to(tl.uint32), key_hi.to(tl.uint32), seed_lo.to(tl.uint32), seed_hi.to(tl.uint32)
    )
    w = _lanes(w0, w1, w2, w3)
    tl.store(out + local, w.to(tl.int32, bitcast=True), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side


def _split(v: int) -> tuple[int, int]:
    v = int(v) % 2**64
    return v & 0xFFFFFFFF, v >> 32


def _halves32(v: int) -> tuple[int, int]:
    """The 32-bit halves of a 64-bit value as int32 bit patterns: Triton passes them as i32 (one kernel
    signature for every seed and key, no host-to-device copy)."""
    v = int(v) & 0xFFFFFFFFFFFFFFFF
    lo, hi = v & 0xFFFFFFFF, v >> 32
    return lo - ((lo >> 31) << 32), hi - ((hi >> 31) << 32)


def _device_ok(x: torch.Tensor) -> bool:
    return x.is_cuda or (INTERPRETED and x.device.type == "cpu")


def _check(x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"the triton backend supports float32, bfloat16 and float16, got {x.dtype}")
    if not _device_ok(x) or not x.is_contiguous():
        raise ValueError(
            f"the triton backend needs contiguous CUDA tensors, got device={x.device}, contiguous={x.is_contiguous()}"
        )


# Launch plans of multi-tensor sweeps, least recently used first. A plan is what one list of tensors
# needs for its launches: per (dtype, device) group, the index of the group's first tensor (the base
# pointer), the table of its tensors, the tensor index of every program and the alignment. It is keyed
# on every tensor's pointer, size, dtype, device, contiguity, key and start, so a hit needs no check.
# Bounded by count and by the bytes of its tables (one int32 per tile: 4 bytes per BLOCK elements,
# ~0.1% of fp16 weights) rather than cleared when full, so that a cycle of plans that fits stays
# cached (a model's per-layer sweeps each call one plan in turn).
_PLANS: OrderedDict[tuple, tuple[list, int]] = OrderedDict()
_MAX_PLANS = 1024
_MAX_PLAN_BYTES = 256 << 20
_plan_bytes = 0
_STATS = {"built": 0, "hits": 0, "single": 0}


def table_stats() -> dict[str, int]:
    """Counts since import: launch plans ``built`` (each one a host-to-device copy on a GPU) and ``hits``
    (multi-tensor sweeps that reused a cached plan); ``single``: single-tensor sweeps (no table at all)."""
    return dict(_STATS, cached=len(_PLANS), cached_bytes=_plan_bytes)


_dtype = operator.attrgetter("dtype")


def _plan(tensors, keys, starts, block: int) -> list:
    """[(index of the group's first tensor, table, tiles, alignment)] per (dtype, device) group, cached."""
    global _plan_bytes
    if not len(tensors) == len(keys) == len(starts):
        raise ValueError(f"{len(tensors)} tensors, {len(keys)} keys and {len(starts)} starts: one of each per tensor")
    T = torch.Tensor  # map over C methods: no Python bytecode per tensor (this runs on every sweep)
    ident = (
        block,
        tuple(map(T.data_ptr, tensors)),
        tuple(map(T.numel, tensors)),
        tuple(map(_dtype, tensors)),
        tuple(map(T.get_device, tensors)),
        all(map(T.is_contiguous, tensors)),
        tuple(keys),
        tuple(starts),
    )
    hit = _PLANS.get(ident)
    if hit is not None:
        _PLANS.move_to_end(ident)
        _STATS["hits"] += 1
        return hit[0]
    groups: dict[tuple, list] = {}
    for i, (x, key, start) in enumerate(zip(tensors, keys, starts)):
        _check(x)
        start = int(start)
        rng._check_range(start, x.numel())
        if x.numel():
            groups.setdefault((x.dtype, x.device), []).append((i, x, int(key), start))
    plan, nbytes = [], 0
    for group in groups.values():
        table, tiles, align, host = _tables(group, block)
        plan.append((group[0][0], table, tiles, align, host))
        nbytes += table.numel() * 8 + tiles.numel() * 4
    _PLANS[ident] = (plan, nbytes)
    _plan_bytes += nbytes
    _STATS["built"] += 1
    while len(_PLANS) > 1 and (len(_PLANS) > _MAX_PLANS or _plan_bytes > _MAX_PLAN_BYTES):
        _, (_, old) = _PLANS.popitem(last=False)
        _plan_bytes -= old
    return plan


def _tables(group: list[tuple[int, torch.Tensor, int, int]], block: int):
    """(tensor table, per-program tensor index, alignment in elements, host copies) of (index, tensor, key,
    start) rows, all of one dtype and one device."""
    size = group[0][1].element_size()
    base = group[0][1].data_ptr()
    rows, owners, first = [], [], 0
    for i, (_, x, key, start) in enumerate(group):
        n = x.numel()
        ntiles = (start + n - 1) // block - start // block + 1
        delta = x.data_ptr() - base
        if delta % size:
            raise ValueError("tensors of one dtype must be aligned to their element size")
        rows.append([delta // size, n, start, *_split(key), first])
        owners.append(torch.full((ntiles,), i, dtype=torch.int32))
        first += ntiles
    vec = max(1, 16 // size)  # elements per 16-byte vector
    align = vec if base % 16 == 0 and all(r[0] % vec == 0 and r[2] % vec == 0 for r in rows) else 1
    if first >= 2**31:
        raise ValueError(f"too many tiles for one launch ({first}); use a larger block")
    device = group[0][1].device
    host = (torch.tensor(rows, dtype=torch.int64).reshape(-1), torch.cat(owners))
    if device.type == "cuda":  # pinned, so the copies do not block the host; kept alive with the plan
        host = tuple(h.pin_memory() for h in host)
    table, tiles = (h.to(device, non_blocking=True) for h in host)
    return table, tiles, align, host


def _sweep_one(
    x, key: int, start: int, seeds, scale: float, c0: float, c1: float, extra, rounding_seed, fill: bool, consts: dict
) -> None:
    """:func:`sweep` of one tensor, described to its kernel by scalar arguments (no launch table)."""
    _check(x)
    n = x.numel()
    rng._check_range(start, n)
    if n == 0:
        return
    block = consts["BLOCK"]
    vec = max(1, 16 // x.element_size())
    align = vec if x.data_ptr() % 16 == 0 and start % vec == 0 else 1
    ntiles = (start + n - 1) // block - start // block + 1
    _STATS["single"] += 1
    _sweep_kernel_one[(ntiles,)](
        x.detach(),
        n,
        start,
        *_halves32(key),
        *seeds,
        scale,
        c0,
        c1,
        _extra_on(extra, x.device),
        ROUND=rounding_seed is not None and x.dtype != torch.float32 and not fill,
        ALIGN=align,
        **consts,
    )


def _extra_terms(terms) -> torch.Tensor | None:
    """The terms past the first two as the kernels read them: int32 (seed lo, seed hi, float32 bits of c) each;
    None for one or two terms (the kernel then reads nothing)."""
    if len(terms) <= 2:
        return None
    import numpy as np

    rows = [(*_halves32(s), int(np.float32(c).view(np.int32))) for s, c in terms[2:]]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1)


_NO_EXTRA: dict = {}  # device -> a 3-word int32 tensor passed where there are no extra terms (never read)


def _extra_on(extra: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``extra`` on the tensors' device, copied from pinned memory without blocking the host (the caching host
    allocator keeps the pinned block until the copy is done); no copy at all for one or two terms."""
    if extra is None:
        if device not in _NO_EXTRA:
            _NO_EXTRA[device] = torch.zeros(3, dtype=torch.int32, device=device)
        return _NO_EXTRA[device]
    if device.type != "cuda":
        return extra
    return extra.pin_memory().to(device, non_blocking=True)


def sweep(
    tensors,
    keys,
    starts,
    distribution: str,
    terms,
    *,
    scale: float = 1.0,
    fill: bool = False,
    rounding_seed: int | None = None,
    block: int | None = None,
) -> None:
    """In place, for every tensor: x <- (0 if fill else x * scale) + sum(c * z(s) for s, c in terms).

    One launch per dtype. A single tensor is described to its kernel by scalar arguments; several go
    through a launch table, built once per list of tensors and cached (:func:`table_stats`).

    Args:
        tensors: contiguous CUDA tensors (CPU under TRITON_INTERPRET=1), float32/bfloat16/float16;
            tensor i holds elements ``starts[i] ..`` of the parameter whose key is ``keys[i]``.
        terms: one or two (seed, coefficient) pairs (one for ``fill``); Rademacher takes any number (FZOO's
            update, n-SPSA): the terms past two are read from a small int32 buffer, all added in the one pass.
        rounding_seed: when set, 16-bit results are rounded stochastically with this seed's rounding
            stream (stream 1); float32 tensors ignore it.
        block: elements per program (a power of two >= 128); ``None`` for the module default.
    """
    if distribution not in rng.DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {rng.DISTRIBUTIONS}")
    terms = [(int(s), float(c)) for s, c in terms]
    rademacher = distribution == "rademacher"
    if not 1 <= len(terms) <= (MAX_TERMS if rademacher and not fill else 2):
        raise ValueError(
            f"terms must hold one or two (seed, coefficient) pairs (up to {MAX_TERMS} for a Rademacher sweep), "
            f"got {len(terms)}"
        )
    block = int(block or BLOCK)
    if block < 128 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 128, got {block}")
    seeds = (
        *_halves32(terms[0][0]),
        *(_halves32(terms[1][0]) if len(terms) >= 2 else (0, 0)),
        *_halves32(rounding_seed or 0),
    )
    c0 = float(terms[0][1])
    c1 = float(terms[1][1]) if len(terms) >= 2 else 0.0
    extra = _extra_terms(terms)
    # FMA contraction named, not left to Triton's default (which a later Triton turns off): on for the Gaussian,
    # whose bits were made with it; off for Rademacher, whose sum x * scale + (+-c) is then rounded twice, as in
    # the reference and as the previous kernel's contraction (into fma(c, z, x * scale)) did.
    consts = dict(
        NT=len(terms),
        FILL=bool(fill),
        RADEMACHER=rademacher,
        FAST=distribution == "gaussian-fast",
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
        enable_fp_fusion=not rademacher,
    )
    if len(tensors) == len(keys) == len(starts) == 1:  # fill, axpy, a per-tensor sweep: scalar arguments
        _sweep_one(tensors[0], keys[0], int(starts[0]), seeds, float(scale), c0, c1, extra, rounding_seed, fill, consts)
        return
    for index, table, tiles, align, _ in _plan(tensors, keys, starts, block):
        x = tensors[index]
        _sweep_kernel[(tiles.numel(),)](
            x.detach(),
            table,
            tiles,
            *seeds,
            float(scale),
            c0,
            c1,
            _extra_on(extra, x.device),
            ROUND=rounding_seed is not None and x.dtype != torch.float32 and not fill,
            ALIGN=align,
            **consts,
        )


def fill(x: torch.Tensor, distribution: str, seed: int, key: int, start: int) -> None:
    """x[:] = z[start : start + x.numel()] of ``distribution`` for (seed, key)."""
    sweep([x], [key], [start], distribution, [(seed, 1.0)], fill=True)


def axpy(x: torch.Tensor, distribution: str, key: int, start: int, scale: float, terms) -> None:
    """x[:] = x * scale + sum(c * z(s) for s, c in terms), in one pass over x."""
    sweep([x], [key], [start], distribution, terms, scale=scale)


def masked_axpy(x: torch.Tensor, distribution: str, key: int, start: int, scale: float, terms, bits) -> None:
    """x[:] = x * scale + sum(c * m * z(s) for s, c in terms) in one pass, m the packed mask ``bits`` of x's
    elements (uint8, bit i of byte k: element 8k + i of x); x float32 (functional's float32 work)."""
    if distribution not in rng.DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {rng.DISTRIBUTIONS}")
    _check(x)
    terms = [(int(s), float(c)) for s, c in terms]
    if x.dtype != torch.float32 or not 1 <= len(terms) <= 2 or int(start) % 8:
        raise ValueError("masked_axpy takes a float32 tensor, one or two terms and a start that is a multiple of 8")
    n, start = x.numel(), int(start)
    if bits.dtype != torch.uint8 or bits.device != x.device or bits.numel() != (n + 7) // 8:
        raise ValueError(f"bits must be {(n + 7) // 8} uint8 bytes on {x.device}")
    rng._check_range(start, n)
    if n == 0:
        return
    block = BLOCK
    seeds = (*_halves32(terms[0][0]), *(_halves32(terms[1][0]) if len(terms) == 2 else (0, 0)))
    _masked_kernel[((start + n - 1) // block - start // block + 1,)](
        x.detach(),
        bits.contiguous(),
        n,
        start,
        *_halves32(key),
        *seeds,
        float(scale),
        terms[0][1],
        terms[1][1] if len(terms) == 2 else 0.0,
        NT=len(terms),
        RADEMACHER=distribution == "rademacher",
        FAST=distribution == "gaussian-fast",
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )


def words(out, seed: int, key: int, start: int) -> None:
    """out[:] = rng.rounding_words(seed, key, start, len(out)); out a NumPy uint32 array or an int32 tensor."""
    import numpy as np

    start = int(start)
    n = len(out)
    rng._check_range(start, n)
    if n == 0:
        return
    is_numpy = isinstance(out, np.ndarray)
    device = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
    dst = torch.empty(n, dtype=torch.int32, device=device) if is_numpy else out
    ntiles = (start + n - 1) // BLOCK - start // BLOCK + 1
    _words_kernel[(ntiles,)](dst, n, start, *_split(seed), *_split(key), BLOCK=BLOCK)
    if is_numpy:
        out[:] = dst.cpu().numpy().view(np.uint32)


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and not INTERPRETED


BACKEND = Backend(
    "triton",
    fill,
    axpy,
    supports,
    priority=20,
    chunk=1 << 62,
    words=words,
    device_words=True,
    sweep=sweep,
    sweep_terms=lambda distribution: MAX_TERMS if distribution == "rademacher" else 2,
    masked_axpy=masked_axpy,
)
