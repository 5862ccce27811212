"""Keyed, counter-based random numbers: the definition of the perturbation z.

z is a pure function of ``(seed, key, index)``: ``seed`` is a 64-bit per-step seed, ``key`` is a
64-bit hash of the parameter's name and ``index`` is the element's position in the parameter's
flattened (row-major) tensor. Nothing here reads or writes a global random state, so z is the same
on every device, in every visiting order, and however the tensor is chunked or sharded.

The generator is Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011). One call maps a 128-bit counter and a 64-bit key to four 32-bit words::

    key     = (seed & 0xFFFFFFFF, seed >> 32)
    counter = (block, stream, key & 0xFFFFFFFF, key >> 32)

``stream`` separates independent uses of the same (seed, key): ``STREAM_Z`` for the perturbation,
``STREAM_ROUNDING`` for the bits of stochastic rounding, ``STREAM_RADIUS`` for a direction's random
scale (:func:`radius`, KerZOO's r; key 0, block 0).

Gaussian (``"gaussian"``): element ``i`` lives in block ``i // 4``, lane ``i % 4``. The words
``(w0, w1)`` of a block give lanes 0 and 1, ``(w2, w3)`` lanes 2 and 3, by Box–Muller::

    u = ((w_a >> 8) + 1) * 2**-24        in (0, 1]
    v = (w_b >> 8) * 2**-24              in [0, 1)
    r = sqrt(-2 ln u)
    z_a = r cos(2 pi v),  z_b = r sin(2 pi v)

Using 24 of the 32 bits keeps u exact in float32, so a float32 fast path can compute the same
numbers (|z| is therefore bounded by sqrt(48 ln 2) ~ 5.77, a tail mass below 1e-8).

Gaussian, fast (``"gaussian-fast"``): eight normals a Philox call, from 16-bit halves of its words, so that a
GPU sweep issues about half the instructions of ``"gaussian"`` (issue 19: the Gaussian sweeps are bound by
instruction issue, not by memory). Element ``i`` lives in block ``i // 8``; word ``j = (i % 8) // 2`` of
the block gives lanes ``2j`` and ``2j + 1``::

    u = ((w_j >> 16) + 1) * 2**-16       in (0, 1]
    v = (w_j & 0xFFFF) * 2**-16          in [0, 1)
    z_2j = r cos(2 pi v),  z_2j+1 = r sin(2 pi v),   r = sqrt(-2 ln u)

The radius takes 2**16 values (the Rayleigh law's quantiles at u's grid), so |z| <= sqrt(32 ln 2) ~ 4.71 (a
tail mass of 2.5e-6 is left out) and E[z^2] = ln 2**16 - ln(2**16!) / 2**16 = 1 - 9.9e-5; the angle takes 2**16
values. A version of its own (the Gaussian above stays bit for bit what it was): trajectories record
which. The CPU kernels compute it to float32 rounding; the GPU kernel with the hardware's approximate
log2, sqrt, sin and cos (``lg2.approx``, ``sqrt.approx``, ``sin.approx``, ``cos.approx``: a few 1e-7 of
|z| in most of the range, up to 1e-4 where r is near 0), so a GPU run replays bit for bit on a GPU and to
that accuracy elsewhere.

Rademacher (``"rademacher"``): element ``i`` lives in block ``i // 128``, word ``(i // 32) % 4``,
bit ``i % 32``; a set bit is +1, a clear bit -1.

Sphere (``"sphere"``, a distribution of the optimizer, not of this module): z uniform on the
sphere of radius sqrt(d) in the d trainable elements, ``z = sqrt(d) * x / ||x||`` with x the
Gaussian stream above. It cannot be computed element by element (the norm spans every parameter),
so the generators here and in the kernels draw x, and the optimizer folds the factor
``sqrt(d) / ||x||`` (:func:`sphere_factor`) into each sweep's coefficient. The Gaussian and
Rademacher bits are unchanged by it.

This module is the reference: slow, plain NumPy uint64 arithmetic, computed in float64 and rounded
to float32 once. Every fast path (``zotune.kernels``) is tested against it.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = [
    "DISTRIBUTIONS",
    "STREAM_RADIUS",
    "STREAM_ROUNDING",
    "STREAM_Z",
    "gaussian",
    "gaussian_fast",
    "param_key",
    "philox4x32",
    "rademacher",
    "radius",
    "rounding_words",
    "sphere_factor",
    "step_seed",
    "z",
]

DISTRIBUTIONS = ("gaussian", "rademacher", "gaussian-fast")  # element-wise streams: what the kernels generate
STREAM_Z = 0
STREAM_ROUNDING = 1
STREAM_RADIUS = 2
_STREAM_SEED = 0x5EED5EED  # counter word that separates derived step seeds from everything else

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_MAX_INDEX = 2**32 * 4  # a Gaussian tensor may have at most 2**34 elements (the block counter is 32 bits)


def _u32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64) & _MASK32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox-4x32 on uint64 arrays that hold 32-bit values; returns four such arrays."""
    c0, c1, c2, c3 = (_u32(c) for c in (c0, c1, c2, c3))
    k0, k1 = _u32(k0), _u32(k1)
    shift = np.uint64(32)
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0 = _M0 * c0  # < 2**64: exact in uint64
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> shift) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> shift) ^ c3 ^ k1,
            p0 & _MASK32,
        )
    return c0, c1, c2, c3


def param_key(name: str) -> int:
    """The 64-bit key of a parameter: a stable hash of its name (independent of Python's hash seed)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def step_seed(seed: int, step: int, index: int = 0) -> int:
    """The 64-bit seed of perturbation ``index`` at optimizer step ``step`` of a run seeded ``seed``."""
    seed, step = int(seed) % 2**64, int(step) % 2**64
    w = philox4x32(step & 0xFFFFFFFF, step >> 32, int(index) & 0xFFFFFFFF, _STREAM_SEED, seed & 0xFFFFFFFF, seed >> 32)
    return int(w[0]) | (int(w[1]) << 32)


def radius(seed: int) -> float:
    """A direction's random scale r ~ U(-1, 1), keyed by the direction's seed (KerZOO, arXiv 2505.18886).

    The first word of block 0 of stream ``STREAM_RADIUS`` (key 0): ``r = ((w >> 8) + 1/2) * 2**-23 - 1``,
    the midpoints of 2**24 equal cells, so r is symmetric about 0 and never 0; rounded to float32.
    """
    seed = int(seed) % 2**64
    w = philox4x32(0, STREAM_RADIUS, 0, 0, seed & 0xFFFFFFFF, seed >> 32)
    return float(np.float32(((int(w[0]) >> 8) + 0.5) * 2.0**-23 - 1.0))


def _blocks(seed: int, key: int, stream: int, first: int, last: int):
    """Words of blocks ``first .. last-1``, as a (n, 4) uint64 array."""
    seed, key = int(seed) % 2**64, int(key) % 2**64
    block = np.arange(first, last, dtype=np.uint64)
    words = philox4x32(block, stream, key & 0xFFFFFFFF, key >> 32, seed & 0xFFFFFFFF, seed >> 32)
    return np.stack(words, axis=1)


def _check_range(start: int, n: int) -> None:
    if start < 0 or n < 0:
        raise ValueError(f"start and n must be non-negative, got start={start}, n={n}")
    if start + n > _MAX_INDEX:
        raise ValueError(f"a tensor may have at most {_MAX_INDEX} elements; asked for index {start + n - 1}")


def _box_muller(u: np.ndarray, v: np.ndarray, per: int) -> np.ndarray:
    """Blocks of ``per`` normals, lane 2j = r cos 2 pi v_j and lane 2j + 1 = r sin 2 pi v_j, r = sqrt(-2 ln u_j),
    from (blocks, per / 2) arrays u and v, in float64 (a (blocks, per) array)."""
    r = np.sqrt(-2.0 * np.log(u))
    angle = 2.0 * np.pi * v
    out = np.empty((u.shape[0], per), dtype=np.float64)
    out[:, 0::2] = r * np.cos(angle)
    out[:, 1::2] = r * np.sin(angle)
    return out


def _lanes(blocks: np.ndarray, start: int, first: int, n: int) -> np.ndarray:
    """Elements start .. start + n - 1 of the (blocks, per) normals whose first block is ``first``, as float32."""
    per = blocks.shape[1]
    offset = start - per * first
    return blocks.reshape(-1)[offset : offset + n].astype(np.float32)


def gaussian(seed: int, key: int, start: int, n: int) -> np.ndarray:
    """z[start : start + n] of the Gaussian stream, float32 (reference implementation)."""
    _check_range(start, n)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    first, last = start // 4, (start + n + 3) // 4
    w = _blocks(seed, key, STREAM_Z, first, last)
    u = ((w[:, 0::2] >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0**-24  # lanes a: w0, w2
    v = (w[:, 1::2] >> np.uint64(8)).astype(np.float64) * 2.0**-24  # lanes b: w1, w3
    return _lanes(_box_muller(u, v, 4), start, first, n)


def gaussian_fast(seed: int, key: int, start: int, n: int) -> np.ndarray:
    """z[start : start + n] of the fast Gaussian stream (eight a Philox block), float32 (reference)."""
    _check_range(start, n)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    first, last = start // 8, (start + n + 7) // 8
    w = _blocks(seed, key, STREAM_Z, first, last)  # (blocks, 4): word j gives lanes 2j, 2j + 1
    u = ((w >> np.uint64(16)) + np.uint64(1)).astype(np.float64) * 2.0**-16
    v = (w & np.uint64(0xFFFF)).astype(np.float64) * 2.0**-16
    return _lanes(_box_muller(u, v, 8), start, first, n)


def rademacher(seed: int, key: int, start: int, n: int) -> np.ndarray:
    """z[start : start + n] of the Rademacher stream (+1/-1), float32 (reference implementation)."""
    _check_range(start, n)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    first, last = start // 128, (start + n + 127) // 128
    w = _blocks(seed, key, STREAM_Z, first, last).reshape(-1, 1)  # one row per 32-bit word
    bits = (w >> np.arange(32, dtype=np.uint64)) & np.uint64(1)  # bit j of each word
    signs = bits.astype(np.float32) * 2.0 - 1.0
    offset = start - 128 * first
    return signs.reshape(-1)[offset : offset + n]


def rounding_words(seed: int, key: int, start: int, n: int) -> np.ndarray:
    """Uniform 32-bit words for stochastic rounding of elements start .. start+n-1 (one per element)."""
    _check_range(start, n)
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    first, last = start // 4, (start + n + 3) // 4
    w = _blocks(seed, key, STREAM_ROUNDING, first, last).reshape(-1)
    offset = start - 4 * first
    return w[offset : offset + n].astype(np.uint32)


def z(distribution: str, seed: int, key: int, start: int, n: int) -> np.ndarray:
    """z[start : start + n] for ``distribution`` (one of :data:`DISTRIBUTIONS`)."""
    if distribution == "gaussian":
        return gaussian(seed, key, start, n)
    if distribution == "gaussian-fast":
        return gaussian_fast(seed, key, start, n)
    if distribution == "rademacher":
        return rademacher(seed, key, start, n)
    raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")


def sphere_factor(sumsq: float, d: int) -> float:
    """sqrt(d / sum x_i^2) rounded to float32: the factor that puts Gaussian x on the sphere of radius sqrt(d)."""
    if not sumsq > 0:
        raise ValueError(f"the Gaussian draw has squared norm {sumsq}; cannot normalise it onto the sphere")
    return float(np.float32(np.sqrt(d / sumsq)))
