"""The fast backends against the reference generator (zotune.rng) and the backend registry.

Tolerance for Gaussians: |fast - reference| <= 1e-6 * max(1, |z|). The reference computes in
float64 and rounds once; the numba kernel computes in float32: u and the in-quadrant angle are exact,
then a polynomial log (Cephes logf, ~1 ulp), sqrt (0.5 ulp), polynomial sin/cos on [-pi/4, pi/4]
(~1 ulp of 1) and two products, i.e. a few float32 ulps (2**-23 ~ 1.2e-7) relative to r = |z|-ish,
and absolute errors up to r * 1e-7 ~ 6e-7 where |z| < r <= 5.77. Measured worst case, exhaustively
over all 2**24 values of u and of the angle: 2.5e-7 * max(1, |z|); the bound leaves 4x margin.
Rademacher signs and rounding words are integers: they must match exactly.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fused_addcmul

import zotune
from zotune import kernels, rng

GAUSS_TOL = 1e-6

SEED_KEYS = [
    (0, 0),
    (1, 2),
    (2**64 - 1, 2**63 + 5),
    (2**63, 0xDEADBEEFCAFEF00D),
    (0x0123456789ABCDEF, rng.param_key("model.layers.0.mlp.up_proj.weight")),
]

CHUNK = 8192  # the numba kernel's chunk; ranges below straddle chunk and block boundaries
RANGES = [
    (0, 1),
    (3, 1),
    (3, 5),
    (0, 1001),
    (3, 1001),
    (127, 130),
    (2**33 + 7, 5),
    (2**33 + 7, 1001),
    (CHUNK - 3, 2 * CHUNK - 7),  # serial path (below 2 chunks long), across three chunks
    (5, 5 * CHUNK + 17),  # parallel path
]


@pytest.fixture(scope="module")
def cpu():
    pytest.importorskip("numba")
    from zotune.kernels import cpu as module

    return module


def _check_gaussian(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = GAUSS_TOL * np.maximum(1.0, np.abs(want.astype(np.float64)))
    worst = int(np.argmax(err / bound))
    assert np.all(err <= bound), f"element {worst}: got {got[worst]!r}, want {want[worst]!r}"


@pytest.mark.parametrize("seed,key", SEED_KEYS)
@pytest.mark.parametrize("start,n", RANGES)
def test_fill_matches_reference(cpu, seed, key, start, n):
    x = torch.full((n,), float("nan"))
    cpu.fill(x, "gaussian", seed, key, start)
    _check_gaussian(x.numpy(), rng.gaussian(seed, key, start, n))

    x = torch.full((n,), float("nan"))
    cpu.fill(x, "gaussian-fast", seed, key, start)  # the same float32 Box-Muller on 16-bit fields: the same bound
    _check_gaussian(x.numpy(), rng.gaussian_fast(seed, key, start, n))

    x = torch.full((n,), float("nan"))
    cpu.fill(x, "rademacher", seed, key, start)
    np.testing.assert_array_equal(x.numpy(), rng.rademacher(seed, key, start, n))

    out = np.zeros(n, dtype=np.uint32)
    cpu.rounding_words(out, seed, key, start)
    np.testing.assert_array_equal(out, rng.rounding_words(seed, key, start, n))


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("start,n", [(0, 1), (3, 1001), (CHUNK - 3, 3 * CHUNK + 5)])
@pytest.mark.parametrize(
    "scale,terms",
    [
        (1.0, [(2**63 + 11, 1e-3)]),
        (0.5, [(7, -2.5)]),
        (1.0, [(2**64 - 2, 2e-3), (12345, -1e-3)]),
        (0.9, [(1, 0.25), (2, 0.75)]),
    ],
)
def test_axpy_matches_reference(cpu, distribution, start, n, scale, terms):
    key = 2**63 + 1234567
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(n))
    got = x0.clone()
    cpu.axpy(got, distribution, key, start, scale, terms)
    want = x0.clone()
    kernels.get("reference").axpy(want, distribution, key, start, scale, terms)
    # float32 rounding of the sweep itself (a few ops, FMA or not) plus the Gaussian tolerance per term
    bound = 4e-7 * (np.abs(x0.numpy() * scale) + 1.0)
    for seed, coef in terms:
        zref = np.abs(rng.z(distribution, seed, key, start, n).astype(np.float64))
        bound = bound + abs(coef) * (GAUSS_TOL * np.maximum(1.0, zref) + 4e-7 * zref)
    err = np.abs(got.numpy().astype(np.float64) - want.numpy())
    assert np.all(err <= bound), f"max err {err.max()} at {int(np.argmax(err - bound))}"


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
def test_independent_of_threads_and_pieces(cpu, distribution):
    """Bit-for-bit the same numbers whatever the thread count and however the tensor is cut."""
    import numba

    n, start, seed, key = 4 * CHUNK + 13, 9, 2**63 + 3, 42
    whole = torch.empty(n)
    cpu.fill(whole, distribution, seed, key, start)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = torch.empty(n)
        cpu.fill(single, distribution, seed, key, start)
        acc1 = torch.linspace(-1, 1, n)
        cpu.axpy(acc1, distribution, key, start, 0.75, [(seed, 0.1), (seed + 1, -0.2)])
    finally:
        numba.set_num_threads(before)
    assert torch.equal(single, whole)
    acc2 = torch.linspace(-1, 1, n)
    cpu.axpy(acc2, distribution, key, start, 0.75, [(seed, 0.1), (seed + 1, -0.2)])
    assert torch.equal(acc1, acc2)

    cuts = [0, 1, 4, 7, 130, CHUNK - 9, CHUNK + 1, 3 * CHUNK, n]
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece = torch.empty(b - a)
        cpu.fill(piece, distribution, seed, key, start + a)
        assert torch.equal(piece, whole[a:b]), (a, b)


def _packed(mask: torch.Tensor) -> torch.Tensor:
    pad = torch.cat([mask, mask.new_zeros(-mask.numel() % 8)]).view(-1, 8).to(torch.uint8)
    return (pad * torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)).sum(1, dtype=torch.uint8)


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("start,n", [(0, 1), (8, 1001), (CHUNK - 8, 3 * CHUNK + 5)])
@pytest.mark.parametrize("scale,terms", [(1.0, [(2**63 + 11, 1e-3)]), (0.9, [(1, 0.25), (2, -0.75)])])
def test_masked_axpy_matches_the_torch_path(cpu, distribution, start, n, scale, terms):
    """Sparse directions' fused pass against what it replaces: the same z, then x * scale and addcmul_ per term."""
    key = 77
    gen = torch.Generator().manual_seed(n)
    x0 = torch.randn(n, generator=gen)
    x0[:3] = torch.tensor([-0.0, 0.0, -0.0])[: min(3, n)]
    mask = torch.rand(n, generator=gen) < 0.3
    got = x0.clone()
    cpu.masked_axpy(got, distribution, key, start, scale, terms, _packed(mask))
    want, z = x0.clone(), torch.empty(n)
    if scale != 1.0:
        want.mul_(scale)
    for seed, c in terms:
        cpu.fill(z, distribution, seed, key, start)
        want.addcmul_(mask.float(), z, value=c)
    if fused_addcmul():  # torch rounds each term once, as the kernel's llvm.fma does: the same bits
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    else:  # torch rounds c z and the sum apart: one float32 rounding (2^-24 relative) per term apart
        assert torch.allclose(got, want, rtol=2 * len(terms) * 2.0**-24, atol=0.0)
    assert torch.equal(got[~mask], (x0 * scale)[~mask])  # masked-off elements only scale


@pytest.mark.parametrize("n", [1, 7, 8, 1001, 3 * CHUNK + 5])
def test_pack_mask_matches_the_torch_packing(cpu, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    x[: min(n, 4)] = torch.tensor([0.5, -0.5, float("nan"), -0.0])[: min(n, 4)]  # ties at h, NaN, -0
    bits = torch.full(((n + 7) // 8,), 0xA5, dtype=torch.uint8)  # overwritten, tail bits included
    cpu.pack_mask(x, 0.5, bits)
    assert torch.equal(bits, _packed(x.abs() <= 0.5))
    with pytest.raises(ValueError, match="bytes"):
        cpu.pack_mask(x, 0.5, torch.zeros(n // 8 + 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bytes"):
        cpu.masked_axpy(x, "gaussian", 1, 0, 1.0, [(1, 1.0)], torch.zeros(n // 8 + 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu.masked_axpy(x, "gaussian", 1, 4, 1.0, [(1, 1.0)], torch.zeros((n + 7) // 8, dtype=torch.uint8))


_ISA_SCRIPT = """
import sys, numpy as np, torch
from zotune.kernels import cpu
x = torch.empty(5000)
cpu.fill(x, "gaussian", 2**63 + 17, 99, 3)
y = torch.linspace(-1, 1, 5000)
cpu.axpy(y, "gaussian", 99, 3, 0.75, [(5, 0.1), (6, -0.2)])
w = torch.linspace(-1, 1, 5000)
cpu.masked_axpy(w, "gaussian", 99, 0, 0.75, [(5, 0.1), (6, -0.2)], torch.full((625,), 0x5B, dtype=torch.uint8))
np.save(sys.argv[1], np.stack([x.numpy(), y.numpy(), w.numpy()]))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 feature strings")
def test_same_bits_without_fma_or_avx(cpu, tmp_path):
    """No FMA contraction or fast-math: a plain SSE2 build gives the same bits as the native one."""
    x = torch.empty(5000)
    cpu.fill(x, "gaussian", 2**63 + 17, 99, 3)
    y = torch.linspace(-1, 1, 5000)
    cpu.axpy(y, "gaussian", 99, 3, 0.75, [(5, 0.1), (6, -0.2)])
    w = torch.linspace(-1, 1, 5000)  # sparse directions' explicit llvm.fma: libm's fmaf without FMA, the same bits
    cpu.masked_axpy(w, "gaussian", 99, 0, 0.75, [(5, 0.1), (6, -0.2)], torch.full((625,), 0x5B, dtype=torch.uint8))
    src = str(Path(zotune.__file__).resolve().parents[1])
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=str(tmp_path / "cache"),
        NUMBA_CPU_NAME="x86-64",
        NUMBA_CPU_FEATURES="+64bit,+sse,+sse2,+cmov,+cx8,+fxsr,+mmx,-sse3,-ssse3,-sse4.1,-sse4.2,"
        "-avx,-avx2,-fma,-fma4,-avx512f",
        PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    )
    env.pop("ZOTUNE_BACKEND", None)
    out = tmp_path / "sse2.npy"
    subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(out)], env=env, check=True, timeout=300)
    np.testing.assert_array_equal(np.load(out), np.stack([x.numpy(), y.numpy(), w.numpy()]))


def test_rejects_bad_input(cpu):
    with pytest.raises(ValueError):
        cpu.fill(torch.zeros(8, dtype=torch.float64), "gaussian", 1, 2, 0)
    with pytest.raises(ValueError):
        cpu.fill(torch.zeros(8, 2)[:, 0], "gaussian", 1, 2, 0)  # not contiguous
    with pytest.raises(ValueError):
        cpu.fill(torch.zeros(8), "uniform", 1, 2, 0)
    with pytest.raises(ValueError):
        cpu.axpy(torch.zeros(8), "gaussian", 2, 0, 1.0, [])
    with pytest.raises(ValueError):
        cpu.fill(torch.zeros(8), "gaussian", 1, 2, -1)
    with pytest.raises(ValueError):
        cpu.rounding_words(np.zeros(8, dtype=np.int32), 1, 2, 0)
    x = torch.zeros(0)
    cpu.fill(x, "gaussian", 1, 2, 5)  # empty: nothing to do
    assert not cpu.supports(torch.device("meta"))
    assert cpu.supports(torch.device("cpu"))


def test_select(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.delenv("ZOTUNE_BACKEND", raising=False)
    assert "numba" in kernels.available()
    assert kernels.select("cpu").name == "numba"
    assert kernels.select("cpu", "reference").name == "reference"
    monkeypatch.setenv("ZOTUNE_BACKEND", "reference")
    assert kernels.select("cpu").name == "reference"


def test_the_cpu_sweep_uses_no_more_threads_than_torch(monkeypatch):
    import numba

    from zotune.kernels import cpu

    big = 64 * cpu.CHUNK
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu._workers(big) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert cpu._workers(big) == numba.get_num_threads()
