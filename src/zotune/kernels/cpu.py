"""The numba CPU backend: Philox-4x32-10 and Box–Muller, multi-threaded and vectorised.

Produces the numbers defined in :mod:`zotune.rng` (Rademacher signs and rounding words bit for
bit, Gaussians to a few float32 ulps; see ``tests/test_kernels.py``) at memory-bandwidth-like speed.

How it is fast:

- the tensor is cut into chunks of ``CHUNK`` elements aligned to the *global* element index; the
  chunks are spread over ``numba.get_num_threads()`` workers (``prange``), each with its own small
  scratch buffers (a few tens of KiB: they stay in L1/L2);
- inside a chunk, plain ``for`` loops over contiguous scratch arrays with straight-line, branch-free
  bodies, which LLVM auto-vectorises: Philox with 64-bit products of 32-bit values
  (``vpmuludq``), then Box–Muller with a polynomial ``log`` (Cephes ``logf``; exponent and
  mantissa taken from the float's bits) and polynomial ``sin``/``cos`` on a quarter period (the
  quadrant comes from the top bits of the 24-bit angle, so the reduction is exact), then one fused
  pass ``x = x * scale + sum(c * z)`` over the tensor;
- every element is computed by the same code whatever the chunking, the thread count or ``start``:
  the results are bit-for-bit independent of ``numba.get_num_threads()`` and of how a tensor is
  split into pieces (tested).

Float semantics: everything is float32 with plain IEEE operations (no ``fastmath``: no FMA
contraction, no reassociation, no approximate functions), so the bits do not depend on the
instruction set either: SSE2, AVX2 and AVX-512 builds give identical results (checked), as should
any IEEE-754 CPU (no intermediate is subnormal, so flush-to-zero modes do not matter either).
FMA contraction would be ~15% faster but would tie the bits to the FMA unit and the compiler's choices.
The one exception is explicit: the masked combine of sparse directions rounds each term as a fused
multiply-add (``llvm.fma``, correctly rounded on any CPU), because that is what the torch path it
replaces computes on this machine (``addcmul_``), and both must give a trajectory the same bits.

Threads: as many workers per call as torch uses (``torch.get_num_threads()``, set by
``OMP_NUM_THREADS`` or ``torch.set_num_threads``), at most ``numba.get_num_threads()``: one knob
for the forward passes and the sweeps, so a process told to use one core does not run a second
sweep thread beside it. Tensors shorter than two chunks run on the calling thread alone.
"""

from __future__ import annotations

import math

import numba  # ImportError propagates: zotune.kernels then runs without this backend
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from zotune import rng
from zotune.kernels import Backend

__all__ = ["BACKEND", "CHUNK", "axpy", "fill", "masked_axpy", "pack_mask", "rounding_words", "supports"]

CHUNK = 8192  # elements per work item; a multiple of 128 (one Rademacher block)
_SERIAL_BELOW = 2 * CHUNK  # smaller tensors skip the thread pool (its launch costs more than the work)

_JIT = dict(cache=True, nogil=True, fastmath=False, error_model="numpy", boundscheck=False)

# ---------------------------------------------------------------------------------------------
# constants (module globals are frozen into the compiled code; typed np scalars keep the arithmetic
# in uint64 / int64 / float32 without numba's promotions to float64)

_GAUSSIAN, _RADEMACHER, _GAUSSIAN_FAST = 0, 1, 2  # the streams, as the chunk loops take them
_KINDS = {"gaussian": _GAUSSIAN, "rademacher": _RADEMACHER, "gaussian-fast": _GAUSSIAN_FAST}

_U = np.uint64
_M32 = _U(0xFFFFFFFF)
_S32 = _U(32)
_PM0 = _U(0xD2511F53)
_PM1 = _U(0xCD9E8D57)
_PW0 = _U(0x9E3779B9)
_PW1 = _U(0xBB67AE85)

_F = np.float32
_F1 = _F(1.0)
_FM2 = _F(-2.0)
_FHALF = _F(0.5)
# Cephes logf on [sqrt(1/2), sqrt(2)): log(1+f) = f - f^2/2 + f^3 * P(f); ln 2 split in hi + lo
_L0 = _F(7.0376836292e-2)
_L1 = _F(-1.1514610310e-1)
_L2 = _F(1.1676998740e-1)
_L3 = _F(-1.2420140846e-1)
_L4 = _F(1.4249322787e-1)
_L5 = _F(-1.6668057665e-1)
_L6 = _F(2.0000714765e-1)
_L7 = _F(-2.4999993993e-1)
_L8 = _F(3.3333331174e-1)
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
# Cephes sinf / cosf on [-pi/4, pi/4]
_S0 = _F(-1.9515295891e-4)
_S1 = _F(8.3321608736e-3)
_S2 = _F(-1.6666654611e-1)
_C0 = _F(2.443315711809948e-5)
_C1 = _F(-1.388731625493765e-3)
_C2 = _F(4.166664568298827e-2)
_ANGLE = _F(math.pi / 2 / 2**22)  # radians per unit of the 22-bit in-quadrant angle

_I = np.int64
_MANT = _I(0x007FFFFF)
_SQRTH_BITS = _I(0x3F3504F3)  # bits of float32(sqrt(1/2))
_ONE_BITS = _I(0x3F800000)
_EXP_BIAS = _I(127 + 24)  # float exponent bias, plus the 2**-24 of u = (k + 1) * 2**-24
_Q_HALF = _I(1 << 21)
_I22 = _I(22)
_I23 = _I(23)
_I30 = _I(30)
_I16 = _I(16)
_I3 = _I(3)
_I2 = _I(2)
_I1 = _I(1)


@intrinsic
def _f32_bits(typingctx, x):
    """The IEEE bits of a float32, as int32 (a bitcast: free, and vectorisable)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, x):
    """The float32 whose IEEE bits are the int32 ``x``."""
    if x != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _fma32(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma: the FMA instruction, or libm's correctly rounded fmaf without one)."""
    if not (a == types.float32 and b == types.float32 and c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


# ---------------------------------------------------------------------------------------------
# Philox-4x32-10, vectorised over blocks


@njit(**_JIT)
def _round(x0, x1, x2, x3, ka, kb):
    p0 = _PM0 * x0  # both factors < 2**32: exact, and LLVM emits vpmuludq
    p1 = _PM1 * x2
    return (p1 >> _S32) ^ x1 ^ ka, p1 & _M32, (p0 >> _S32) ^ x3 ^ kb, p0 & _M32


@njit(**_JIT)
def _philox(block0, nb, stream, key_lo, key_hi, seed_lo, seed_hi, w0, w1, w2, w3):
    """Words of blocks block0 .. block0+nb-1 into w0..w3[:nb] (uint32 arrays)."""
    c1 = _U(stream)
    c2 = _U(key_lo)
    c3 = _U(key_hi)
    a0 = _U(seed_lo)
    b0 = _U(seed_hi)
    a1 = (a0 + _PW0) & _M32
    b1 = (b0 + _PW1) & _M32
    a2 = (a1 + _PW0) & _M32
    b2 = (b1 + _PW1) & _M32
    a3 = (a2 + _PW0) & _M32
    b3 = (b2 + _PW1) & _M32
    a4 = (a3 + _PW0) & _M32
    b4 = (b3 + _PW1) & _M32
    a5 = (a4 + _PW0) & _M32
    b5 = (b4 + _PW1) & _M32
    a6 = (a5 + _PW0) & _M32
    b6 = (b5 + _PW1) & _M32
    a7 = (a6 + _PW0) & _M32
    b7 = (b6 + _PW1) & _M32
    a8 = (a7 + _PW0) & _M32
    b8 = (b7 + _PW1) & _M32
    a9 = (a8 + _PW0) & _M32
    b9 = (b8 + _PW1) & _M32
    base = _U(block0)
    for j in range(nb):
        x0 = (base + _U(j)) & _M32
        x1 = c1
        x2 = c2
        x3 = c3
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a0, b0)
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a1, b1)
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a2, b2)
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a3, b3)
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a4, b4)
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a5, b5)
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a6, b6)
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a7, b7)
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a8, b8)
        x0, x1, x2, x3 = _round(x0, x1, x2, x3, a9, b9)
        w0[j] = np.uint32(x0)
        w1[j] = np.uint32(x1)
        w2[j] = np.uint32(x2)
        w3[j] = np.uint32(x3)


# ---------------------------------------------------------------------------------------------
# Box–Muller in float32


@njit(**_JIT)
def _box_muller(wa, wb):
    """(r cos 2 pi v, r sin 2 pi v) for the words (wa, wb) (uint32), as in rng.gaussian."""
    # r = sqrt(-2 ln u), u = n * 2**-24 with n = (wa >> 8) + 1 in [1, 2**24] (exact in float32)
    n = np.int32((_I(wa) >> _I(8)) + _I1)
    bits = _I(_f32_bits(np.float32(n))) + (_ONE_BITS - _SQRTH_BITS)
    e = np.float32(np.int32((bits >> _I23) - _EXP_BIAS))  # u = m * 2**e with m in [sqrt(1/2), sqrt(2))
    m = _bits_f32(np.int32((bits & _MANT) + _SQRTH_BITS))
    f = m - _F1
    f2 = f * f
    p = _L0 * f + _L1
    p = p * f + _L2
    p = p * f + _L3
    p = p * f + _L4
    p = p * f + _L5
    p = p * f + _L6
    p = p * f + _L7
    p = p * f + _L8
    y = p * f * f2
    y = y + _LN2_LO * e
    y = y - _FHALF * f2
    lnu = f + y
    lnu = lnu + _LN2_HI * e
    r = np.sqrt(_FM2 * lnu)
    # angle 2 pi v, v = k * 2**-24, k = wb >> 8: quadrant q = round(k / 2**22) mod 4, exact remainder t
    k = _I(wb) >> _I(8)
    qq = (k + _Q_HALF) >> _I22
    t = k - (qq << _I22)  # in [-2**21, 2**21)
    q = qq & _I3
    th = np.float32(np.int32(t)) * _ANGLE  # in [-pi/4, pi/4)
    z = th * th
    s = ((_S0 * z + _S1) * z + _S2) * z * th + th
    c = ((_C0 * z + _C1) * z + _C2) * z * z - _FHALF * z + _F1
    swap = (q & _I1) != 0
    cq = s if swap else c
    sq = c if swap else s
    flip_c = ((q + _I1) & _I2) << _I30  # sign bit: cos(q pi/2 + th) < 0 for q in {1, 2}
    flip_s = (q & _I2) << _I30  # sign bit: sin(q pi/2 + th) < 0 for q in {2, 3}
    zc = _bits_f32(np.int32(_I(_f32_bits(r * cq)) ^ flip_c))
    zs = _bits_f32(np.int32(_I(_f32_bits(r * sq)) ^ flip_s))
    return zc, zs


@njit(**_JIT)
def _gauss_blocks(nb, w0, w1, w2, w3, z):
    """z[:4 nb] = the Gaussians of nb blocks whose words are w0..w3[:nb]."""
    for j in range(nb):
        za, zb = _box_muller(w0[j], w1[j])
        zc, zd = _box_muller(w2[j], w3[j])
        z[4 * j] = za
        z[4 * j + 1] = zb
        z[4 * j + 2] = zc
        z[4 * j + 3] = zd


@njit(**_JIT)
def _gauss_fast_blocks(nb, w0, w1, w2, w3, z):
    """z[:8 nb] = the fast Gaussians of nb blocks (rng.gaussian_fast): word j gives lanes 2j, 2j + 1."""
    for j in range(nb):
        _fast_pair(w0[j], z, 8 * j)
        _fast_pair(w1[j], z, 8 * j + 2)
        _fast_pair(w2[j], z, 8 * j + 4)
        _fast_pair(w3[j], z, 8 * j + 6)


@njit(**_JIT)
def _fast_pair(w, z, at):
    """z[at], z[at + 1] from one word's 16-bit halves, by :func:`_box_muller` on words that carry them in its
    24-bit fields: (hi + 1) * 2**8 - 1 above the low byte gives u = (hi + 1) * 2**-16, lo * 2**8 gives v = lo * 2**-16."""
    ww = _I(w)
    za, zb = _box_muller(np.uint32(((ww >> _I16) << _I16) | _I(0xFF00)), np.uint32((ww << _I16) & _I(0xFFFFFFFF)))
    z[at] = za
    z[at + 1] = zb


@njit(**_JIT)
def _sign_blocks(nb, w0, w1, w2, w3, z):
    """z[:128 nb] = the +-1 of nb blocks whose words are w0..w3[:nb] (bit j of a word: element j)."""
    for j in range(nb):
        at = 128 * j
        _sign_word(w0[j], z[at : at + 32])
        _sign_word(w1[j], z[at + 32 : at + 64])
        _sign_word(w2[j], z[at + 64 : at + 96])
        _sign_word(w3[j], z[at + 96 : at + 128])


@njit(**_JIT)
def _sign_word(w, z):
    """z[:32] = +-1 from the bits of the word w (bit b set: +1)."""
    ww = np.int32(w)
    for b in range(32):
        z[b] = np.float32(np.int32(((ww >> np.int32(b)) & np.int32(1)) * np.int32(2) - np.int32(1)))


@njit(**_JIT)
def _combine(x, xo, z0, z1, zo, m, nt, scale, c0, c1, fill):
    """x[xo:xo+m] = (fill ? 0 : x * scale) + c0 * z0[zo:] (+ c1 * z1[zo:] when nt == 2)."""
    xs = x[xo : xo + m]
    a = z0[zo : zo + m]
    if fill:
        for i in range(m):
            xs[i] = a[i]
    elif nt == 1:
        for i in range(m):
            xs[i] = xs[i] * scale + c0 * a[i]
    else:
        b = z1[zo : zo + m]
        for i in range(m):
            xs[i] = (xs[i] * scale + c0 * a[i]) + c1 * b[i]


@njit(**_JIT)
def _combine_masked(x, xo, z0, z1, zo, m, nt, scale, c0, c1, bits):
    """Sparse directions: x = fma(c1 b, z1, fma(c0 b, z0, x * scale)) over x[xo:xo+m], b in {0., 1.} the bit of
    each element in ``bits`` (packed, bit i of byte k: element 8k + i of x).

    Rounded as the torch path of ``zotune.optim.masked.masked_sweep_`` is on a CPU with FMA (``addcmul_`` there is one
    fused multiply-add per term, measured), so the two give the same bits and trajectories written by either
    replay on the other. ``b`` multiplies rather than selects, as that path's does: a masked-off -0.0 weight
    becomes +0.0 in both.
    """
    xs = x[xo : xo + m]
    a = z0[zo : zo + m]
    b = z1[zo : zo + m] if nt == 2 else z0[zo : zo + m]
    mb = bits[xo >> 3 :]  # xo is a multiple of 8 (chunks are CHUNK-aligned, x starts on a byte)
    for i in range(m):
        bit = _F(np.int32((np.int32(mb[i >> 3]) >> np.int32(i & 7)) & np.int32(1)))
        v = xs[i] * scale
        if nt == 2:
            xs[i] = _fma32(c1 * bit, b[i], _fma32(c0 * bit, a[i], v))
        else:
            xs[i] = _fma32(c0 * bit, a[i], v)


@njit(**_JIT)
def _pack_bytes(x, h, bits, k0, k1):
    """bits[k] = the byte of elements 8k .. 8k+7 of x with |x| <= h (bit i: element 8k + i), k in k0 .. k1-1."""
    n = x.shape[0]
    for k in range(k0, min(k1, n // 8)):  # whole bytes: branch-free, so LLVM vectorises it
        xs = x[8 * k : 8 * k + 8]
        byte = np.uint32(0)
        for i in range(8):
            byte |= np.uint32(abs(xs[i]) <= h) << np.uint32(i)
        bits[k] = np.uint8(byte)
    for k in range(max(k0, n // 8), k1):  # the last, partial byte
        byte = np.uint32(0)
        for j in range(8 * k, n):
            byte |= np.uint32(abs(x[j]) <= h) << np.uint32(j - 8 * k)
        bits[k] = np.uint8(byte)


@njit(parallel=True, **_JIT)
def _pack_parallel(x, h, bits, workers):
    nbytes = bits.shape[0]
    for w in prange(workers):
        _pack_bytes(x, h, bits, w * nbytes // workers, (w + 1) * nbytes // workers)


# ---------------------------------------------------------------------------------------------
# chunk loops (one worker's share) and their serial / parallel drivers


@njit(**_JIT)
def _z_chunks(x, start, chunk0, chunk1, kind, key_lo, key_hi, seeds, coefs, scale, fill, bits):
    """Chunks chunk0 .. chunk1-1 (global CHUNK-aligned) of x, which holds elements start .. start+len(x)-1.

    kind: the stream (_GAUSSIAN, _RADEMACHER, _GAUSSIAN_FAST); seeds: int64 array (nt, 2) of (lo32, hi32); coefs:
    float32 array (nt,); bits: x's packed mask (uint8), or empty for dense directions.
    """
    end = start + x.shape[0]
    nt = seeds.shape[0]
    per = 128 if kind == _RADEMACHER else (8 if kind == _GAUSSIAN_FAST else 4)  # elements per Philox block
    nbmax = CHUNK // per
    w0 = np.empty(nbmax, np.uint32)
    w1 = np.empty(nbmax, np.uint32)
    w2 = np.empty(nbmax, np.uint32)
    w3 = np.empty(nbmax, np.uint32)
    z0 = np.empty(CHUNK, np.float32)
    z1 = np.empty(CHUNK if nt > 1 else 0, np.float32)
    c0 = coefs[0]
    c1 = coefs[1] if nt > 1 else np.float32(0.0)
    for chunk in range(chunk0, chunk1):
        g0 = max(start, chunk * CHUNK)
        g1 = min(end, (chunk + 1) * CHUNK)
        b0 = g0 // per
        nb = (g1 + per - 1) // per - b0
        for t in range(nt):
            zt = z0 if t == 0 else z1
            _philox(b0, nb, rng.STREAM_Z, key_lo, key_hi, seeds[t, 0], seeds[t, 1], w0, w1, w2, w3)
            if kind == _RADEMACHER:
                _sign_blocks(nb, w0, w1, w2, w3, zt)
            elif kind == _GAUSSIAN_FAST:
                _gauss_fast_blocks(nb, w0, w1, w2, w3, zt)
            else:
                _gauss_blocks(nb, w0, w1, w2, w3, zt)
        if bits.shape[0]:
            _combine_masked(x, g0 - start, z0, z1, g0 - b0 * per, g1 - g0, nt, scale, c0, c1, bits)
        else:
            _combine(x, g0 - start, z0, z1, g0 - b0 * per, g1 - g0, nt, scale, c0, c1, fill)


@njit(**_JIT)
def _z_serial(x, start, kind, key_lo, key_hi, seeds, coefs, scale, fill, bits):
    first = start // CHUNK
    last = (start + x.shape[0] - 1) // CHUNK + 1
    _z_chunks(x, start, first, last, kind, key_lo, key_hi, seeds, coefs, scale, fill, bits)


@njit(parallel=True, **_JIT)
def _z_parallel(x, start, kind, key_lo, key_hi, seeds, coefs, scale, fill, bits, workers):
    first = start // CHUNK
    nchunks = (start + x.shape[0] - 1) // CHUNK + 1 - first
    for w in prange(workers):
        lo = first + w * nchunks // workers
        hi = first + (w + 1) * nchunks // workers
        _z_chunks(x, start, lo, hi, kind, key_lo, key_hi, seeds, coefs, scale, fill, bits)


@njit(**_JIT)
def _words_chunks(out, start, chunk0, chunk1, key_lo, key_hi, seed_lo, seed_hi):
    end = start + out.shape[0]
    nbmax = CHUNK // 4
    w0 = np.empty(nbmax, np.uint32)
    w1 = np.empty(nbmax, np.uint32)
    w2 = np.empty(nbmax, np.uint32)
    w3 = np.empty(nbmax, np.uint32)
    ws = np.empty(CHUNK, np.uint32)
    for chunk in range(chunk0, chunk1):
        g0 = max(start, chunk * CHUNK)
        g1 = min(end, (chunk + 1) * CHUNK)
        b0 = g0 // 4
        nb = (g1 + 3) // 4 - b0
        _philox(b0, nb, rng.STREAM_ROUNDING, key_lo, key_hi, seed_lo, seed_hi, w0, w1, w2, w3)
        for j in range(nb):
            ws[4 * j] = w0[j]
            ws[4 * j + 1] = w1[j]
            ws[4 * j + 2] = w2[j]
            ws[4 * j + 3] = w3[j]
        m = g1 - g0
        dst = out[g0 - start : g0 - start + m]
        src = ws[g0 - 4 * b0 : g0 - 4 * b0 + m]
        for i in range(m):
            dst[i] = src[i]


@njit(**_JIT)
def _words_serial(out, start, key_lo, key_hi, seed_lo, seed_hi):
    first = start // CHUNK
    last = (start + out.shape[0] - 1) // CHUNK + 1
    _words_chunks(out, start, first, last, key_lo, key_hi, seed_lo, seed_hi)


@njit(parallel=True, **_JIT)
def _words_parallel(out, start, key_lo, key_hi, seed_lo, seed_hi, workers):
    first = start // CHUNK
    nchunks = (start + out.shape[0] - 1) // CHUNK + 1 - first
    for w in prange(workers):
        lo = first + w * nchunks // workers
        hi = first + (w + 1) * nchunks // workers
        _words_chunks(out, start, lo, hi, key_lo, key_hi, seed_lo, seed_hi)


# ---------------------------------------------------------------------------------------------
# the backend interface


def _split(v: int) -> tuple[int, int]:
    v = int(v) % 2**64
    return v & 0xFFFFFFFF, v >> 32


def _buffer(x: torch.Tensor) -> np.ndarray:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(
            f"the numba backend needs a contiguous float32 CPU tensor, got dtype={x.dtype}, "
            f"device={x.device}, contiguous={x.is_contiguous()}"
        )
    return x.detach().view(-1).numpy()


def _workers(n: int) -> int:
    if n < _SERIAL_BELOW:
        return 1
    return max(1, min(numba.get_num_threads(), torch.get_num_threads(), n // CHUNK))


_DENSE = np.empty(0, np.uint8)


def _run(
    x: torch.Tensor, distribution: str, key: int, start: int, scale: float, terms, fill_: bool, bits=_DENSE
) -> None:
    if distribution not in rng.DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {rng.DISTRIBUTIONS}")
    buf = _buffer(x)
    start = int(start)
    n = buf.shape[0]
    rng._check_range(start, n)
    terms = list(terms)
    if not 1 <= len(terms) <= 2:
        raise ValueError(f"terms must hold one or two (seed, coefficient) pairs, got {len(terms)}")
    if n == 0:
        return
    key_lo, key_hi = _split(key)
    seeds = np.array([_split(s) for s, _ in terms], dtype=np.int64)
    coefs = np.array([c for _, c in terms], dtype=np.float32)
    kind = _KINDS[distribution]
    scale32 = np.float32(scale)
    workers = _workers(n)
    if workers == 1:
        _z_serial(buf, start, kind, key_lo, key_hi, seeds, coefs, scale32, fill_, bits)
    else:
        _z_parallel(buf, start, kind, key_lo, key_hi, seeds, coefs, scale32, fill_, bits, workers)


def fill(x: torch.Tensor, distribution: str, seed: int, key: int, start: int) -> None:
    """x[:] = z[start : start + x.numel()] of ``distribution`` for (seed, key)."""
    _run(x, distribution, key, start, 1.0, [(seed, 1.0)], True)


def axpy(x: torch.Tensor, distribution: str, key: int, start: int, scale: float, terms) -> None:
    """x[:] = x * scale + sum(c * z(s) for s, c in terms), in float32, in one pass over x."""
    _run(x, distribution, key, start, scale, terms, False)


def masked_axpy(x: torch.Tensor, distribution: str, key: int, start: int, scale: float, terms, bits) -> None:
    """x[:] = x * scale + sum(c * m * z(s) for s, c in terms), m the packed mask ``bits`` of x's elements (a
    uint8 tensor, bit i of byte k: element 8k + i of x), in one pass over x (see :func:`_combine_masked`)."""
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.device.type != "cpu":
        raise ValueError("bits must be a uint8 CPU tensor (functional.magnitude_mask's packing)")
    if bits.numel() != (x.numel() + 7) // 8:
        raise ValueError(f"bits holds {bits.numel()} bytes, and {x.numel()} elements need {(x.numel() + 7) // 8}")
    if int(start) % 8:  # chunks then start on a byte of bits (CHUNK is a multiple of 8)
        raise ValueError(f"masked_axpy needs a start that is a multiple of 8, got {start}")
    packed = bits.contiguous().numpy()
    _run(x, distribution, key, start, scale, terms, False, packed if packed.shape[0] else _DENSE)


def pack_mask(x: torch.Tensor, threshold: float, bits: torch.Tensor) -> None:
    """bits[k] = the byte of elements 8k .. 8k+7 of the float32 tensor x with |x| <= threshold (bit i: 8k + i)."""
    buf = _buffer(x)
    if bits.dtype != torch.uint8 or not bits.is_contiguous() or bits.numel() != (buf.shape[0] + 7) // 8:
        raise ValueError(f"bits must be a contiguous uint8 tensor of {(buf.shape[0] + 7) // 8} bytes")
    out = bits.numpy()
    workers = _workers(buf.shape[0])
    if workers == 1:
        _pack_bytes(buf, np.float32(threshold), out, 0, out.shape[0])
    else:
        _pack_parallel(buf, np.float32(threshold), out, workers)


def rounding_words(out: np.ndarray, seed: int, key: int, start: int) -> None:
    """out[:] = rng.rounding_words(seed, key, start, len(out)) (stream STREAM_ROUNDING)."""
    if not isinstance(out, np.ndarray) or out.dtype != np.uint32 or out.ndim != 1:
        raise ValueError("out must be a 1-D numpy uint32 array")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be contiguous and writeable")
    start = int(start)
    n = out.shape[0]
    rng._check_range(start, n)
    if n == 0:
        return
    key_lo, key_hi = _split(key)
    seed_lo, seed_hi = _split(seed)
    workers = _workers(n)
    if workers == 1:
        _words_serial(out, start, key_lo, key_hi, seed_lo, seed_hi)
    else:
        _words_parallel(out, start, key_lo, key_hi, seed_lo, seed_hi, workers)


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


BACKEND = Backend(
    "numba", fill, axpy, supports, priority=10, words=rounding_words, masked_axpy=masked_axpy, pack_mask=pack_mask
)
