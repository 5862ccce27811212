"""One description of a step, executed by the optimizer with a closure and by replay from the record.

A zeroth-order step is: probe sweeps, each followed by a loss evaluation (its layout is the
estimator's, :mod:`zotune.optim.estimators`), then one update (the rule's, :mod:`zotune.optim.variants`).
:class:`zotune.MeZO` runs :class:`Probe` with ``evaluate`` calling the closure; :func:`zotune.replay`
runs the very same :class:`Probe` with ``evaluate`` returning the recorded outcome (a finite
placeholder, or NaN where the record says the step stopped), then builds the update with the same
:func:`update_of`. Because the sweeps, their order, their float32 scalars and the undo of an
interrupted step are all decided here once, a trajectory replays bit for bit and the two cannot drift.

:class:`Directions` are the run's perturbations over its tensors: u_j of step t is
``a_j s_l z(step_seed(seed, t, j))`` (a_j the sphere factor, cached; s_l a per-tensor scale or 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from zotune import rng
from zotune.optim import directions as kinds
from zotune.optim import functional, variants
from zotune.optim.directions import LOWRANK_V_INDEX  # noqa: F401  (re-exported: where the tests and users found it)
from zotune.optim.estimators import Estimator

__all__ = ["BatchedProbe", "Directions", "LayerProbes", "Probe", "StepPlan", "update_of"]

_FACTOR_CACHE = 256  # sphere factors kept (each costs one pass over the parameters to recompute)


class Directions:
    """The perturbations of a run over a fixed list of tensors (table order) and their keys.

    ``distribution`` names a registered kind (:data:`zotune.optim.directions.KINDS`): element-wise Gaussian or
    Rademacher z, the sphere, or factors of each matrix: ``"lowrank"`` (LOZO, arXiv 2410.07698: ``U V^T /
    sqrt(rank)``, U each step, V every ``lowrank_every`` steps; a direction's seed is the pair of its factors'
    seeds, nothing stored) and ``"subspace"`` (ZO-Muon, arXiv 2602.17155: ``P Psi_j``, P orthonormal and shared
    by a step's directions; :func:`zotune.optim.factored.subspace_factors`). ``sparsity`` (Sparse-MeZO): z
    masked on each matrix by :meth:`mask_step`; :attr:`elementwise` (HiZOO): z scaled per element.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        keys: Sequence[int],
        seed: int,
        distribution: str,
        backend: str | None = None,
        *,
        lowrank_rank: int = 2,
        lowrank_every: int = 50,
        sparsity: float = 0.0,
    ):
        self.params, self.keys = list(params), list(keys)
        self.sparsity = float(sparsity)
        self._masks: tuple[int, list] | None = None  # (step, per tensor None or its packed mask) of sparse directions
        self.seed0 = int(seed)
        self.kind = kinds.get(distribution)
        self.sphere = self.kind.sphere
        self.every = lowrank_every
        self.zdist = self.kind.stream(lowrank_rank)  # the stream the functional sweeps draw
        self.backend = backend
        self._factors: dict[int, float] = {}
        self.elementwise: list[torch.Tensor] | None = None  # a per-element scale per tensor (HiZOO's s), or None

    def seed(self, t: int, j: int = 0):
        """Direction j of step t: its seed, or the pair of its factors' seeds (the kind's)."""
        return self.kind.seed(self.seed0, t, j, self.every)

    def factor(self, seed: int) -> float:
        """a = sqrt(d) / ||x(seed)|| for the sphere distribution (one extra pass, cached); 1.0 otherwise."""
        if not self.sphere:
            return 1.0
        if seed not in self._factors:
            if len(self._factors) >= _FACTOR_CACHE:
                self._factors.clear()
            d = sum(p.numel() for p in self.params)
            sumsq = functional.gaussian_sumsq(self.params, self.keys, seed, backend=self.backend)
            self._factors[seed] = rng.sphere_factor(sumsq, d)
        return self._factors[seed]

    def mask_step(self, t: int) -> None:
        """Sparse directions (Sparse-MeZO): compute step t's masks from the weights as they are now, which must
        be the clean weights of step t (the :class:`Probe` calls this before its first sweep). The matrices
        are masked (:func:`~zotune.optim.masked.magnitude_mask`); vectors (biases, norms) move as usual."""
        if self.sparsity:
            masks = [
                functional.magnitude_mask(p, self.sparsity, backend=self.backend) if p.dim() >= 2 else None
                for p in self.params
            ]
            self._masks = (t, masks)

    def masks_at(self, t: int) -> list | None:
        """Step t's masks (computed now if this step has none yet), or None for dense directions."""
        if not self.sparsity:
            return None
        if self._masks is None or self._masks[0] != t:
            self.mask_step(t)
        return self._masks[1]

    def sweep(self, t: int, pairs: Sequence[tuple[int, float]], eps: float, scales=None) -> None:
        """One probe sweep: theta += sum(multiple * eps * a_j * s_l * z_j) over ``pairs`` of (j, multiple)."""
        if not pairs:
            return
        terms = []
        for j, mult in pairs:
            seed = self.seed(t, j)
            terms.append((seed, mult * eps * self.factor(seed), scales))
        if self.elementwise is not None:  # u = s z elementwise: the preconditioned sweep, tensor by tensor
            for i, (p, key, s) in enumerate(zip(self.params, self.keys, self.elementwise, strict=True)):
                functional.scaled_sweep_(
                    p,
                    key,
                    s,
                    [(seed, c if sc is None else c * sc[i]) for seed, c, sc in terms],
                    distribution=self.zdist,
                    backend=self.backend,
                )
            return
        variants.sweep_terms_(
            self.params, self.keys, terms, distribution=self.zdist, backend=self.backend, masks=self.masks_at(t)
        )

    def sweep_into(self, targets: Sequence[torch.Tensor], t: int, pairs, eps: float, scales=None) -> None:
        """:meth:`sweep` applied to ``targets`` (tensors shaped as the run's, in table order) instead of the
        parameters: a batched step's perturbed copies. Sparse masks are those of step t, which come from the
        clean parameters (the :class:`Probe` computed them before any copy)."""
        if len(targets) != len(self.params):
            raise ValueError(f"sweep_into needs {len(self.params)} tensors, got {len(targets)}")
        params = self.params
        self.params = list(targets)
        try:
            self.sweep(t, pairs, eps, scales)
        finally:
            self.params = params

    def sweep_tensors(self, index: Sequence[int], seed: int, coefficient: float) -> None:
        """theta_i += coefficient * z(seed) on the tensors ``index`` only (a per-layer probe)."""
        variants.sweep_terms_(
            [self.params[i] for i in index],
            [self.keys[i] for i in index],
            [(seed, coefficient, None)],
            distribution=self.zdist,
            backend=self.backend,
        )


@dataclass(frozen=True)
class StepPlan:
    """What step ``step`` does before its update: n directions, laid out by ``estimator``."""

    step: int
    n: int
    estimator: Estimator
    eps: float  # float32-rounded
    pending: bool = False  # the parameters already hold +eps u_0 of this step (fused by the previous update)
    scales: list[float] | None = None  # s_l of the update, per tensor in table order; None: 1
    probe_scales: list[float] | None = None  # p_l of the probes where they differ from s_l (grad-norm: 1/c_l)

    @property
    def sweeps(self) -> list[list[tuple[int, float]]]:
        return self.estimator.sweeps(self.n)

    @property
    def perturb_scales(self) -> list[float] | None:
        return self.scales if self.probe_scales is None else self.probe_scales


class Probe:
    """The probe sweeps and loss evaluations of one step.

    :meth:`run` calls ``evaluate(k)`` after sweep k and stops after the first non-finite value. On
    any failure the caller calls :meth:`undo`, which removes the perturbation still carried; then
    ``len(losses) + 1`` (an exception) or ``len(losses)`` (a non-finite value) is the phase that a
    skip record stores, and replaying that phase repeats exactly these sweeps.
    """

    def __init__(self, plan: StepPlan, directions: Directions):
        self.plan, self.directions = plan, directions
        self.losses: list[float] = []
        self.first = None  # the first evaluation's value, as ``evaluate`` returned it
        self.carry: tuple[int, float] | None = None  # (j, multiple of eps) the parameters hold now
        directions.mask_step(plan.step)  # sparse directions: this step's masks, from its clean weights
        # the multiple of eps each direction is probed at (KerZOO's keyed r_j; 1.0 for the others)
        self.radii = [plan.estimator.radius(directions.seed(plan.step, j)) for j in range(plan.n)]

    def carried(self, k: int) -> tuple[int, float] | None:
        """(j, multiple of eps) the parameters hold after sweep k: the estimator's, times r_j."""
        c = self.plan.estimator.carry_after(k)
        return None if c is None else (c[0], c[1] * self.radii[c[0]])

    def run(self, evaluate: Callable[[int], object], *, until: int | None = None) -> None:
        plan = self.plan
        for k, pairs in enumerate(plan.sweeps[:until]):
            if not (k == 0 and plan.pending):
                pairs = [(j, mult * self.radii[j]) for j, mult in pairs]
                self.directions.sweep(plan.step, pairs, plan.eps, plan.perturb_scales)
            self.carry = self.carried(k)
            value = evaluate(k)
            if k == 0:
                self.first = value
            self.losses.append(float(value))
            if not math.isfinite(self.losses[-1]):
                return

    @property
    def complete(self) -> bool:
        """Every evaluation ran and was finite."""
        return len(self.losses) == len(self.plan.sweeps) and all(math.isfinite(x) for x in self.losses)

    def estimate(self) -> list[float]:
        """The coefficients c_j (float32) of a complete probe; NaN where they are not finite."""
        return self.plan.estimator.estimate(self.losses, self.plan.n, self.plan.eps, self.radii)

    def extras(self) -> tuple[float, ...]:
        """The estimator's extra scalars of a complete probe (HiZOO's kappa); empty for most."""
        return self.plan.estimator.extras(self.losses, self.plan.n, self.plan.eps)

    def undo(self) -> None:
        """Remove the carried perturbation (one more sweep), leaving theta as before the step."""
        if self.carry is not None:
            j, mult = self.carry
            self.directions.sweep(self.plan.step, [(j, -mult)], self.plan.eps, self.plan.perturb_scales)
            self.carry = None


class BatchedProbe(Probe):
    """The evaluations of one step in a single batched forward, the parameters never moved in place.

    Evaluation k of the estimator's layout is at ``theta + carried(k)`` (what :class:`Probe` holds after
    sweep k; :meth:`Estimator.carry_after`), so every point is built from the clean weights: a stack of
    ``len(sweeps)`` copies of each tensor, copy k moved by one sweep of ``carried(k)``. ``evaluate_all``
    takes the stacks (one ``(points, *shape)`` tensor per parameter, table order) and returns the losses
    (a tensor or a sequence), in evaluation order. Nothing is carried afterwards, so the update restores
    nothing and an interruption has nothing to undo; the losses are kept up to the first non-finite one,
    as a sequential probe would have stopped there. Replay calls :meth:`run` with ``evaluate_all=None``:
    no copies, no sweeps (the parameters never held a perturbation), only the recorded layout.

    Memory: the stacks hold ``len(sweeps)`` copies of the trainable parameters (FZOO: N + 1), and the
    forward holds as many batches' activations at once.
    """

    def run(self, evaluate_all, *, until: int | None = None) -> None:  # type: ignore[override]
        plan = self.plan
        if plan.pending:
            raise ValueError("a batched step cannot start from a fused perturbation (use fuse_next=False)")
        count = len(plan.sweeps[:until])
        if evaluate_all is None:  # replay: the layout only
            values = [0.0] * count
        else:
            params = self.directions.params
            stacks = [p.detach().unsqueeze(0).repeat(count, *([1] * p.dim())) for p in params]
            for k in range(count):
                c = self.carried(k)
                if c is not None:
                    self.directions.sweep_into([s[k] for s in stacks], plan.step, [c], plan.eps, plan.perturb_scales)
            values = evaluate_all(stacks)
            del stacks
            if isinstance(values, torch.Tensor):
                values = values.detach().reshape(-1).tolist()
            values = list(values)
            if len(values) != count:
                raise ValueError(f"a batched closure returned {len(values)} losses for {count} points")
        for k, value in enumerate(values):
            if k == 0:
                self.first = value
            self.losses.append(float(value))
            if not math.isfinite(self.losses[-1]):
                return

    def undo(self) -> None:
        """Nothing to undo: the parameters were never moved."""
        self.carry = None


def recorded(phase: int | None) -> Callable[[int], float]:
    """Replay's ``evaluate``: a finite placeholder, and NaN at evaluation ``phase`` (1-based) of a skip."""

    def evaluate(k: int) -> float:
        return math.nan if phase is not None and k == phase - 1 else 0.0

    return evaluate


def update_of(
    plan: StepPlan,
    directions: Directions,
    grads: Sequence[float],
    carry: tuple[int, float] | None,
    *,
    fuse_next: bool = False,
    extras: Sequence[float] = (),
) -> variants.StepUpdate:
    """The update of a probed step: seeds, sphere factors, the coefficients, what to restore and what to fuse."""
    t, eps = plan.step, plan.eps
    seeds = [directions.seed(t, j) for j in range(len(grads))]
    next_terms = []
    if fuse_next:
        seed_next = directions.seed(t + 1)
        next_terms = [(seed_next, eps * directions.factor(seed_next))]
    carried = None if carry is None else (carry[0], carry[1] * eps)
    return variants.StepUpdate(
        t,
        seeds,
        [directions.factor(s) for s in seeds],
        list(grads),
        plan.scales,
        carried,
        next_terms,
        plan.probe_scales,
        tuple(extras),
        directions.masks_at(t),
    )


class LayerProbes:
    """The per-layer probe pass of the gradient-norm variant at step ``step``.

    For each layer i and probe r (:func:`zotune.optim.variants.layer_probe_sweeps`): layer i alone
    moves by +eps z (loss L+), -2 eps z (loss L-), +eps z (restore). :meth:`run` returns the squared
    finite estimates per layer; ``until`` stops after that many sweeps (replay of an interrupted pass),
    and :meth:`undo` removes the multiple still carried.
    """

    def __init__(self, directions: Directions, layers: Sequence[Sequence[int]], step: int, probes: int, eps: float):
        self.directions, self.layers, self.step, self.probes, self.eps = directions, layers, step, probes, eps
        self.plan = variants.layer_probe_sweeps(len(layers), probes)
        self.applied = 0

    def _move(self, i: int, r: int, mult: float) -> None:
        seed = variants.layer_probe_seed(self.directions.seed0, self.step, i, r, len(self.layers))
        self.directions.sweep_tensors(self.layers[i], seed, mult * self.eps)

    def run(self, evaluate: Callable[[int], object], *, until: int | None = None) -> list[list[float]]:
        squares: list[list[float]] = [[] for _ in self.layers]
        plus = math.nan
        for k, (i, r, mult) in enumerate(self.plan[:until]):
            self._move(i, r, mult)
            self.applied = k + 1
            if k % 3 == 2:  # the restoring sweep
                continue
            value = float(evaluate(k))
            if k % 3 == 0:
                plus = value
            else:
                g = (plus - value) / (2 * self.eps)
                if math.isfinite(g):
                    squares[i].append(g * g)
        return squares

    def undo(self) -> None:
        """An interrupted pass: move the probed layer back by the multiple it still carries."""
        if self.applied % 3:
            i, r, _ = self.plan[self.applied - 1]
            self._move(i, r, -1.0 if self.applied % 3 == 1 else 1.0)
