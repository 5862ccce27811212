"""The parts of a MeZO step that vary (paper §2.2 and Appendix B), shared by the optimizer and replay.

A step is: probe sweeps and loss evaluations (the *estimator*, :mod:`zotune.optim.estimators`), then
one update (the *rule*: SGD, momentum or Adam, here). :mod:`zotune.optim.step` puts them together
once, so that :class:`zotune.MeZO` and :func:`zotune.replay` perform the very same sweeps with the
very same float32 scalars. This module holds the rules, the layerwise scales and the multi-term sweep.

Perturbation j of step t is ``u_j = a_j * s_l * z(step_seed(seed, t, j))`` on tensor l, where
``a_j`` is 1, or ``sqrt(d) / ||x_j||`` for the sphere distribution, and ``s_l`` is 1, or
``||theta_l|| / sqrt(d_l)`` for the layerwise parameter-norm variant, or ``1 / c_l`` for the
gradient-norm variant, whose update then goes along ``c_l z`` (see :func:`grad_norm_scales`).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zotune import rng
from zotune.optim import flipout, functional, masked

__all__ = [
    "MAX_PERTURBATIONS",
    "AdamRule",
    "HiZOORule",
    "MomentumRule",
    "MuonRule",
    "RULES",
    "SGDRule",
    "StepUpdate",
    "grad_norm_scales",
    "inverse_scales",
    "layer_groups",
    "layer_probe_seed",
    "layer_probe_sweeps",
    "layer_scales",
    "linear_n",
    "make_rule",
    "sweep_terms_",
]

MAX_PERTURBATIONS = 100  # a skip record stores the failing evaluation in one byte: 2n + 1 <= 255
LAYER_PROBE_INDEX = 1 << 20  # perturbation indices of the per-layer probes (n-SPSA uses j < 100)


def linear_n(n0: int, n1: int, ramp_steps: int) -> Callable[[int], int]:
    """A schedule for the number of perturbations: n0 at step 0, rising linearly to n1 at ``ramp_steps``.

    Example: ``MeZO(params, lr, n_perturbations=linear_n(1, 8, 1000))``.
    """
    if ramp_steps < 1:
        raise ValueError(f"ramp_steps must be >= 1, got {ramp_steps}")

    def n_at(step: int) -> int:
        return int(n0 + (n1 - n0) * min(step, ramp_steps) // ramp_steps)

    n_at.description = f"linear {n0} -> {n1} over {ramp_steps} steps"  # type: ignore[attr-defined]
    return n_at


@torch.no_grad()
def layer_scales(params: Sequence[torch.Tensor], chunk: int = 1 << 20) -> list[float]:
    """s_l = ||theta_l|| / sqrt(d_l) per tensor (float32-rounded; 1.0 for an all-zero tensor, so it still moves).

    The sum of squares is taken in float64, chunk by chunk, so no temporary exceeds one chunk.
    """
    out = []
    for p in params:
        flat = p.detach().reshape(-1)
        sumsq = sum(
            float(torch.dot(part, part))
            for part in (flat[i : i + chunk].double() for i in range(0, flat.numel(), chunk))
        )
        out.append(functional.f32(math.sqrt(sumsq / p.numel())) if sumsq > 0 else 1.0)
    return out


_BLOCK = re.compile(r"^((?:.*?\.)?\d+)\.")  # a name's numbered block: "model.layers.3.mlp.w" -> "model.layers.3"


def layer_groups(names: Sequence[str]) -> list[list[int]]:
    """The layers of the gradient-norm variant: tensor indices grouped by numbered block, in order.

    A tensor whose name has a numbered component (``model.layers.3.self_attn.q_proj.weight``,
    ``roberta.encoder.layer.5...``, LoRA's ``...layers.3...lora_A.default.weight``) belongs to the
    block up to that number; any other tensor (embeddings, final norm, head) is a layer of its own,
    as the authors' code treats the embeddings and the head.
    """
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        m = _BLOCK.match(name)
        groups.setdefault(m.group(1) if m else f"\0{name}", []).append(i)
    return list(groups.values())


def layer_probe_seed(seed: int, step: int, layer: int, probe: int, n_layers: int) -> int:
    """The seed of probe ``probe`` of layer ``layer`` at ``step`` (distinct from every step perturbation)."""
    return rng.step_seed(seed, step, LAYER_PROBE_INDEX + probe * n_layers + layer)


def layer_probe_sweeps(n_layers: int, probes: int) -> list[tuple[int, int, float]]:
    """The sweeps of a per-layer probe pass, as ``(layer, probe, multiple of eps)``.

    For each layer and probe: ``+z`` (loss L+), ``-2z`` (loss L-), ``+z`` (restore); only that
    layer's tensors move, along the unscaled z of :func:`layer_probe_seed`.
    """
    return [(i, r, c) for i in range(n_layers) for r in range(probes) for c in (1.0, -2.0, 1.0)]


def grad_norm_scales(
    squares: Sequence[float | None], groups: Sequence[Sequence[int]], sizes: Sequence[int]
) -> list[float]:
    """c_l per tensor from each layer's mean squared probe estimate (the gradient-norm variant).

    A per-layer probe gives ``g_l = z_l . grad_l L`` (two-sided, only layer l perturbed), and
    ``E[g_l^2] = ||grad_l L||^2`` for Gaussian z, so ``sqrt(mean g_l^2)`` estimates the layer's gradient
    norm, as in the authors' code (one probe per layer: ``|g_l|``). The step then perturbs layer l
    along ``z_l / c_l`` and updates along ``c_l z_l``, which keeps the estimate unbiased
    (``E[c_l^2 (z_l/c_l)(z_l/c_l)^T] = I``) and evens out the layers' share of its variance.

    Unlike the authors' code the c_l are rescaled by one common factor so that the perturbation's
    expected squared norm stays d, as plain MeZO's (``sum_l d_l / c_l^2 = d``): eps keeps its meaning
    whatever the gradient's scale, and the expected update is unchanged. A layer whose estimate is 0
    or unavailable (None: its losses were not finite) gets the geometric mean of the others; with no
    usable estimate at all every c_l is 1 (plain MeZO). float32-rounded.
    """
    norms = [None if q is None or not math.isfinite(q) or q <= 0 else math.sqrt(q) for q in squares]
    known = [x for x in norms if x is not None]
    n_tensors = sum(len(g) for g in groups)
    if not known:
        return [1.0] * n_tensors
    fill = math.exp(sum(math.log(x) for x in known) / len(known))
    norms = [fill if x is None else x for x in norms]
    dims = [sum(sizes[i] for i in g) for g in groups]
    kappa = math.sqrt(sum(dims) / sum(d / (c * c) for d, c in zip(dims, norms)))
    out = [1.0] * n_tensors
    for g, c in zip(groups, norms):
        for i in g:
            out[i] = functional.f32(c / kappa)
    return out


def inverse_scales(scales: Sequence[float]) -> list[float]:
    """1 / c_l, float32-rounded: the gradient-norm variant's perturbation scales."""
    return [functional.f32(1.0 / c) for c in scales]


def sweep_terms_(
    params,
    keys,
    terms,
    *,
    scales=None,
    scale: float = 1.0,
    distribution: str,
    rounding_seed=None,
    backend=None,
    masks=None,
) -> None:
    """theta_l <- scale theta_l + sum(c * s_l[term] * z(seed)) over terms ``(seed, c, s)``.

    ``s`` is None (no per-tensor factor) or one factor per tensor of ``params`` (layerwise). Without
    any per-tensor factor this is one :func:`~zotune.optim.functional.sweep_` over all tensors.
    ``masks`` (Sparse-MeZO, no per-tensor factors): per tensor None or its packed mask, z -> m z.
    """
    if all(s is None for _, _, s in terms):
        functional.sweep_(
            params,
            keys,
            [(seed, c) for seed, c, _ in terms],
            scale=scale,
            distribution=distribution,
            rounding_seed=rounding_seed,
            backend=backend,
            masks=masks,
        )
        return
    if masks is not None:
        raise ValueError("sparse directions take no per-tensor factors (layerwise scaling)")
    for i, (p, key) in enumerate(zip(params, keys, strict=True)):
        functional.sweep_(
            [p],
            [key],
            [(seed, c if s is None else c * s[i]) for seed, c, s in terms],
            scale=scale,
            distribution=distribution,
            rounding_seed=rounding_seed,
            backend=backend,
        )


@dataclass
class StepUpdate:
    """What an update rule needs of one step (all scalars already float32-rounded)."""

    step: int
    seeds: list[int]  # seed of perturbation j
    factors: list[float]  # a_j (sphere normalisation; 1.0 otherwise)
    grads: list[float]  # projected gradient g_j
    scales: list[float] | None  # s_l for every tensor of the optimizer (layerwise), or None
    carry: tuple[int, float] | None  # (j, c): the parameters hold theta + c a_j p_l z_j; None: clean theta
    next_terms: list[tuple[int, float]] = field(default_factory=list)  # fused +eps of the next step
    # p_l, the per-tensor factor of the perturbation being carried, where it differs from the update's
    # s_l (the gradient-norm variant probes along z / c_l and updates along c_l z); None: p_l = s_l
    probe_scales: list[float] | None = None
    extras: tuple[float, ...] = ()  # the estimator's extra scalars (HiZOO: kappa)
    masks: list | None = None  # Sparse-MeZO: per tensor of the optimizer, None or its packed mask of this step


@dataclass
class Group:
    """One parameter group as the rules see it: tensors, keys, their indices in the optimizer, lr, wd."""

    params: list[torch.Tensor]
    keys: list[int]
    index: list[int]
    lr: float
    weight_decay: float


def _pick(scales, index):
    return None if scales is None else [scales[i] for i in index]


class SGDRule:
    r"""theta <- (1 - lr wd) theta - lr/n sum_j g_j u_j: MeZO's update (the paper's Algorithm 1, with n-SPSA)."""

    name = "sgd"
    stored = False

    def header(self) -> dict | None:
        return None

    def state(self) -> dict | None:
        return None

    def load(self, state, optimizer=None) -> None:
        pass

    def apply(
        self, groups: Sequence[Group], u: StepUpdate, *, distribution, rounding_seed, backend, update: bool = True
    ) -> None:
        if not update:
            return
        n = len(u.grads)
        for grp in groups:
            lr, wd = grp.lr, grp.weight_decay
            scale = 1.0 - lr * wd
            coefs = [-(lr / n) * g for g in u.grads]
            restore = []
            if u.carry is not None:
                j, c = u.carry
                if u.probe_scales is None:  # restore and update along the same direction: one term
                    coefs[j] = -scale * c - (lr / n) * u.grads[j]
                else:
                    restore = [(u.seeds[j], -scale * c * u.factors[j], _pick(u.probe_scales, grp.index))]
            svec = _pick(u.scales, grp.index)
            terms = restore + [(s, a * c, svec) for s, a, c in zip(u.seeds, u.factors, coefs)]
            terms += [(s, c, None) for s, c in u.next_terms]
            sweep_terms_(
                grp.params,
                grp.keys,
                terms,
                scales=None,
                scale=scale,
                distribution=distribution,
                rounding_seed=rounding_seed,
                backend=backend,
                masks=None if u.masks is None else [u.masks[i] for i in grp.index],
            )


class _MomentRule:
    """Shared bookkeeping of momentum and Adam: the window of past estimates, or stored tensors."""

    adam = False

    def __init__(self, beta1: float, beta2: float, window: int, stored: bool, adam_eps: float = 1e-8):
        self.beta1, self.beta2, self.window, self.stored, self.adam_eps = beta1, beta2, window, stored, adam_eps
        self.count = 0  # updates applied (Adam's bias correction)
        self.history: deque = deque(maxlen=window)  # (seeds, factors, grads, scales) of the last applied steps
        self.m: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def header(self) -> dict:
        out = {
            "name": self.name,
            "beta1": self.beta1,
            "window": self.window,
            "state": "stored" if self.stored else "history",
        }
        if self.adam:
            out.update(beta2=self.beta2, adam_eps=self.adam_eps)
        return out

    def state(self) -> dict:
        return {
            "count": self.count,
            "history": None if self.stored else [list(map(list, h[:3])) + [h[3]] for h in self.history],
        }

    def load(self, state, optimizer=None) -> None:
        self.count = int(state["count"])
        self.history.clear()
        if not self.stored:
            for seeds, factors, grads, scales in state["history"]:
                self.history.append(([int(s) for s in seeds], factors, grads, scales))

    def _estimate_terms(self, seeds, factors, grads, svec, i):
        n = len(grads)
        return [(s, a * (g / n) * (1.0 if svec is None else svec[i])) for s, a, g in zip(seeds, factors, grads)]

    def apply(
        self, groups: Sequence[Group], u: StepUpdate, *, distribution, rounding_seed, backend, update: bool = True
    ) -> None:
        self.count += 1
        if not self.stored:
            self.history.append((list(u.seeds), list(u.factors), list(u.grads), u.scales))
        if not update and not self.stored:
            return
        b1, b2 = self.beta1, self.beta2
        bias1, bias2 = 1.0 - b1**self.count, 1.0 - b2**self.count
        for grp in groups:
            lr, wd = grp.lr, grp.weight_decay
            scale = 1.0 - lr * wd
            if not self.stored and not self.adam:  # momentum from the history: one linear W*n-term sweep
                self._history_momentum(grp, u, scale, distribution, rounding_seed, backend)
                continue
            for pos, (p, key, i) in enumerate(zip(grp.params, grp.keys, grp.index)):
                carried = u.scales if u.probe_scales is None else u.probe_scales
                s_i = 1.0 if carried is None else carried[i]
                restore = []
                if u.carry is not None:
                    j, c = u.carry
                    restore = [(u.seeds[j], -c * u.factors[j] * s_i)]
                if self.stored:
                    if i not in self.m:
                        self.m[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                        if self.adam:
                            self.v[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    estimates = [self._estimate_terms(u.seeds, u.factors, u.grads, u.scales, i)]
                    w1 = w2 = None
                else:
                    hist = list(self.history)
                    estimates = [self._estimate_terms(h[0], h[1], h[2], h[3], i) for h in hist]
                    ages = range(len(hist) - 1, -1, -1)
                    w1 = [(1.0 - b1) * b1**a for a in ages]
                    w2 = [(1.0 - b2) * b2**a for a in range(len(hist) - 1, -1, -1)]
                functional.moment_sweep_(
                    p,
                    key,
                    estimates=estimates,
                    weights1=w1,
                    weights2=w2 if self.adam else None,
                    m=self.m.get(i),
                    v=self.v.get(i) if self.adam else None,
                    beta1=b1,
                    beta2=b2,
                    restore=restore,
                    next_terms=u.next_terms,
                    scale=scale,
                    lr=lr,
                    bias1=bias1 if self.adam else 1.0,
                    bias2=bias2,
                    adam_eps=self.adam_eps,
                    update=update,
                    distribution=distribution,
                    rounding_seed=rounding_seed,
                    backend=backend,
                )

    def _history_momentum(self, grp: Group, u: StepUpdate, scale, distribution, rounding_seed, backend) -> None:
        lr, b1 = grp.lr, self.beta1
        hist = list(self.history)
        terms = []
        if u.carry is not None:
            j, c = u.carry
            carried = u.scales if u.probe_scales is None else u.probe_scales
            terms.append((u.seeds[j], -scale * c * u.factors[j], _pick(carried, grp.index)))
        for age, (seeds, factors, grads, scales) in zip(range(len(hist) - 1, -1, -1), hist):
            w = (1.0 - b1) * b1**age
            n = len(grads)
            svec = _pick(scales, grp.index)
            terms += [(s, -lr * w * (g / n) * a, svec) for s, a, g in zip(seeds, factors, grads)]
        terms += [(s, c, None) for s, c in u.next_terms]
        sweep_terms_(
            grp.params,
            grp.keys,
            terms,
            scale=scale,
            distribution=distribution,
            rounding_seed=rounding_seed,
            backend=backend,
        )


class MomentumRule(_MomentRule):
    r"""m_t = sum_{k <= t} (1-beta) beta^(t-k) ghat_k,  theta <- (1 - lr wd) theta - lr m_t."""

    name = "momentum"


class AdamRule(_MomentRule):
    r"""Adam on the ZO estimates: m, v moving averages of ghat and ghat**2, bias-corrected."""

    name = "adam"
    adam = True


class HiZOORule:
    r"""HiZOO's update (Zhao et al., arXiv 2402.15173, Algorithm 1), with its diagonal kept as s (float32)::

        theta <- theta + eps s z                                   (undo the probe at theta - eps s z)
        s^2   <- (1 - alpha) s^2 + alpha kappa z^2 / s^2           (s starts at 1)
        theta <- (1 - lr wd) theta - lr c s z

    c and kappa come from :class:`zotune.optim.estimators.HiZOO`; the probes go along ``u = s z`` with the
    s of the start of the step, the update along the new s, in the form of the authors' released code
    (their ``Hessian_matrix`` is s^2). s is one float32 tensor per parameter, the only memory HiZOO adds to
    inference's. It depends only on the seeds and the kappa of the trajectory, so a resume rebuilds it
    from the file (or takes it saved, as stored Adam's moments: ``moment_tensors``, ``"m.<i>"``).
    """

    name = "hizoo"
    estimator = "hizoo"  # the only estimator that gives it kappa
    stored = True
    adam = False

    def __init__(self, alpha: float):
        self.alpha = float(alpha)
        self.count = 0
        self.m: dict[int, torch.Tensor] = {}  # s per tensor index (the name moment_tensors saves it under)
        self.v: dict[int, torch.Tensor] = {}

    def header(self) -> dict:
        return {"name": self.name, "alpha": self.alpha}

    def state(self) -> dict:
        return {"count": self.count}

    def load(self, state, optimizer=None) -> None:
        self.count = int(state["count"])

    def elementwise(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """s for every tensor (in table order), ones where not yet made: the probes' per-element scale."""
        for i, p in enumerate(params):
            if hasattr(p, "placements"):
                raise ValueError("HiZOO does not support sharded (DTensor) parameters yet: its diagonal is per element")
            if i not in self.m:
                self.m[i] = torch.ones(p.shape, dtype=torch.float32, device=p.device)
        return [self.m[i] for i in range(len(params))]

    def apply(
        self, groups: Sequence[Group], u: StepUpdate, *, distribution, rounding_seed, backend, update: bool = True
    ) -> None:
        self.count += 1
        (kappa,) = u.extras
        restore = 0.0 if u.carry is None else -u.carry[1]
        for grp in groups:
            scale = 1.0 - grp.lr * grp.weight_decay
            for p, key, i in zip(grp.params, grp.keys, grp.index):
                if i not in self.m:
                    self.m[i] = torch.ones(p.shape, dtype=torch.float32, device=p.device)
                functional.hizoo_update_(
                    p if update else None,
                    key,
                    self.m[i],
                    seed=u.seeds[0],
                    restore=restore,
                    g=u.grads[0],
                    kappa=kappa,
                    alpha=self.alpha,
                    scale=scale,
                    lr=grp.lr,
                    update=update,
                    distribution=distribution,
                    rounding_seed=rounding_seed,
                    backend=backend,
                )


class MuonRule(SGDRule):
    r"""ZO-Muon's update (Lang et al., arXiv 2602.17155): on each matrix, with the step's N directions
    ``u_i = P Psi_i`` (``distribution="subspace"``: P orthonormal, m x r, shared by the step's directions and
    redrawn every ``lowrank_every`` steps; Psi_i Gaussian, r x n)::

        G = 1/N sum_i c_i Psi_i          (the subspace gradient estimate, r x n)
        theta <- (1 - lr wd) theta - lr P msign(G)

    after the carried probe is removed; c_i are the estimator's coefficients. Tensors that are not matrices
    neither move nor are updated (the directions have no part on them). Stateless: the trajectory's seeds
    and c_i rebuild every update (:func:`zotune.optim.factored.muon_update_`).
    """

    name = "muon"
    distribution = "subspace"  # the directions it needs

    def header(self) -> dict:
        return {"name": self.name}

    def apply(
        self, groups: Sequence[Group], u: StepUpdate, *, distribution, rounding_seed, backend, update: bool = True
    ) -> None:
        if not update:
            return
        if not distribution.startswith("subspace:"):
            raise ValueError(f"the muon rule needs distribution 'subspace', got {distribution!r}")
        rank = int(distribution.split(":")[1])
        if isinstance(rounding_seed, tuple):
            rounding_seed = rounding_seed[0]
        for grp in groups:
            scale = 1.0 - grp.lr * grp.weight_decay
            if u.carry is not None:  # remove the carried probe (and apply the weight decay) in one sweep
                j, c = u.carry
                sweep_terms_(
                    grp.params,
                    grp.keys,
                    [(u.seeds[j], -scale * c * u.factors[j], None)],
                    scale=scale,
                    distribution=distribution,
                    rounding_seed=rounding_seed,
                    backend=backend,
                )
            elif scale != 1.0:
                sweep_terms_(grp.params, grp.keys, [], scale=scale, distribution=distribution, backend=backend)
            for p, key in zip(grp.params, grp.keys):
                if p.dim() == 2:
                    functional.muon_update_(
                        p,
                        key,
                        seeds=u.seeds,
                        grads=u.grads,
                        rank=rank,
                        lr=grp.lr,
                        rounding_seed=rounding_seed,
                        backend=backend,
                    )


class GRZORule(SGDRule):
    r"""GRZO's update (Tan et al., arXiv 2606.02857): with one coefficient c_i per row of the step's batch
    (:class:`zotune.optim.estimators.GRZO`) and the rows' directions Delta_i = U (.) (r_i s_i^T), on each matrix::

        theta <- (1 - lr wd) theta - lr sum_i c_i Delta_i = (1 - lr wd) theta - lr U (.) (R^T diag(c) S)

    (:func:`zotune.optim.flipout.update_`; R^T diag(c) S is one d_out x d_in matrix at a time), and on a vector
    (a norm's weight or bias, directions r_i) ``theta <- theta - lr R^T c``. The
    probes were forward hooks, so nothing is carried. Stateless: seeds and coefficients rebuild it.

    ``sparsity`` (Sparse-GRZO, the authors' ``grzo_sparse``): each matrix's U is masked to ``|theta| <= h``, h its
    Sparse-MeZO threshold (:func:`zotune.optim.masked.magnitude_threshold`), from the weights as the step found them
    (GRZO's passes never move them, so the hooks and this update see the same mask); vectors are not masked.
    """

    name = "grzo"
    estimator = "grzo"

    def __init__(self, sparsity: float = 0.0):
        self.sparsity = float(sparsity)

    def header(self) -> dict:
        return {"name": self.name, **({"sparsity": self.sparsity} if self.sparsity else {})}

    def threshold(self, p: torch.Tensor) -> torch.Tensor | None:
        """A matrix's Sparse-MeZO threshold under ``sparsity`` (None: not sparse, or a vector)."""
        if not self.sparsity or p.dim() != 2:
            return None
        return masked.magnitude_threshold(p, self.sparsity)

    def keep(self, p: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor | None:
        """The elements of ``p`` that move (None: all): ``|p| <= h``, h (the step's, if known) its threshold."""
        h = self.threshold(p) if h is None else h
        return None if h is None else masked.below(p, h)

    def apply(
        self, groups: Sequence[Group], u: StepUpdate, *, distribution, rounding_seed, backend, update: bool = True
    ) -> None:
        if not update:
            return
        for grp in groups:
            scale = 1.0 - grp.lr * grp.weight_decay  # weight decay, in the update's own sweep
            for p, key in zip(grp.params, grp.keys):
                options = dict(scale=scale, rounding_seed=rounding_seed, backend=backend)
                if p.dim() == 2:
                    flipout.update_(p, key, u.seeds[0], u.grads, grp.lr, keep=self.keep(p), **options)
                else:
                    flipout.update_vector_(p, key, u.seeds[0], u.grads, grp.lr, **options)


RULES: dict[str, type] = {
    "sgd": SGDRule,
    "momentum": MomentumRule,
    "adam": AdamRule,
    "hizoo": HiZOORule,
    "muon": MuonRule,
    "grzo": GRZORule,
}  # by name


def make_rule(spec: dict | None):
    """The rule a trajectory header's ``"variant"`` entry (or None: SGD) describes."""
    if spec is None or spec.get("name", "sgd") == "sgd":
        return SGDRule()
    cls = RULES.get(spec["name"])
    if cls is HiZOORule:
        return HiZOORule(float(spec["alpha"]))
    if cls is GRZORule:
        return GRZORule(float(spec.get("sparsity", 0.0)))
    if cls is MuonRule:
        return cls()
    if cls is None:
        raise ValueError(f"unknown update rule {spec['name']!r}; this zotune knows {', '.join(RULES)}")
    return cls(
        float(spec["beta1"]),
        float(spec.get("beta2", 0.999)),
        int(spec["window"]),
        spec["state"] == "stored",
        float(spec.get("adam_eps", 1e-8)),
    )
