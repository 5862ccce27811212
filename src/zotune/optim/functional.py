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

Directions with math of their own live beside this module, and :func:`sweep_` dispatches to them:
:mod:`zotune.optim.masked` (Sparse-MeZO's magnitude masks) and :mod:`zotune.optim.factored` (LOZO's,
SubZero's and ZO-Muon's factored directions, ZO-Muon's update); :mod:`zotune.optim.chunks` holds what
every chunked path shares. Their public functions are re-exported here.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from zotune import kernels, rng
from zotune.optim import factored, masked
from zotune.optim.chunks import (
    FLOAT_TYPES,
    chunk_size,
    f32,
    flat_view,
    float_work,
    local_shard,
    stochastic_round_,
    write_back,
)
from zotune.optim.factored import msign, muon_update_, subspace_factors, subzero_factors
from zotune.optim.masked import MASK_SAMPLE, magnitude_mask

__all__ = [
    "MASK_SAMPLE",
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
        distribution: ``"gaussian"``, ``"gaussian-fast"`` or ``"rademacher"`` (:data:`zotune.rng.DISTRIBUTIONS`).
        rounding_seed: when set, bf16/fp16 results are rounded stochastically with this seed's
            rounding stream; float32 parameters ignore it.
        backend: a name from ``zotune.kernels.available()``; ``None`` picks the fastest per device.
        masks: per tensor, None or the packed bits of :func:`magnitude_mask`: then ``z`` is ``m * z`` on that
            tensor (Sparse-MeZO, :mod:`zotune.optim.masked`); the masked tensors go one by one through the backend's ``masked_axpy``
            (numba: z, mask and update in one pass) or, without one, a chunked torch path (the same numbers).
    """
    options = dict(scale=scale, rounding_seed=rounding_seed, backend=backend)
    if masks is not None:
        _masked_sweeps_(params, keys, terms, masks, distribution, **options)
    elif distribution.startswith(("lowrank:", "subspace:", "subzero:")):
        kind, rank = distribution.split(":")
        _factored_sweeps_(params, keys, terms, int(rank), kind, **options)
    else:
        _elementwise_sweep_(params, keys, terms, distribution, **options)


def _masked_sweeps_(params, keys, terms, masks, distribution, *, scale, rounding_seed, backend) -> None:
    """Sparse-MeZO's :func:`sweep_`: the masked tensors one by one (:func:`zotune.optim.masked.masked_sweep_`), the rest as usual."""
    for p, key, bits in zip(params, keys, masks, strict=True):
        if bits is not None:
            masked.masked_sweep_(p, key, bits, terms, scale, distribution, rounding_seed, backend)
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


def _factored_sweeps_(params, keys, terms, rank: int, kind: str, *, scale: float, rounding_seed, backend) -> None:
    """:func:`sweep_` along factored directions over terms ``((seed, seed_window), c)``: each matrix through
    :func:`zotune.optim.factored.factored_sweep_`; any other tensor (biases, norms) moves along the Gaussian z of
    the first seed, as LOZO and SubZero perturb vectors, or not at all for ``"subspace"`` (ZO-Muon moves matrices
    only; weight decay still scales them)."""
    if isinstance(rounding_seed, tuple):
        rounding_seed = rounding_seed[0]
    terms = [((int(s[0]), int(s[1])), float(c)) for s, c in terms]
    for p, key in zip(params, keys, strict=True):
        if p.dim() == 2:
            factored.factored_sweep_(
                p, key, terms, rank, kind=kind, scale=scale, rounding_seed=rounding_seed, backend=backend
            )
        elif kind == "subspace":
            if scale != 1.0:
                with torch.no_grad():
                    p.mul_(scale)
        else:
            sweep_(
                [p],
                [key],
                [(s[0], c) for s, c in terms],
                scale=scale,
                distribution="gaussian",
                rounding_seed=rounding_seed,
                backend=backend,
            )


def _elementwise_sweep_(params, keys, terms, distribution, *, scale, rounding_seed, backend) -> None:
    """:func:`sweep_` along element-wise z: the backend's multi-tensor kernel where it has one, else chunked."""
    if distribution not in rng.DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {rng.DISTRIBUTIONS}")
    terms = [(int(s), float(c)) for s, c in terms]
    if _one_launch(params, keys, distribution, terms, scale, rounding_seed, backend):
        return
    batched: dict[str, tuple] = {}  # backends with a multi-tensor sweep: one launch for all their tensors
    # Per-tensor host work is kept small: on a GPU the sweep waits for it (the loss's .item() has just
    # synchronised), and a model has hundreds of tensors (SmolLM2: 272). So the backend is chosen once
    # per device, and the multi-tensor path takes the tensors as they are (it needs their pointers,
    # not flat views: a detach() and a view() per tensor were half of a 3.4 ms call, measured).
    chosen: dict = {}  # device -> (backend, its multi-tensor sweep or None)
    for p, key in zip(params, keys, strict=True):
        if p.dtype not in FLOAT_TYPES:
            raise TypeError(f"MeZO supports float32, bfloat16 and float16 parameters, got {p.dtype}")
        p, base = local_shard(p)  # a sharded parameter: this rank's elements base .. base + numel - 1
        device = p.device
        if device not in chosen:
            be = kernels.select(device, backend)
            chosen[device] = (be, be.sweep if len(terms) <= _sweep_terms(be, distribution) else None)
        be, multi = chosen[device]
        if multi is not None:  # fused in the kernel: read and write in p's dtype, no float32 buffer
            if not p.is_contiguous():
                flat_view(p)  # raises, saying what to do
            group = batched.setdefault(be.name, (multi, [], [], []))
            group[1].append(p)
            group[2].append(key)
            group[3].append(base)
            continue
        flat = flat_view(p)
        n, chunk = flat.numel(), chunk_size(be)
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
                stochastic_round_(part, work, rounding_seed, key, base + start, be.words, on_device=be.device_words)
    for multi, flats, flat_keys, bases in batched.values():
        multi(flats, flat_keys, bases, distribution, terms, scale=scale, rounding_seed=rounding_seed)


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))  # not DTensor (sharded) or another subclass
_DEVICE, _DTYPE = operator.attrgetter("device"), operator.attrgetter("dtype")
_FLOATS = frozenset(FLOAT_TYPES)


def _one_launch(params, keys, distribution, terms, scale, rounding_seed, backend) -> bool:
    """The common GPU sweep in one call of the backend's multi-tensor sweep, checked by a few passes over the list in
    C: plain contiguous float tensors on one device, a backend with a multi-tensor sweep taking that many terms. The loop
    of :func:`_elementwise_sweep_` makes the same call for such a list (every base 0) at ~0.6 us of Python a
    tensor, while the GPU waits (benchmarks/sweep_host.py). False: nothing done, the loop decides (and raises)."""
    if not params or len(keys) != len(params):
        return False
    be = kernels.select(params[0].device, backend)
    if be.sweep is None or len(terms) > _sweep_terms(be, distribution):  # the CPU backends: decided before any pass
        return False
    if not set(map(type, params)) <= _PLAIN or len(set(map(_DEVICE, params))) != 1:
        return False
    if not set(map(_DTYPE, params)) <= _FLOATS or not all(map(torch.Tensor.is_contiguous, params)):
        return False
    be.sweep(params, keys, [0] * len(params), distribution, terms, scale=scale, rounding_seed=rounding_seed)
    return True


def _sweep_terms(be, distribution: str) -> int:
    """How many terms one call of ``be.sweep`` takes for ``distribution`` (two unless the backend says more)."""
    return 2 if be.sweep_terms is None else be.sweep_terms(distribution)


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
        # the backend's own chunk, not chunk_size(be): the float64 sum's order (so the sphere factor's bits, which
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
    flat = flat_view(p)
    n, chunk = flat.numel(), chunk_size(be)
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
                stochastic_round_(part, work, rounding_seed, key, base + start, be.words, on_device=be.device_words)


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


def scaled_sweep_(
    p: torch.Tensor,
    key: int,
    s: torch.Tensor,
    terms: Sequence[tuple[int, float]],
    *,
    distribution: str = "gaussian",
    scale: float = 1.0,
    rounding_seed: int | None = None,
    backend: str | None = None,
) -> None:
    """theta <- scale theta + sum(c * s * z(seed)) elementwise, with ``s`` a float32 tensor of p's shape.

    The probe sweep of a preconditioned direction (HiZOO's ``u = s z``; GRZO's update), chunk by chunk: z
    regenerated, no temporary larger than one chunk. Plain torch on float32 chunks (no fused kernel yet: the
    fallback for every backend, whose z it draws). ``rounding_seed``: bf16/fp16 results rounded stochastically.
    """
    p, base = local_shard(p)
    be = kernels.select(p.device, backend)
    flat, sflat = flat_view(p), s.view(-1)
    n, chunk = flat.numel(), chunk_size(be)
    zbuf = torch.empty(min(chunk, n), dtype=torch.float32, device=p.device)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        z = zbuf[: part.numel()]
        work = float_work(part)
        if scale != 1.0:
            work.mul_(scale)
        for seed, c in terms:
            be.fill(z, distribution, seed, key, base + start)
            work.addcmul_(sflat[start : start + part.numel()], z, value=c)
        write_back(part, work, rounding_seed, key, base + start, be)


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
    flat = flat_view(p) if p is not None else None
    n, chunk = sflat.numel(), chunk_size(be)
    zbuf, dbuf, tbuf = (torch.empty(min(chunk, n), dtype=torch.float32, device=device) for _ in range(3))
    for start in range(0, n, chunk):
        sc = sflat[start : start + chunk]
        z, d, t = zbuf[: sc.numel()], dbuf[: sc.numel()], tbuf[: sc.numel()]
        be.fill(z, distribution, seed, key, base + start)
        part = flat[start : start + chunk] if update and flat is not None else None
        work = None
        if part is not None:
            work = float_work(part)
            work.addcmul_(sc, z, value=restore)
        torch.mul(sc, sc, out=d)  # s^2, and z^2 / s^2, in chunk buffers: no temporary per chunk
        torch.mul(z, z, out=t).div_(d)
        sc.copy_(d.mul_(1.0 - alpha).add_(t, alpha=alpha * kappa).sqrt_())
        if work is None:
            continue
        if scale != 1.0:
            work.mul_(scale)
        work.addcmul_(sc, z, value=-lr * g)
        write_back(part, work, rounding_seed, key, base + start, be)
