"""The in-place tensor work of MeZO, shared by the optimizer and by replay.

Every change MeZO makes to a parameter is one *sweep*::

    theta <- scale * theta + sum_k c_k * z(s_k)

over each parameter, in bounded chunks, with z generated on the fly from the keyed generator (no z
is ever stored, and no temporary is larger than one chunk). A step is a fixed sequence of sweeps:

    +eps z_t                  (perturb; skipped when the previous step already fused it in)
    -2 eps z_t                (to theta - eps z_t)
    update: scale = 1 - lr*wd, coefficient of z_t = scale*eps - lr*g  (+ eps z_{t+1} when fused)

The variants (:mod:`zotune.optim.variants`) reuse the same sweeps: n-SPSA interleaves the probes of its
n perturbations (``+eps z_0, -2eps z_0, +eps z_0 + eps z_1, ...``) and updates with one n-term sweep;
history momentum is a W*n-term sweep; stored momentum and Adam go through :func:`moment_sweep_`.

Because both the optimizer and :func:`zotune.replay` call these same functions with the same
float32-rounded scalars, replaying a trajectory reproduces the trained weights bit for bit on the
same backend. Float32 parameters are updated in place directly; bf16/fp16 parameters go through a
float32 chunk buffer and are rounded back to nearest, or stochastically in the update sweep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from zotune import kernels, rng

__all__ = [
    "f32",
    "gaussian_sumsq",
    "hizoo_update_",
    "local_shard",
    "magnitude_mask",
    "moment_sweep_",
    "msign",
    "muon_update_",
    "scaled_sweep_",
    "stochastic_round_",
    "subspace_factors",
    "subzero_factors",
    "sweep_",
]

_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)


def f32(x: float) -> float:
    """``x`` rounded to float32 (as a Python float): every scalar a trajectory records is stored so."""
    return float(np.float32(x))


FALLBACK_CHUNK = 1 << 22  # elements: a torch path's temporaries stay under 16 MB of float32 on any backend


def _chunk(be) -> int:
    """Elements per piece of a chunked torch path: the backend's chunk, at most :data:`FALLBACK_CHUNK` (Triton's
    is a whole tensor, which would make a float32 buffer the size of the largest parameter: an embedding's)."""
    return min(be.chunk, FALLBACK_CHUNK)


def _flat(p: torch.Tensor) -> torch.Tensor:
    if not p.is_contiguous():
        raise ValueError(
            f"MeZO perturbs parameters in place and needs contiguous tensors; got one of shape "
            f"{tuple(p.shape)} with strides {p.stride()} (call .contiguous() on it before building the optimizer)"
        )
    return p.detach().view(-1)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, seed: int, key: int, start: int, words_fn=None) -> None:
    """dst <- src (float32) rounded to dst's dtype, up or down with probability by distance.

    E[dst] = src exactly, so updates far below half an ulp survive on average. The uniform for
    element i is the keyed rounding stream (:func:`zotune.rng.rounding_words`).
    """
    nearest = src.to(dst.dtype)
    diff = src - nearest.float()
    toward = torch.where(diff > 0, torch.inf, -torch.inf).to(dst.dtype)
    neighbour = torch.nextafter(nearest, toward)
    gap = neighbour.float() - nearest.float()
    prob = torch.where(gap != 0, diff / gap, torch.zeros_like(diff))
    if words_fn is None:
        words = rng.rounding_words(seed, key, start, src.numel())
    else:  # a backend's fast generator of the same words
        words = np.empty(src.numel(), dtype=np.uint32)
        words_fn(words, seed, key, start)
    u = torch.from_numpy((words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)).to(src.device)
    dst.copy_(torch.where(u < prob, neighbour, nearest))


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's tensor, global element offset of its first element) of a parameter.

    A plain tensor is its own shard at offset 0. A ``DTensor`` (FSDP2 ``fully_shard``, or
    ``distribute_tensor``) sharded by rows (``Shard(0)``, on any number of mesh dimensions) or
    replicated holds one contiguous range of the flattened global tensor: z is generated at those
    global indices, so every rank perturbs its shard exactly as the unsharded tensor would be.
    """
    placements = getattr(p, "placements", None)
    if placements is None or not hasattr(p, "to_local"):
        return p, 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in placements:
        if not (isinstance(placement, Replicate) or (type(placement) is Shard and placement.dim == 0)):
            raise ValueError(
                f"MeZO perturbs sharded parameters only when they are split by rows (Shard(0)) or "
                f"replicated; got placements {tuple(placements)} for a tensor of shape {tuple(p.shape)} "
                "(shard on dimension 0, e.g. fully_shard's default)"
            )
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    local = p.to_local()
    if tuple(local.shape) != tuple(local_shape):
        raise ValueError(f"the local shard has shape {tuple(local.shape)}, expected {tuple(local_shape)}")
    row = 1
    for size in p.shape[1:]:
        row *= size
    return local, (offset[0] * row if len(offset) else 0)


def sweep_(
    params: Sequence[torch.Tensor],
    keys: Sequence[int],
    terms: Sequence[tuple[int, float]],
    *,
    scale: float = 1.0,
    distribution: str = "gaussian",
    rounding_seed: int | None = None,
    backend: str | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """In place, for every parameter: theta <- scale*theta + sum(c * z(seed) for seed, c in terms).

    Args:
        params: the tensors (contiguous, floating point); modified in place, storage unchanged. A
            row-sharded ``DTensor`` is swept on its local shard only (:func:`local_shard`).
        keys: one 64-bit key per tensor (``zotune.rng.param_key`` of its name).
        terms: ``(seed, coefficient)`` pairs. Up to two go to the backend in one pass; more (n-SPSA,
            history momentum) are applied two at a time to each chunk while it is in cache, before a
            bf16/fp16 chunk is rounded back once.
        scale: multiplies theta first (weight decay); 1.0 skips it.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        rounding_seed: when set, bf16/fp16 results are rounded stochastically with this seed's
            rounding stream; float32 parameters ignore it.
        backend: a name from ``zotune.kernels.available()``; ``None`` picks the fastest per device.
        masks: per tensor, None or the packed bits of :func:`magnitude_mask`: then ``z`` is ``m * z`` on that
            tensor (Sparse-MeZO); the masked tensors go one by one through the backend's ``masked_axpy``
            (numba: z, mask and update in one pass) or, without one, a chunked torch path (the same numbers).
    """
    options = dict(scale=scale, rounding_seed=rounding_seed, backend=backend)
    if masks is not None:
        _masked_sweeps_(params, keys, terms, masks, distribution, **options)
    elif distribution.startswith(("lowrank:", "subspace:", "subzero:")):
        kind, rank = distribution.split(":")
        _lowrank_sweep_(params, keys, terms, int(rank), kind=kind, **options)
    else:
        _elementwise_sweep_(params, keys, terms, distribution, **options)


def _masked_sweeps_(params, keys, terms, masks, distribution, *, scale, rounding_seed, backend) -> None:
    """Sparse-MeZO's :func:`sweep_`: the masked tensors one by one (:func:`_masked_sweep_`), the rest as usual."""
    for p, key, bits in zip(params, keys, masks, strict=True):
        if bits is not None:
            _masked_sweep_(p, key, bits, terms, scale, distribution, rounding_seed, backend)
    rest = [i for i, m in enumerate(masks) if m is None]
    if rest:
        sweep_(
            [params[i] for i in rest],
            [keys[i] for i in rest],
            terms,
            scale=scale,
            distribution=distribution,
            rounding_seed=rounding_seed,
            backend=backend,
        )


def _elementwise_sweep_(params, keys, terms, distribution, *, scale, rounding_seed, backend) -> None:
    """:func:`sweep_` along element-wise z: the backend's multi-tensor kernel where it has one, else chunked."""
    if distribution not in rng.DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {rng.DISTRIBUTIONS}")
    terms = [(int(s), float(c)) for s, c in terms]
    batched: dict[str, tuple] = {}  # backends with a multi-tensor sweep: one launch for all their tensors
    # Per-tensor host work is kept small: on a GPU the sweep waits for it (the loss's .item() has just
    # synchronised), and a model has hundreds of tensors (SmolLM2: 272). So the backend is chosen once
    # per device, and the multi-tensor path takes the tensors as they are (it needs their pointers,
    # not flat views: a detach() and a view() per tensor were half of a 3.4 ms call, measured).
    chosen: dict = {}  # device -> (backend, its multi-tensor sweep or None)
    for p, key in zip(params, keys, strict=True):
        if p.dtype not in _FLOAT_TYPES:
            raise TypeError(f"MeZO supports float32, bfloat16 and float16 parameters, got {p.dtype}")
        p, base = local_shard(p)  # a sharded parameter: this rank's elements base .. base + numel - 1
        device = p.device
        if device not in chosen:
            be = kernels.select(device, backend)
            chosen[device] = (be, be.sweep if len(terms) <= 2 else None)
        be, multi = chosen[device]
        if multi is not None:  # fused in the kernel: read and write in p's dtype, no float32 buffer
            if not p.is_contiguous():
                _flat(p)  # raises, saying what to do
            group = batched.setdefault(be.name, (multi, [], [], []))
            group[1].append(p)
            group[2].append(key)
            group[3].append(base)
            continue
        flat = _flat(p)
        n, chunk = flat.numel(), _chunk(be)
        buf = None if p.dtype == torch.float32 else torch.empty(min(chunk, n), dtype=torch.float32, device=p.device)
        for start in range(0, n, chunk):
            part = flat[start : start + chunk]
            if buf is None:  # float32: the backend works on the parameter's own storage
                _sweep_chunk(be, part, distribution, key, base + start, scale, terms)
                continue
            work = buf[: part.numel()]
            work.copy_(part)
            _sweep_chunk(be, work, distribution, key, base + start, scale, terms)
            if rounding_seed is None:
                part.copy_(work)
            else:
                stochastic_round_(part, work, rounding_seed, key, base + start, be.words)
    for multi, flats, flat_keys, bases in batched.values():
        multi(flats, flat_keys, bases, distribution, terms, scale=scale, rounding_seed=rounding_seed)


MASK_SAMPLE = 1 << 16  # elements of a tensor, evenly strided, whose magnitudes set its threshold
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def magnitude_mask(
    p: torch.Tensor, sparsity: float, *, chunk: int = 1 << 20, backend: str | None = None
) -> torch.Tensor:
    """Sparse-MeZO's mask of one tensor, packed 8 elements a byte (bit i of byte k: element 8k + i).

    m = |theta| <= h with h the ``1 - sparsity`` quantile of |theta| over at most ~2 x :data:`MASK_SAMPLE`
    elements taken at a fixed stride (``h`` is the ``ceil((1 - sparsity) s)``-th smallest of the s sampled
    magnitudes, an element's own value, so every device and every run finds the same one). A pure function
    of the tensor's bits: the optimizer computes it from the clean weights at the start of a step, replay
    from the same weights, and neither keeps it past the step (memory: one bit a parameter while it lives).
    Hand-written because no library packs a boolean tensor into bits in torch (numpy's packbits would
    copy through the host); a backend with ``pack_mask`` (numba) packs a float32 tensor in one pass instead
    of this chunked torch loop, bit for bit the same (``backend`` as in :func:`sweep_`).
    """
    if hasattr(p, "placements"):
        raise ValueError("sparse directions need whole tensors: a DTensor (FSDP2 shard) has no whole-tensor threshold")
    flat = _flat(p)
    n = flat.numel()
    stride = max(1, n // MASK_SAMPLE)
    sample = flat[::stride].abs().float()
    k = min(sample.numel(), max(1, math.ceil((1.0 - sparsity) * sample.numel())))
    if sample.device.type == "cpu":  # numpy's introselect: the same k-th smallest, ~12x torch's kthvalue here
        h = torch.tensor(np.partition(sample.detach().numpy(), k - 1)[k - 1])
    else:
        h = sample.kthvalue(k).values
    bits = torch.zeros((n + 7) // 8, dtype=torch.uint8, device=p.device)
    be = kernels.select(p.device, backend)
    if be.pack_mask is not None and flat.dtype == torch.float32:  # one pass, no temporaries (the same bits)
        be.pack_mask(flat, float(h), bits)
        return bits
    weights = _BITS.to(p.device)
    chunk -= chunk % 8
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        m = part.abs().float() <= h
        if m.numel() % 8:
            m = torch.cat([m, m.new_zeros(8 - m.numel() % 8)])
        torch.sum(
            m.view(-1, 8).to(torch.uint8) * weights,
            dim=1,
            dtype=torch.uint8,
            out=bits[start // 8 : (start + m.numel()) // 8],
        )
    return bits


def _unpack(bits: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Elements ``start .. start + count - 1`` of a packed mask as float32 0 / 1 (``start`` a multiple of 8)."""
    b = bits[start // 8 : (start + count + 7) // 8]
    return (b.unsqueeze(1) & _BITS.to(b.device)).ne(0).view(-1)[:count].float()


def _masked_sweep_(p, key, bits, terms, scale, distribution, rounding_seed, backend) -> None:
    """theta <- scale theta + sum(c m z): a chunk of float32 work, its z and its unpacked mask at a time."""
    if distribution not in rng.DISTRIBUTIONS:
        raise ValueError(
            f"sparse directions draw element-wise z ({', '.join(rng.DISTRIBUTIONS)}), not {distribution!r}"
        )
    be = kernels.select(p.device, backend)
    flat = _flat(p)
    n, chunk = flat.numel(), _chunk(be) - _chunk(be) % 8
    fused = be.masked_axpy is not None and len(terms) <= 2  # the backend's one pass: z, mask and update
    zbuf = None if fused else torch.empty(min(chunk, n), dtype=torch.float32, device=p.device)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        work = _float_work(part)
        if fused:
            chunk_bits = bits[start // 8 : (start + part.numel() + 7) // 8]
            be.masked_axpy(work, distribution, key, start, scale, terms, chunk_bits)
            _write_back(part, work, rounding_seed, key, start, be)
            continue
        z, m = zbuf[: part.numel()], _unpack(bits, start, part.numel())
        if scale != 1.0:
            work.mul_(scale)
        for seed, c in terms:
            be.fill(z, distribution, int(seed), key, start)
            work.addcmul_(m, z, value=float(c))
        _write_back(part, work, rounding_seed, key, start, be)


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


def _orthonormal(rows: int, r: int, seed: int, key: int, be, device) -> torch.Tensor:
    """A rows x r float32 matrix with orthonormal columns: the QR of the Gaussian ``rows * r`` of (seed, key),
    row-major, in float64 with the columns' signs fixed so that R's diagonal is positive, rounded once. The same
    bits on one backend (LAPACK's order is its own)."""
    g = torch.empty(rows * r, dtype=torch.float32, device=device)
    be.fill(g, "gaussian", seed, key, 0)
    q, rr = torch.linalg.qr(g.view(rows, r).double())
    return (q * torch.where(torch.diagonal(rr) < 0, -1.0, 1.0).to(q.dtype)).float()


def subspace_factors(p: torch.Tensor, key: int, seeds: tuple[int, int], rank: int, be):
    """(P, Psi^T) of a subspace direction ``u = P Psi`` on matrix ``p`` (m x n) (ZO-Muon, arXiv 2602.17155):
    P (m x r, r = min(rank, m)) orthonormal from ``seeds[1]`` (:func:`_orthonormal`), Psi^T (n x r) Gaussian
    from ``seeds[0]``."""
    m, n = p.shape
    r = min(rank, m)
    psi = torch.empty(n * r, dtype=torch.float32, device=p.device)
    be.fill(psi, "gaussian", seeds[0], key, 0)
    return _orthonormal(m, r, seeds[1], key, be, p.device), psi.view(n, r)


def subzero_factors(p: torch.Tensor, key: int, seeds: tuple[int, int], rank: int, be):
    """(U, Z V^T) of a SubZero direction ``u = U Z V^T`` on matrix ``p`` (m x n) (arXiv 2410.08989): U (m x r) and
    V (n x r) orthonormal (:func:`_orthonormal`), both from the window's ``seeds[1]`` (V from the derived seed
    ``rng.step_seed(seeds[1], 0, 1)``, so a square matrix's U and V differ), Z (r x r, r = min(rank, m, n))
    Gaussian from ``seeds[0]``; Z V^T formed in float64 and rounded once."""
    m, n = p.shape
    r = min(rank, m, n)
    u = _orthonormal(m, r, seeds[1], key, be, p.device)
    v = _orthonormal(n, r, rng.step_seed(seeds[1], 0, 1), key, be, p.device)
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
    _outer_rows_(p, key, [(proj, o, -lr)], scale=scale, rounding_seed=rounding_seed, be=be)


def _outer_rows_(p, key, products, *, scale: float, rounding_seed, be) -> None:
    """``theta <- scale theta + sum(c U W)`` on matrix p over ``products`` (U m x r, W r x n, c): rows in chunks,
    each product as r broadcast multiply-adds (elementwise float32, so the same bits on every run: no matmul
    whose blocking could change them), and no temporary larger than a chunk."""
    m, n = p.shape
    flat, step = _flat(p), max(1, _chunk(be) // max(n, 1))
    for r0 in range(0, m, step):
        rows = slice(r0, min(m, r0 + step))
        part = flat[r0 * n : rows.stop * n]
        work = _float_work(part)
        if scale != 1.0:
            work.mul_(scale)
        block = work.view(-1, n)
        for u, w, c in products:
            for k in range(u.shape[1]):
                block.addcmul_(u[rows, k : k + 1], w[k].unsqueeze(0), value=c)
        _write_back(part, work, rounding_seed, key, r0 * n, be)


def _lowrank_sweep_(params, keys, terms, rank: int, *, scale: float, rounding_seed, backend, kind: str) -> None:
    """:func:`sweep_` along low-rank directions over terms ``((seed, seed_window), c)``:

    - ``"lowrank"`` (LOZO, arXiv 2410.07698): ``theta <- scale theta + sum(c U V^T / sqrt(rank))`` on each matrix;
      any other tensor (biases, norms) moves along the Gaussian z of the first seed, as LOZO perturbs vectors;
    - ``"subzero"`` (SubZero, arXiv 2410.08989): ``c sqrt(m n) / r U Z V^T`` (:func:`subzero_factors`), vectors
      as LOZO's;
    - ``"subspace"`` (ZO-Muon's directions, :func:`subspace_factors`): ``c P Psi`` on each matrix with P
      orthonormal (from the window's seed, which all of a step's directions share); other tensors do not move.

    Rows in chunks, the product as ``rank`` broadcast multiply-adds (elementwise float32, so the same on every
    run; no matmul whose blocking could change the bits). No fused kernel: this torch path is every backend's.
    """
    if isinstance(rounding_seed, tuple):
        rounding_seed = rounding_seed[0]
    terms = [((int(s[0]), int(s[1])), float(c)) for s, c in terms]
    for p, key in zip(params, keys, strict=True):
        if p.dim() != 2 and kind == "subspace":
            if scale != 1.0:  # weight decay still applies; the direction has no part here
                with torch.no_grad():
                    p.mul_(scale)
            continue
        if p.dim() != 2:
            sweep_(
                [p],
                [key],
                [(s[0], c) for s, c in terms],
                scale=scale,
                distribution="gaussian",
                rounding_seed=rounding_seed,
                backend=backend,
            )
            continue
        if hasattr(p, "placements"):
            raise ValueError("low-rank directions do not support sharded (DTensor) parameters yet")
        be = kernels.select(p.device, backend)
        products = []
        for seeds, c in terms:
            a, b, norm = _products(kind, p, key, seeds, rank, be)
            products.append((a, b, c / norm))
        _outer_rows_(p, key, products, scale=scale, rounding_seed=rounding_seed, be=be)


def _sweep_chunk(be, x, distribution, key, start, scale, terms) -> None:
    """One chunk's sweep through the backend's axpy, any number of terms: the first call scales and adds up to two,
    the rest add two at a time."""
    be.axpy(x, distribution, key, start, scale, terms[:2])
    for i in range(2, len(terms), 2):
        be.axpy(x, distribution, key, start, 1.0, terms[i : i + 2])


def gaussian_sumsq(params, keys, seed: int, *, backend=None) -> float:
    """sum_i z_i(seed)^2 of the Gaussian stream over all ``params``: one extra pass, z regenerated chunk by chunk.

    The sum is taken in float64 over float32 draws, chunk by chunk in index order, so the optimizer
    and :func:`zotune.replay` get the same number. Sharded (``DTensor``) parameters are refused: their
    norm would need a collective over the ranks.
    """
    total = 0.0
    for p, key in zip(params, keys, strict=True):
        if hasattr(p, "placements"):
            raise ValueError(
                "the sphere distribution needs the global norm of z and does not support sharded "
                "(DTensor) parameters; use distribution='gaussian'"
            )
        be = kernels.select(p.device, backend)
        # the backend's own chunk, not _chunk(be): the float64 sum's order (so the sphere factor's bits, which
        # trajectories on that backend were written with) follows the chunking
        n, chunk = p.numel(), be.chunk
        buf = torch.empty(min(chunk, n), dtype=torch.float32, device=p.device)
        for start in range(0, n, chunk):
            work = buf[: min(chunk, n - start)]
            be.fill(work, "gaussian", seed, key, start)
            total += float(torch.dot(work.double(), work.double()))
    return total


def moment_sweep_(
    p: torch.Tensor,
    key: int,
    *,
    estimates: Sequence[Sequence[tuple[int, float]]],
    weights1: Sequence[float],
    weights2: Sequence[float] | None = None,
    m: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    restore: Sequence[tuple[int, float]] = (),
    next_terms: Sequence[tuple[int, float]] = (),
    scale: float = 1.0,
    lr: float = 0.0,
    bias1: float = 1.0,
    bias2: float = 1.0,
    adam_eps: float = 1e-8,
    update: bool = True,
    distribution: str = "gaussian",
    rounding_seed: int | None = None,
    backend: str | None = None,
) -> None:
    """Momentum / Adam on one parameter, chunk by chunk, with the gradient estimates regenerated from seeds.

    Each estimate k is ``g_k = sum(c * z(seed) for seed, c in estimates[k])`` (elementwise, this
    tensor's slice). Then, per chunk:

    - stored state (``m`` given): ``m <- beta1 m + (1-beta1) g_last``; with ``v``:
      ``v <- beta2 v + (1-beta2) g_last**2`` (``estimates`` holds the current step only);
    - history (``m`` None): ``m = sum_k weights1[k] g_k``, ``v = sum_k weights2[k] g_k**2``;
    - direction ``d = m`` (momentum, no ``weights2`` / ``v``) or ``(m/bias1) / (sqrt(v/bias2) + adam_eps)``;
    - ``theta <- scale * (theta + sum restore) - lr * d + sum next_terms`` (skipped if not ``update``).

    Plain torch on float32 chunks: the reference for a future fused kernel.
    """
    adam = v is not None or weights2 is not None
    p, base = local_shard(p)
    be = kernels.select(p.device, backend)
    flat = _flat(p)
    n, chunk = flat.numel(), _chunk(be)
    zbuf = torch.empty(min(chunk, n), dtype=torch.float32, device=p.device)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        size = part.numel()
        z = zbuf[:size]
        mc, vc = _chunk_moments(
            be,
            z,
            key,
            base + start,
            start,
            estimates=estimates,
            weights1=weights1,
            weights2=weights2,
            m=m,
            v=v,
            beta1=beta1,
            beta2=beta2,
            adam=adam,
            distribution=distribution,
        )
        if not update:
            continue
        d = (mc / bias1) / ((vc / bias2).sqrt_().add_(adam_eps)) if adam else mc
        work = part.float() if part.dtype != torch.float32 else part
        for seed, c in restore:
            be.fill(z, distribution, seed, key, base + start)
            work.add_(z, alpha=c)
        if scale != 1.0:
            work.mul_(scale)
        work.add_(d, alpha=-lr)
        for seed, c in next_terms:
            be.fill(z, distribution, seed, key, base + start)
            work.add_(z, alpha=c)
        if work is not part:
            if rounding_seed is None:
                part.copy_(work)
            else:
                stochastic_round_(part, work, rounding_seed, key, base + start, be.words)


def _chunk_moments(be, z, key, start, offset, *, estimates, weights1, weights2, m, v, beta1, beta2, adam, distribution):
    """m (and v) of one chunk of :func:`moment_sweep_`: the stored ones moved by the last estimate (in place), or
    rebuilt from the history's estimates. ``start``: the chunk's global element index; ``offset``: its index in
    this shard (where m and v keep it)."""
    size = z.numel()

    def estimate(terms):
        g = torch.zeros(size, dtype=torch.float32, device=z.device)
        for seed, c in terms:
            be.fill(z, distribution, seed, key, start)
            g.add_(z, alpha=c)
        return g

    if m is not None:
        g = estimate(estimates[-1])
        mc = m.view(-1)[offset : offset + size]
        mc.mul_(beta1).add_(g, alpha=1.0 - beta1)
        vc = None
        if adam:
            vc = v.view(-1)[offset : offset + size]
            vc.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        return mc, vc
    mc = torch.zeros(size, dtype=torch.float32, device=z.device)
    vc = torch.zeros(size, dtype=torch.float32, device=z.device) if adam else None
    for k, terms in enumerate(estimates):
        g = estimate(terms)
        mc.add_(g, alpha=weights1[k])
        if adam:
            vc.addcmul_(g, g, value=weights2[k])
    return mc, vc


def _float_work(part: torch.Tensor) -> torch.Tensor:
    return part.float() if part.dtype != torch.float32 else part


def _write_back(part, work, rounding_seed, key, start, be) -> None:
    if work is part:
        return
    if rounding_seed is None:
        part.copy_(work)
    else:
        stochastic_round_(part, work, rounding_seed, key, start, be.words)


def scaled_sweep_(
    p: torch.Tensor,
    key: int,
    s: torch.Tensor,
    terms: Sequence[tuple[int, float]],
    *,
    distribution: str = "gaussian",
    backend: str | None = None,
) -> None:
    """theta <- theta + sum(c * s * z(seed)) elementwise, with ``s`` a float32 tensor of p's shape.

    The probe sweep of a preconditioned direction (HiZOO's ``u = s z``), chunk by chunk: z regenerated,
    no temporary larger than one chunk. Plain torch on float32 chunks (no fused kernel yet: the
    fallback for every backend, whose z it draws).
    """
    p, base = local_shard(p)
    be = kernels.select(p.device, backend)
    flat, sflat = _flat(p), s.view(-1)
    n, chunk = flat.numel(), _chunk(be)
    zbuf = torch.empty(min(chunk, n), dtype=torch.float32, device=p.device)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        z = zbuf[: part.numel()]
        work = _float_work(part)
        for seed, c in terms:
            be.fill(z, distribution, seed, key, base + start)
            work.addcmul_(sflat[start : start + part.numel()], z, value=c)
        _write_back(part, work, None, key, base + start, be)


def hizoo_update_(
    p: torch.Tensor | None,
    key: int,
    s: torch.Tensor,
    *,
    seed: int,
    restore: float,
    g: float,
    kappa: float,
    alpha: float,
    scale: float = 1.0,
    lr: float = 0.0,
    update: bool = True,
    distribution: str = "gaussian",
    rounding_seed: int | None = None,
    backend: str | None = None,
) -> None:
    """HiZOO's update on one parameter, chunk by chunk, with z regenerated (see :class:`zotune.HiZOO`)::

        theta <- theta + restore * s * z                                (remove the carried perturbation)
        s     <- sqrt((1 - alpha) s^2 + alpha * kappa * z^2 / s^2)       (the diagonal's moving average)
        theta <- scale * theta - lr * g * s * z                          (scale: weight decay)

    ``s`` is the square root of the diagonal the authors keep (float32, updated in place). With
    ``update=False`` (``p`` may be None) only ``s`` moves: how a resume rebuilds it from the trajectory.
    """
    if p is not None:
        p, base = local_shard(p)
    else:
        base = 0
    device = s.device
    be = kernels.select(device, backend)
    sflat = s.view(-1)
    flat = _flat(p) if p is not None else None
    n, chunk = sflat.numel(), _chunk(be)
    zbuf, dbuf, tbuf = (torch.empty(min(chunk, n), dtype=torch.float32, device=device) for _ in range(3))
    for start in range(0, n, chunk):
        sc = sflat[start : start + chunk]
        z, d, t = zbuf[: sc.numel()], dbuf[: sc.numel()], tbuf[: sc.numel()]
        be.fill(z, distribution, seed, key, base + start)
        part = flat[start : start + chunk] if update and flat is not None else None
        work = None
        if part is not None:
            work = _float_work(part)
            work.addcmul_(sc, z, value=restore)
        torch.mul(sc, sc, out=d)  # s^2, and z^2 / s^2, in chunk buffers: no temporary per chunk
        torch.mul(z, z, out=t).div_(d)
        sc.copy_(d.mul_(1.0 - alpha).add_(t, alpha=alpha * kappa).sqrt_())
        if work is None:
            continue
        if scale != 1.0:
            work.mul_(scale)
        work.addcmul_(sc, z, value=-lr * g)
        _write_back(part, work, rounding_seed, key, base + start, be)
