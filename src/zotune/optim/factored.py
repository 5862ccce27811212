"""Factored directions on weight matrices, made from a few keyed vectors: LOZO's U V^T, SubZero's U Z V^T and
ZO-Muon's P Psi, with ZO-Muon's update (the matrix sign of the averaged estimate).

Every factor is regenerated from the keyed Gaussian stream (nothing parameter-sized is stored): (m + n) r
floats per matrix while it is swept. :func:`zotune.optim.functional.sweep_` dispatches a
``"lowrank:r"``, ``"subzero:r"`` or ``"subspace:r"`` distribution's matrices to :func:`factored_sweep_`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from zotune import kernels, rng
from zotune.optim.chunks import chunk_size, flat_view, float_work, write_back

__all__ = [
    "factored_sweep_",
    "lowrank_factors",
    "msign",
    "muon_update_",
    "orthonormal",
    "outer_rows_",
    "subspace_factors",
    "subzero_factors",
]


def lowrank_factors(p: torch.Tensor, key: int, seeds: tuple[int, int], rank: int, be):
    """(U, V) of a low-rank direction ``u = U V^T / sqrt(rank)`` on matrix ``p`` (m x n): U (m x rank) from the
    Gaussian stream of ``seeds[0]``, V (n x rank) from that of ``seeds[1]``, both with p's key, row-major:
    (m + n) rank floats, the only memory the direction takes."""
    m, n = p.shape
    u = torch.empty(m * rank, dtype=torch.float32, device=p.device)
    be.fill(u, "gaussian", seeds[0], key, 0)
    v = torch.empty(n * rank, dtype=torch.float32, device=p.device)
    be.fill(v, "gaussian", seeds[1], key, 0)
    return u.view(m, rank), v.view(n, rank)


def orthonormal(rows: int, r: int, seed: int, key: int, be, device) -> torch.Tensor:
    """A rows x r float32 matrix with orthonormal columns: the QR of the Gaussian ``rows * r`` of (seed, key),
    row-major, in float64 with the columns' signs fixed so that R's diagonal is positive, rounded once. The same
    bits on one backend (LAPACK's order is its own)."""
    g = torch.empty(rows * r, dtype=torch.float32, device=device)
    be.fill(g, "gaussian", seed, key, 0)
    q, rr = torch.linalg.qr(g.view(rows, r).double())
    return (q * torch.where(torch.diagonal(rr) < 0, -1.0, 1.0).to(q.dtype)).float()


def subspace_factors(p: torch.Tensor, key: int, seeds: tuple[int, int], rank: int, be):
    """(P, Psi^T) of a subspace direction ``u = P Psi`` on matrix ``p`` (m x n) (ZO-Muon, arXiv 2602.17155):
    P (m x r, r = min(rank, m)) orthonormal from ``seeds[1]`` (:func:`orthonormal`), Psi^T (n x r) Gaussian
    from ``seeds[0]``."""
    m, n = p.shape
    r = min(rank, m)
    psi = torch.empty(n * r, dtype=torch.float32, device=p.device)
    be.fill(psi, "gaussian", seeds[0], key, 0)
    return orthonormal(m, r, seeds[1], key, be, p.device), psi.view(n, r)


def subzero_factors(p: torch.Tensor, key: int, seeds: tuple[int, int], rank: int, be):
    """(U, Z V^T) of a SubZero direction ``u = U Z V^T`` on matrix ``p`` (m x n) (arXiv 2410.08989): U (m x r) and
    V (n x r) orthonormal (:func:`orthonormal`), both from the window's ``seeds[1]`` (V from the derived seed
    ``rng.step_seed(seeds[1], 0, 1)``, so a square matrix's U and V differ), Z (r x r, r = min(rank, m, n))
    Gaussian from ``seeds[0]``; Z V^T formed in float64 and rounded once."""
    m, n = p.shape
    r = min(rank, m, n)
    u = orthonormal(m, r, seeds[1], key, be, p.device)
    v = orthonormal(n, r, rng.step_seed(seeds[1], 0, 1), key, be, p.device)
    z = torch.empty(r * r, dtype=torch.float32, device=p.device)
    be.fill(z, "gaussian", seeds[0], key, 0)
    return u, (z.view(r, r).double() @ v.double().T).float()


def _products(kind: str, p, key, seeds, rank, be):
    """(A, B, norm) of a factor kind's direction on matrix p: u = A B / norm, A m x k, B k x n."""
    m, n = p.shape
    if kind == "lowrank":  # LOZO: U V^T / sqrt(r), entries of unit variance
        u, v = lowrank_factors(p, key, seeds, rank, be)
        return u, v.T, rank**0.5
    if kind == "subspace":  # ZO-Muon: P Psi as the paper has it
        q, psi_t = subspace_factors(p, key, seeds, rank, be)
        return q, psi_t.T, 1.0
    # SubZero: E ||U Z V^T||^2 = r^2; times sqrt(m n) / r, its entries have MeZO's unit variance (and rates)
    u, zv = subzero_factors(p, key, seeds, rank, be)
    return u, zv, u.shape[1] / math.sqrt(m * n)


def msign(g: torch.Tensor) -> torch.Tensor:
    """The matrix sign U V^T of ``g`` (its polar factor, from the SVD; 0 for 0), in g's dtype.

    ZO-Muon's paper approximates it by Newton-Schulz, as Muon does on GPUs in bf16; its estimate is r x n with r
    small, so the exact factor costs next to nothing and has no iteration count to choose."""
    if not bool(torch.any(g != 0)):
        return torch.zeros_like(g)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u @ vh


def muon_update_(
    p: torch.Tensor,
    key: int,
    *,
    seeds: Sequence[tuple[int, int]],
    grads: Sequence[float],
    rank: int,
    lr: float,
    scale: float = 1.0,
    rounding_seed: int | None = None,
    backend: str | None = None,
) -> None:
    """ZO-Muon's update of one matrix: ``theta <- scale theta - lr P msign(G)``, ``G = 1/N sum_i c_i Psi_i``.

    P and every Psi_i regenerated from the step's seeds (all directions share P); G (r x n) summed and its sign
    taken in float64, the result rounded to float32 once; then added by rows in chunks as ``r`` broadcast
    multiply-adds, as the low-rank sweep (no parameter-sized temporary).
    """
    if hasattr(p, "placements"):
        raise ValueError("ZO-Muon does not support sharded (DTensor) parameters yet")
    be = kernels.select(p.device, backend)
    m, n = p.shape
    proj, acc = None, None
    for pair, c in zip(seeds, grads, strict=True):
        if proj is None:  # the step's directions share P (seed_V): one QR
            proj, psi_t = subspace_factors(p, key, (int(pair[0]), int(pair[1])), rank, be)
        else:
            psi_t = torch.empty(n * proj.shape[1], dtype=torch.float32, device=p.device)
            be.fill(psi_t, "gaussian", int(pair[0]), key, 0)
            psi_t = psi_t.view(n, -1)
        term = psi_t.double() * (float(c) / len(grads))
        acc = term if acc is None else acc.add_(term)
    o = msign(acc.T.contiguous()).float()  # r x n
    outer_rows_(p, key, [(proj, o, -lr)], scale=scale, rounding_seed=rounding_seed, be=be)


def outer_rows_(p, key, products, *, scale: float, rounding_seed, be) -> None:
    """``theta <- scale theta + sum(c U W)`` on matrix p over ``products`` (U m x r, W r x n, c): rows in chunks,
    each product as r broadcast multiply-adds (elementwise float32, so the same bits on every run: no matmul
    whose blocking could change them), and no temporary larger than a chunk."""
    m, n = p.shape
    flat, step = flat_view(p), max(1, chunk_size(be) // max(n, 1))
    for r0 in range(0, m, step):
        rows = slice(r0, min(m, r0 + step))
        part = flat[r0 * n : rows.stop * n]
        work = float_work(part)
        if scale != 1.0:
            work.mul_(scale)
        block = work.view(-1, n)
        for u, w, c in products:
            for k in range(u.shape[1]):
                block.addcmul_(u[rows, k : k + 1], w[k].unsqueeze(0), value=c)
        write_back(part, work, rounding_seed, key, r0 * n, be)


def factored_sweep_(p, key, terms, rank: int, *, kind: str, scale: float, rounding_seed, backend) -> None:
    """``theta <- scale theta + sum(c u(seeds))`` on matrix ``p`` along factored directions, over ``terms`` of
    ``((seed, seed_window), c)``:

    - ``"lowrank"`` (LOZO, arXiv 2410.07698): ``u = U V^T / sqrt(rank)`` (:func:`lowrank_factors`);
    - ``"subzero"`` (SubZero, arXiv 2410.08989): ``u = sqrt(m n) / r U Z V^T`` (:func:`subzero_factors`);
    - ``"subspace"`` (ZO-Muon's directions): ``u = P Psi`` with P orthonormal from the window's seed, which all
      of a step's directions share (:func:`subspace_factors`).

    Rows in chunks, the product as ``rank`` broadcast multiply-adds (elementwise float32, so the same on every
    run; no matmul whose blocking could change the bits). No fused kernel: this torch path is every backend's.
    """
    if hasattr(p, "placements"):
        raise ValueError("low-rank directions do not support sharded (DTensor) parameters yet")
    be = kernels.select(p.device, backend)
    products = []
    for seeds, c in terms:
        a, b, norm = _products(kind, p, key, seeds, rank, be)
        products.append((a, b, c / norm))
    outer_rows_(p, key, products, scale=scale, rounding_seed=rounding_seed, be=be)
