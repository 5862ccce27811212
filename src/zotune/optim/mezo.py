"""MeZO: memory-efficient zeroth-order SGD as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable

import torch

from zotune.optim import directions as kinds
from zotune.optim import estimators, functional, scales, variants
from zotune.optim.groups import decay_groups
from zotune.optim.keyed import KeyedOptimizer, check_arguments, param_table
from zotune.optim.step import BatchedProbe, Directions, Probe, StepPlan, update_of
from zotune.trajectory import Extras, Flush, Hyper, LayerProbe, LayerScales, MultiStep, Skip, Step

__all__ = ["FZOO", "HiZOO", "MeZO", "MeZOAdam", "MeZOMomentum", "NonFiniteLossError", "param_table"]

_STATE_FORMAT = 1


def _check_n(n, what: str = "n_perturbations") -> int:
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= variants.MAX_PERTURBATIONS):
        raise ValueError(f"Invalid {what}: {n!r} (must be an integer from 1 to {variants.MAX_PERTURBATIONS})")
    return n


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or infinity; the parameters were restored and not updated."""


def _check_options(
    *,
    lr,
    eps,
    weight_decay,
    seed,
    distribution,
    n_perturbations,
    estimator,
    layerwise,
    grad_norm_every,
    grad_norm_probes,
    fuse_next,
    on_nonfinite,
    backend,
) -> None:
    """MeZO's arguments, each bad one a ValueError naming it (before anything is built)."""
    check_arguments(lr=lr, weight_decay=weight_decay, seed=seed, on_nonfinite=on_nonfinite, backend=backend)
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"Invalid eps: {eps} (must be a finite number > 0)")
    if distribution not in kinds.KINDS:
        raise ValueError(f"Invalid distribution: {distribution!r} (choose one of {', '.join(kinds.KINDS)})")
    if estimator not in estimators.ESTIMATORS:
        raise ValueError(f"Invalid estimator: {estimator!r} (choose one of {', '.join(estimators.ESTIMATORS)})")
    if not callable(n_perturbations):
        _check_n(n_perturbations)
        est = estimators.get(estimator)
        if n_perturbations < est.min_n:
            raise ValueError(
                f"Invalid n_perturbations: {n_perturbations} (the {estimator} estimator needs at least {est.min_n})"
            )
        if est.max_n is not None and n_perturbations > est.max_n:
            raise ValueError(
                f"Invalid n_perturbations: {n_perturbations} (the {estimator} estimator takes at most {est.max_n})"
            )
    if layerwise not in scales.SCALES:
        raise ValueError(f"Invalid layerwise: {layerwise!r} (choose one of {', '.join(scales.SCALES)})")
    if not (isinstance(grad_norm_every, int) and grad_norm_every >= 0):
        raise ValueError(f"Invalid grad_norm_every: {grad_norm_every!r} (an integer >= 0; 0: estimate once)")
    if not (isinstance(grad_norm_probes, int) and 1 <= grad_norm_probes <= 1000):
        raise ValueError(f"Invalid grad_norm_probes: {grad_norm_probes!r} (an integer from 1 to 1000)")
    if fuse_next and (not estimators.get(estimator).fusable or layerwise != "none"):
        raise ValueError(
            "fuse_next=True works with the two-sided estimator without layerwise scaling only "
            "(the next step must start from its clean weights): pass fuse_next=False"
        )


def _prepare_params(params, weight_decay: float) -> list:
    """Drop frozen tensors; split a flat list into decay / no-decay groups by tensor rank."""
    params = list(params)
    if not params:
        raise ValueError("MeZO got an empty parameter list")
    if isinstance(params[0], dict):
        groups = []
        for group in params:
            group = dict(group)
            group["params"] = [p for p in _as_list(group["params"]) if _trainable(p)]
            groups.append(group)
        return groups
    trainable = [p for p in params if _trainable(p)]
    if not trainable:
        raise ValueError("MeZO got no trainable parameter (all have requires_grad=False)")
    if weight_decay == 0.0:
        return trainable
    return decay_groups(trainable)  # weight decay on matrices only: not on biases and normalisation weights


def _as_list(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _tensor(p) -> torch.Tensor:
    return p[1] if isinstance(p, tuple) else p


def _trainable(p) -> bool:
    return _tensor(p).requires_grad


class MeZO(KeyedOptimizer):
    r"""Zeroth-order SGD with in-place, regenerated perturbations (MeZO).

    Each step samples a seed s_t, and with z = z(s_t) regenerated from the keyed generator
    (never stored)::

        L+ = L(theta + eps z),   L- = L(theta - eps z),   g = (L+ - L-) / (2 eps)
        theta <- theta - lr (g z + wd theta)

    all in place, in three sweeps over the parameters (+eps, -2eps, restore-and-update), or two with
    ``fuse_next=True`` (the next step's +eps is fused into the update sweep). Memory is that of
    inference: no gradients, no optimizer state per parameter, no stored z.

    The variants of the paper (§2.2, Appendix B) are options; the defaults are the plain algorithm,
    bit for bit:

    - n-SPSA (``n_perturbations=n``): n perturbations z_j = z(step_seed(seed, t, j)), g_j from each,
      and ``theta <- theta - lr (1/n sum_j g_j z_j + wd theta)`` in one multi-term sweep; the closure
      is called 2n times (n + 1 one-sided). ``n`` may be a callable ``step -> n``
      (:func:`zotune.optim.variants.linear_n`).
    - one-sided (``estimator="one-sided"``): ``g_j = (L(theta + eps z_j) - L(theta)) / eps``, the
      unperturbed loss computed once per step and shared by the n perturbations.
    - ``distribution="sphere"``: z uniform on the sphere of radius sqrt(d), ``z = sqrt(d) x / ||x||``
      with x the Gaussian stream; ||x|| takes one extra pass (x regenerated, never stored).
    - layerwise (``layerwise="param-norm"``): tensor l is perturbed and updated along
      ``s_l z_l`` with ``s_l = ||theta_l|| / sqrt(d_l)`` taken at the start of the step, so the
      expected update is ``-lr diag(s_l^2) grad L``: a layer's step scales with its weights' size.
    - layerwise (``layerwise="grad-norm"``, the authors' Appendix B variant): at the first step (and
      every ``grad_norm_every`` steps) each layer l (a numbered block, or a tensor outside the
      blocks: :func:`zotune.optim.variants.layer_groups`) is probed on its own, two forward passes
      per probe, and ``c_l`` estimates its gradient norm; the steps then perturb layer l along
      ``z_l / c_l`` and update along ``c_l z_l``. The estimate stays unbiased; each layer's share of
      its variance is evened out (:func:`zotune.optim.variants.grad_norm_scales`).
    - momentum and Adam: the subclasses :class:`MeZOMomentum` and :class:`MeZOAdam`.

    Args:
        params: ``model.named_parameters()`` (recommended: the names key the perturbations, so z does
            not depend on order), an iterable of tensors, or parameter groups (dicts). Unnamed
            tensors are keyed by their position in the optimizer, so the order matters when replaying
            or resuming. Tensors with ``requires_grad=False`` are left out.
        lr: learning rate (the paper uses 1e-7 to 1e-6 for full-parameter tuning).
        eps: perturbation scale (the paper: 1e-3); one value for the whole optimizer.
        weight_decay: L2 penalty, applied in the update sweep. With a flat list of parameters it
            goes to tensors of rank >= 2 only (not to biases and normalisation weights).
        seed: the run's seed; step t perturbs with ``zotune.rng.step_seed(seed, t)``.
        distribution: ``"gaussian"`` (the paper), ``"gaussian-fast"`` (Gaussian from 16-bit uniforms: about half
            the instructions of a GPU sweep; :mod:`zotune.rng`), ``"rademacher"``, ``"sphere"``, or factors of each matrix:
            ``"lowrank"`` (LOZO), ``"subzero"`` (SubZero), ``"subspace"`` (ZO-Muon's: :class:`ZOMuon`); the
            registered kinds of :mod:`zotune.optim.directions`.
        fuse_next: fuse the next step's +eps perturbation into the update sweep. The parameters then
            carry that perturbation between steps: call :meth:`flush` (or use :meth:`unperturbed`,
            or :meth:`attach` to the model once) before evaluating or saving. ``state_dict`` flushes.
        stochastic_rounding: round bf16/fp16 parameters stochastically in the update sweep, so that
            updates below half an ulp survive in expectation (float32 parameters are unaffected).
        on_nonfinite: ``"raise"`` (:class:`NonFiniteLossError`) or ``"skip"`` (warn and go on) when a
            loss is NaN or infinite. Either way the perturbation is undone and nothing is updated.
        backend: the sweep implementation (``zotune.kernels.available()``); default: fastest per device.
        trajectory: a file to append each step's (seed, projected gradient, lr, ...) to, for
            :func:`zotune.replay`; see :mod:`zotune.trajectory`.
        n_perturbations: n of n-SPSA (1 to 100), or a callable ``step -> n``.
        estimator: ``"two-sided"`` (the paper's default), ``"one-sided"`` (needs ``fuse_next=False``:
            the unperturbed loss comes first), or another of :data:`zotune.optim.estimators.ESTIMATORS`
            (``"fzoo"``, ``"hizoo"``, ``"kerzoo"``: see :class:`FZOO`, :class:`HiZOO`, :class:`KerZOO`).
        layerwise: ``"none"``, ``"param-norm"`` or ``"grad-norm"`` (need ``fuse_next=False``: the scales
            are taken at the clean weights of each step).
        grad_norm_every: ``"grad-norm"``: re-estimate the layer norms every this many steps (0: once).
        grad_norm_probes: ``"grad-norm"``: probes per layer and estimate (c_l = sqrt(mean g_l^2)).
        lowrank_rank, lowrank_every: ``distribution="lowrank"`` (LOZO): the factors' rank, and the steps
            between draws of V.
        sparsity: Sparse-MeZO (Liu et al., arXiv 2402.15751): in (0, 1), each matrix is perturbed and
            updated only where ``|theta| <= h``, h its ``1 - sparsity`` magnitude quantile (u = m z, so
            ``theta -+ eps m z`` and ``theta <- theta - lr g m z``); vectors move as in MeZO. The mask is
            computed from the clean weights at the start of every step (replay computes the same one)
            and held for that step only, one bit a parameter
            (:func:`~zotune.optim.masked.magnitude_mask`). It is not recomputed from the perturbed
            weights, as "on the fly" in the forward pass would: an element near h could then cross it
            between the sweeps and not be restored. SGD rule, element-wise z, no layerwise,
            ``fuse_next=False``; on the CPU a numba pass per chunk does z, mask and update at once (a torch
            path elsewhere, no GPU kernel yet). 0: off.
        batched: take a step's evaluations in one batched forward over perturbed copies of the trainable
            tensors instead of one after another on the in-place weights (FZOO's batched form: all N + 1
            of its losses at once). ``step`` then needs a :class:`zotune.BatchedClosure`; the copies cost
            (evaluations per step) x the trainable parameters' memory, and as many batches' activations
            (:class:`zotune.optim.step.BatchedProbe`). The weights are never perturbed in place, so
            ``fuse_next=False``; the trajectory says so and replays it bit for bit. Any estimator.

    Example::

        opt = zotune.MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0)
        for batch in loader:
            loss = opt.step(lambda: model(**batch).loss)

        opt = zotune.MeZO(model.named_parameters(), lr=1e-6, n_perturbations=4, estimator="one-sided")

    Reference: Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023
    (arXiv 2305.17333), Algorithm 1. :mod:`zotune.optim.algorithm` is that algorithm in one page
    (z stored, nothing fused), and this class is tested against it step by step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        distribution: str = "gaussian",
        fuse_next: bool = False,
        stochastic_rounding: bool = False,
        on_nonfinite: str = "raise",
        backend: str | None = None,
        trajectory: str | os.PathLike | None = None,
        n_perturbations: int | Callable[[int], int] = 1,
        estimator: str = "two-sided",
        layerwise: str = "none",
        grad_norm_every: int = 0,
        grad_norm_probes: int = 1,
        lowrank_rank: int = 2,
        lowrank_every: int = 50,
        sparsity: float = 0.0,
        batched: bool = False,
    ):
        _check_options(
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            seed=seed,
            distribution=distribution,
            n_perturbations=n_perturbations,
            estimator=estimator,
            layerwise=layerwise,
            grad_norm_every=grad_norm_every,
            grad_norm_probes=grad_norm_probes,
            fuse_next=fuse_next,
            on_nonfinite=on_nonfinite,
            backend=backend,
        )
        super().__init__(_prepare_params(params, weight_decay), dict(lr=lr, weight_decay=weight_decay))
        self.eps = float(eps)
        self.fuse_next = bool(fuse_next)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.on_nonfinite = on_nonfinite
        self.backend = backend
        self.n_perturbations = n_perturbations
        self.estimator = estimator
        self._estimator = estimators.get(estimator)
        self.layerwise = layerwise
        self.grad_norm_every = grad_norm_every
        self.grad_norm_probes = grad_norm_probes
        self.lowrank_rank, self.lowrank_every = lowrank_rank, lowrank_every
        self.sparsity = sparsity
        self.batched = bool(batched)
        self._scales = scales.make_scales(layerwise, every=grad_norm_every, probes=grad_norm_probes)
        self.rule = self._make_rule()
        self._check_composition(distribution, layerwise)
        self.projected_grads: list[float] | None = None  # g_j of the last applied step
        # the estimator's extra scalars of the last applied step (HiZOO's kappa)
        self.last_extras: tuple[float, ...] = ()
        self.last_step_skipped = False  # the last step's loss (or estimate) was not finite: nothing was updated
        self.forward_passes: int | None = 0  # closure calls so far (None: resumed from a state that did not count)
        self.projected_grad: float | None = None  # g of the last applied step
        self.last_losses: tuple[float, float] | None = None  # (L+, L-) of the last step
        self._pending: int | None = None  # step whose +eps perturbation the parameters carry
        self._in_step = False
        self._setup(seed, distribution, trajectory)

    def _check_composition(self, distribution: str, layerwise: str) -> None:
        """The components that do not compose, each a ValueError saying what to use instead."""
        wanted = self._estimator.rule  # an estimator and a rule made for each other (HiZOO's) go only together
        if (wanted is not None and self.rule.name != wanted) or (
            wanted is None and getattr(self.rule, "estimator", None)
        ):
            raise ValueError(
                f"the {self.estimator} estimator and the {self.rule.name} update rule do not go together: "
                "use zotune.HiZOO for HiZOO, zotune.GRZO for GRZO"
            )
        kind = kinds.get(distribution)
        if not kind.elementwise and (
            layerwise != "none"
            or self.rule.name not in ("sgd", "momentum", "muon")
            or getattr(self.rule, "stored", False)
        ):
            raise ValueError(
                "low-rank directions work with the SGD rule and history momentum (and subspace ones with ZO-Muon's), "
                "without layerwise scaling (stored momentum, Adam and HiZOO draw element-wise z)"
            )
        wants = getattr(self.rule, "distribution", None)  # a rule made for one kind of direction (ZO-Muon's)
        if (wants is not None and distribution != wants) or (self.rule.name == "muon" and self.fuse_next):
            raise ValueError(
                f"the {self.rule.name} update rule needs distribution={wants!r} and fuse_next=False: use zotune.ZOMuon"
            )
        if not (
            isinstance(self.lowrank_rank, int)
            and self.lowrank_rank >= 1
            and isinstance(self.lowrank_every, int)
            and self.lowrank_every >= 1
        ):
            raise ValueError(
                f"Invalid lowrank_rank / lowrank_every: {self.lowrank_rank!r}, {self.lowrank_every!r} (integers >= 1)"
            )
        if not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise ValueError(f"Invalid sparsity: {self.sparsity!r} (the fraction of each matrix left still, in [0, 1))")
        if self.sparsity and (
            self.rule.name != "sgd" or not kind.elementwise or kind.sphere or layerwise != "none" or self.fuse_next
        ):
            raise ValueError(
                "sparse directions (Sparse-MeZO) work with the SGD rule, element-wise z, no layerwise "
                "scaling and fuse_next=False (each step's mask comes from its clean weights; momentum, Adam and "
                "HiZOO would need the masks of earlier steps or their own per-element state)"
            )
        if self.batched and self.fuse_next:
            raise ValueError(
                "batched=True evaluates copies and never perturbs the weights in place: pass fuse_next=False"
            )
        if self.rule.name == "hizoo" and (kind.sphere or not kind.elementwise or layerwise != "none"):
            raise ValueError(
                "HiZOO perturbs along s z with its own per-element scale: use distribution 'gaussian', "
                "'gaussian-fast' or 'rademacher' and no layerwise scaling"
            )

    # -- bookkeeping ---------------------------------------------------------------------------
    def _keys(self, group_index: int) -> list[int]:
        start = sum(len(g["params"]) for g in self.param_groups[:group_index])
        return [e["key"] for e in self._table[start : start + len(self.param_groups[group_index]["params"])]]

    def _header_options(self) -> dict:
        return {
            "fuse_next": self.fuse_next,
            "stochastic_rounding": self.stochastic_rounding,
            "named": "param_names" in self.param_groups[0],
            **self._variant_header(),
        }

    def fingerprint(self) -> dict:
        """:meth:`KeyedOptimizer.fingerprint`, with the variant (estimator, n, layerwise, momentum/Adam)."""
        return {**super().fingerprint(), "variant": self._variant_header()}

    def _variant_header(self) -> dict:
        """Header keys of the variants, only where they differ from plain MeZO (so its files are unchanged)."""
        out: dict = {}
        if self.estimator != "two-sided":
            out["estimator"] = self.estimator
        n = self.n_perturbations
        if callable(n) or n != 1:
            out["n_perturbations"] = getattr(n, "description", "callable") if callable(n) else n
        out.update(self._scales.header([e["name"] for e in self._table]))
        if not kinds.get(self.distribution).elementwise:
            out["lowrank"] = {"rank": self.lowrank_rank, "every": self.lowrank_every}
        if self.sparsity:
            out["sparsity"] = float(self.sparsity)
        if self.batched:
            out["batched"] = True
        if self.rule.header() is not None:
            out["variant"] = self.rule.header()
        return out

    def _make_rule(self):
        return variants.SGDRule()

    def _record(self, record) -> None:
        hyper = None
        if isinstance(record, (Step, Skip, MultiStep, LayerProbe, Extras)):  # eps and weight decay, when they change
            hyper = Hyper(functional.f32(self.eps), tuple(functional.f32(g["weight_decay"]) for g in self.param_groups))
        self._write(record, hyper)

    # -- the sweeps ---------------------------------------------------------------------------
    def _directions(self) -> Directions:
        """The run's perturbations over the current tensors (rebuilt when a parameter group is added)."""
        if getattr(self, "_dirs_table", None) is not self._table:
            self._dirs = Directions(
                *self._all(),
                self.seed,
                self.distribution,
                self.backend,
                lowrank_rank=self.lowrank_rank,
                lowrank_every=self.lowrank_every,
                sparsity=self.sparsity,
            )
            self._dirs_table = self._table
        self._dirs.seed0 = self.seed  # load_state_dict may change it
        elementwise = getattr(self.rule, "elementwise", None)  # a preconditioned rule (HiZOO): u = s z
        self._dirs.elementwise = None if elementwise is None else elementwise(self._dirs.params)
        return self._dirs

    def _plan(self, t: int, closure, eps: float) -> StepPlan:
        """Step t's description: n, the estimator, a pending fused perturbation and the layerwise scales."""
        n = self._n_at(t)
        factors, probe_factors = self._scales.for_step(self, t, closure, eps)
        return StepPlan(t, n, self._estimator, eps, self._pending is not None, factors, probe_factors)

    @property
    def layer_norms(self) -> list[float] | None:
        """``layerwise="grad-norm"``: the c_l per tensor once estimated (None before, and for the other choices)."""
        return getattr(self._scales, "norms", None)

    def _evaluator(self, closure):
        """``evaluate(k)`` for the step's description: the closure, with the pending perturbation consumed."""

        def evaluate(k: int):
            if self.forward_passes is not None:
                self.forward_passes += 1
            self._pending = None
            self._in_step = True
            return closure()

        return evaluate

    def _batched_evaluator(self, closure):
        """``evaluate_all(stacks)`` of a batched step: the closure's :meth:`~zotune.BatchedClosure.at`."""

        def evaluate_all(stacks):
            if self.forward_passes is not None:
                self.forward_passes += len(stacks[0])
            self._in_step = True
            return closure.at(self._directions().params, stacks)

        return evaluate_all

    def _n_at(self, step: int) -> int:
        n = self.n_perturbations
        n = _check_n(n(step), f"n_perturbations({step})") if callable(n) else n
        est = self._estimator
        if n < est.min_n or (est.max_n is not None and n > est.max_n):
            raise ValueError(
                f"the {est.name} estimator needs n_perturbations from {est.min_n} to "
                f"{est.max_n or variants.MAX_PERTURBATIONS}, got {n} at step {step}"
            )
        return n

    def _groups(self) -> list[variants.Group]:
        out, start = [], 0
        for i, g in enumerate(self.param_groups):
            index = list(range(start, start + len(g["params"])))
            out.append(
                variants.Group(
                    list(g["params"]), self._keys(i), index, functional.f32(g["lr"]), functional.f32(g["weight_decay"])
                )
            )
            start += len(g["params"])
        return out

    def flush(self) -> None:
        """Remove a pending perturbation (``fuse_next=True``) so the parameters are the trained ones."""
        if self._pending is None or self._in_step:
            return
        with torch.no_grad():
            self._directions().sweep(self._pending, [(0, -1.0)], functional.f32(self.eps))
        self._record(Flush(self._pending))
        self._pending = None

    @contextlib.contextmanager
    def unperturbed(self):
        """A context in which the parameters hold the trained values (flushes any pending perturbation)."""
        self.flush()
        yield self

    def attach(self, module: torch.nn.Module):
        """Flush automatically before ``module`` runs a forward outside a step or is saved.

        Only needed with ``fuse_next=True``. Returns the two hook handles (``.remove()`` detaches).
        """

        def hook(*args, **kwargs):
            self.flush()

        return module.register_forward_pre_hook(hook), module.register_state_dict_pre_hook(hook)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float]):  # type: ignore[override]
        """One step. ``closure()`` must return the loss of the current batch and do no backward.

        Returns the closure's first value, as the closure returned it: the loss at theta + eps z
        (two-sided), or at theta (one-sided, FZOO).
        """
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss (and does no backward)")
        t = self._step
        if self.batched and not callable(getattr(closure, "at", None)):
            raise TypeError(
                "MeZO(batched=True).step needs a closure that evaluates stacked weights: "
                "zotune.BatchedClosure(model, closure)"
            )
        plan = self._plan(t, closure, functional.f32(self.eps))
        probe = (BatchedProbe if self.batched else Probe)(plan, self._directions())
        try:
            probe.run(self._batched_evaluator(closure) if self.batched else self._evaluator(closure))
        except BaseException:
            self._in_step = False
            if probe.carry is not None:
                probe.undo()
                self._skip(plan, len(probe.losses) + 1)
            raise
        self._in_step = False
        grads, extras = (probe.estimate(), probe.extras()) if probe.complete else ([math.nan], ())
        if not all(math.isfinite(g) for g in (*grads, *extras)):
            return self._nonfinite(plan, probe)
        carry = probe.carry
        u = update_of(plan, self._directions(), grads, carry, fuse_next=self.fuse_next, extras=extras)
        groups = self._groups()
        self.rule.apply(
            groups,
            u,
            distribution=self._directions().zdist,
            rounding_seed=u.seeds[0] if self.stochastic_rounding else None,
            backend=self.backend,
        )
        lrs = tuple(g.lr for g in groups)
        self._record_scales(t, plan.scales)
        if extras:
            self._record(Extras(t, extras))
        self._record(Step(t, grads[0], lrs) if plan.n == 1 else MultiStep(t, tuple(grads), lrs))
        self._step = t + 1
        self.last_step_skipped = False
        self._pending = t + 1 if self.fuse_next else None
        self.projected_grads = grads
        self.last_extras = extras
        self.projected_grad = grads[0] if plan.n == 1 else float(sum(grads) / plan.n)
        self.last_losses = (probe.losses[0], probe.losses[1])
        return probe.first

    def _skip(self, plan: StepPlan, phase: int) -> None:
        """Record step ``plan.step`` as skipped at evaluation ``phase`` (its perturbation already undone)."""
        self._record_scales(plan.step, plan.scales)
        self._record(Skip(plan.step, phase))
        self._step += 1
        self.last_step_skipped = True

    def _nonfinite(self, plan: StepPlan, probe: Probe):
        """A non-finite loss or estimate: undo, record a skip, then raise or warn as ``on_nonfinite`` says."""
        phase = len(probe.losses)
        probe.undo()
        self._skip(plan, phase)
        where = plan.estimator.where(phase, plan.n)
        if math.isfinite(probe.losses[-1]):
            message = f"step {plan.step}: the losses give no finite estimate ({plan.estimator.name}: {probe.losses})"
        else:
            message = f"step {plan.step}: the loss at {where} is {probe.losses[-1]}"
        message += "; the perturbation was undone and the parameters were not updated"
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(message)
        import warnings

        warnings.warn(message + " (skipped)", RuntimeWarning, stacklevel=3)
        self.last_losses = (probe.losses[0], probe.losses[-1])
        return probe.first

    def _record_scales(self, t: int, scales) -> None:
        if scales is not None:
            self._record(LayerScales(t, tuple(scales)))

    # -- state --------------------------------------------------------------------------------
    def state_dict(self, *, flush: bool = True) -> dict:
        """The torch state plus MeZO's: step counter, seed, eps, options and the trajectory length.

        All of it is JSON-serialisable. By default a pending perturbation (``fuse_next``) is flushed
        first, so the state pairs with the model's clean weights. ``flush=False`` keeps it and records
        it instead: for a resume that rebuilds the weights with ``replay(..., finish=False)``, which
        then continues bit for bit as if never interrupted.
        """
        if flush:
            self.flush()
        state = super().state_dict()
        state["mezo"] = {
            "format": _STATE_FORMAT,
            **self._keyed_state(),
            "eps": self.eps,
            "fuse_next": self.fuse_next,
            "stochastic_rounding": self.stochastic_rounding,
            "pending": self._pending,
            "forward_passes": self.forward_passes,
            # the last hyper-parameters written to the trajectory, so a resumed file continues identically
            "written_hyper": None
            if self._written_hyper is None
            else [self._written_hyper.eps, list(self._written_hyper.weight_decays)],
        }
        variant_options = self._variant_header()
        if variant_options:  # only for the variants: plain MeZO's state is unchanged
            state["mezo"]["variants"] = variant_options
            state["mezo"]["rule"] = self.rule.state()
        state["mezo"].update(self._scales.state())  # grad-norm: its c_l and their step
        return state

    def moment_tensors(self) -> dict[str, torch.Tensor]:
        """Stored-state momentum/Adam: the float32 moments, as ``{"m.<i>": m_i, "v.<i>": v_i}`` (i: the
        tensor's index in the optimizer's table); empty for every other rule. Saved beside the state,
        they spare a resume the rebuild from the trajectory (``load_state_dict(..., moments=)``)."""
        rule = getattr(self, "rule", None)
        if rule is None or not rule.stored:
            return {}
        return {**{f"m.{i}": t for i, t in rule.m.items()}, **{f"v.{i}": t for i, t in rule.v.items()}}

    def _install_moments(self, moments: dict, count: int) -> bool:
        """Take saved moments if they are complete and fit the tensors; False (rebuild them) otherwise."""
        params = self._all()[0]
        names = ("m", "v") if self.rule.adam else ("m",)
        expected = {f"{k}.{i}" for k in names for i in range(len(params))} if count else set()
        if set(moments) != expected:
            return False
        parsed = [(name[0], int(name.split(".")[1]), t) for name, t in moments.items()]  # ("m" | "v", index, t)
        if any(tuple(t.shape) != tuple(params[i].shape) or t.dtype != torch.float32 for _, i, t in parsed):
            return False
        own = [(k, i, t.to(params[i].device, copy=True)) for k, i, t in parsed]  # not the caller's tensors
        self.rule.m = {i: t for k, i, t in own if k == "m"}
        self.rule.v = {i: t for k, i, t in own if k == "v"}
        return True

    def load_state_dict(self, state_dict: dict, *, moments: dict | None = None) -> None:
        """Continue a run: restores the step counter, seed and eps, and truncates the trajectory to match.

        The model's weights must be those that went with the state: clean weights for a flushed
        state, or the still-perturbed ones (``replay(..., finish=False)``) for ``flush=False``.
        ``moments``: the :meth:`moment_tensors` saved with this state (stored-state momentum/Adam);
        without them, or if they do not fit, the moments are rebuilt from the trajectory.
        """
        state_dict = dict(state_dict)
        mezo = state_dict.pop("mezo", None)
        if mezo is None or mezo.get("format") != _STATE_FORMAT:
            raise ValueError("not a MeZO optimizer state (no 'mezo' entry of a known format)")
        self._check_keyed_state(mezo)
        for option in ("fuse_next", "stochastic_rounding"):
            if mezo[option] != getattr(self, option):
                raise ValueError(
                    f"this optimizer state has {option}={mezo[option]!r}, the optimizer {getattr(self, option)!r}"
                )
        if mezo.get("variants", {}) != self._variant_header():
            raise ValueError(
                f"this optimizer state was saved with the variant options {mezo.get('variants', {})}, "
                f"the optimizer has {self._variant_header()}: build it with the same options"
            )
        super().load_state_dict(state_dict)
        self._restore_keyed_state(mezo)
        self.eps = float(mezo["eps"])
        if mezo.get("rule") is not None:
            self.rule.load(mezo["rule"])
            count = int(mezo["rule"]["count"])
            if self.rule.stored and not (moments is not None and self._install_moments(moments, count)):
                self._rebuild_moments(mezo["trajectory_bytes"], count)
        self._scales.load(mezo)
        self._pending = mezo.get("pending")
        self.forward_passes = mezo.get("forward_passes")
        written = mezo.get("written_hyper")
        self._written_hyper = (
            None if written is None or self._resume_at is None else Hyper(written[0], tuple(written[1]))
        )

    def _rebuild_moments(self, trajectory_bytes: int | None, count: int) -> None:
        """Stored-state momentum/Adam: recompute m (and v) from the trajectory's (seed, g) records.

        The moments depend only on the projected gradients, the seeds and the layer scales, all in
        the trajectory, so they are rebuilt exactly (the same float32 operations in the same order)
        without touching the weights.
        """
        from zotune.optim.replay import walk
        from zotune.trajectory import Trajectory, read_trajectory

        if count == 0:
            self.rule.m.clear(), self.rule.v.clear()
            return
        if self.trajectory_path is None or trajectory_bytes is None:
            raise ValueError(
                "resuming stored-state momentum/Adam rebuilds m and v from the trajectory: build the "
                "optimizer with trajectory= (the file of the run), or use state='history'"
            )
        traj: Trajectory = read_trajectory(self.trajectory_path, size=trajectory_bytes)  # as at the checkpoint
        rule = variants.make_rule(self.rule.header())
        walk(traj, self._all()[0], exact=False, finish=False, update=False, rule=rule, backend=self.backend)
        if rule.count != count:
            raise ValueError(
                f"the trajectory holds {rule.count} updates, the optimizer state {count}: "
                "they belong to different checkpoints"
            )
        self.rule.m, self.rule.v = rule.m, rule.v


class MeZOMomentum(MeZO):
    r"""MeZO with momentum on the zeroth-order estimates (paper §2.2, Appendix B).

    With ghat_k = 1/n sum_j g_{k,j} u_{k,j} the step-k estimate::

        m_t = beta m_{t-1} + (1 - beta) ghat_t = sum_{k <= t} (1 - beta) beta^(t-k) ghat_k
        theta <- (1 - lr wd) theta - lr m_t

    ``state="history"`` (the paper's memory-free form) keeps no tensor: m_t is recomputed in the
    update sweep from the (seed, g) of the last ``window`` applied steps, as one W*n-term sweep (each
    z regenerated). It drops the terms older than the window, whose total weight is beta^W (0.034 for
    beta=0.9, W=32): ``|m_t - m_t^hist| <= beta^W max_k |ghat_k|`` elementwise. With W >= the number
    of steps it equals the stored form up to float rounding. ``state="stored"`` keeps m (float32, one
    tensor per parameter) for those with the memory; a resume takes it from
    ``load_state_dict(..., moments=)`` (:meth:`moment_tensors` saved with the state) or rebuilds it
    from the trajectory.

    Args:
        params, lr, eps, weight_decay, seed: as :class:`MeZO`; further keywords go to :class:`MeZO`.
        beta: the moving average's decay.
        window: W, the applied steps the history form remembers (its cost: W*n z per element and update).
        state: ``"history"`` or ``"stored"``.

    Example::

        opt = zotune.MeZOMomentum(model.named_parameters(), lr=1e-6, beta=0.9, window=32)

    Reference: Malladi et al. 2023 (arXiv 2305.17333), §2.2 "MeZO extensions" and Appendix B.
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        beta: float = 0.9,
        window: int = 32,
        state: str = "history",
        **kwargs,
    ):
        _check_rule_args(beta=beta, window=window, state=state)
        self._rule_args = dict(beta1=float(beta), beta2=0.0, window=int(window), stored=state == "stored")
        super().__init__(params, lr, eps, weight_decay, seed, **kwargs)

    def _make_rule(self):
        return variants.MomentumRule(**self._rule_args)


class MeZOAdam(MeZO):
    r"""MeZO with Adam on the zeroth-order estimates (paper §2.2, Appendix B).

    With ghat_k = 1/n sum_j g_{k,j} u_{k,j} and c the number of updates applied so far::

        m_t = beta1 m_{t-1} + (1 - beta1) ghat_t,    v_t = beta2 v_{t-1} + (1 - beta2) ghat_t**2
        theta <- (1 - lr wd) theta - lr (m_t / (1 - beta1^c)) / (sqrt(v_t / (1 - beta2^c)) + adam_eps)

    ``state="history"`` recomputes m and v elementwise, per chunk, from the W regenerated
    estimates of the last ``window`` applied steps (W*n z per element and update); it drops the
    terms older than the window, weight beta1^W of m and beta2^W of v (the bias corrections are
    not adjusted). v forgets slowly (beta2^W = 0.97 for 0.999 and W=32): with a short window use a
    smaller beta2, or ``state="stored"``, which keeps m and v (two float32 tensors per parameter,
    rebuilt from the trajectory on resume). With W >= the number of steps both forms agree up to
    float rounding.

    Args:
        params, lr, eps, weight_decay, seed: as :class:`MeZO`; further keywords go to :class:`MeZO`.
        betas: (beta1, beta2).
        adam_eps: the denominator's guard.
        window: W of the history form.
        state: ``"history"`` or ``"stored"``.

    Example::

        opt = zotune.MeZOAdam(model.named_parameters(), lr=1e-4, betas=(0.9, 0.99), state="stored")

    Reference: Malladi et al. 2023 (arXiv 2305.17333), §2.2 and Appendix B.
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        window: int = 32,
        state: str = "history",
        **kwargs,
    ):
        _check_rule_args(beta=betas[0], beta2=betas[1], window=window, state=state, names=("betas[0]", "betas[1]"))
        if not (adam_eps > 0 and math.isfinite(adam_eps)):
            raise ValueError(f"Invalid adam_eps: {adam_eps} (must be a finite number > 0)")
        self._rule_args = dict(
            beta1=float(betas[0]),
            beta2=float(betas[1]),
            window=int(window),
            stored=state == "stored",
            adam_eps=float(adam_eps),
        )
        super().__init__(params, lr, eps, weight_decay, seed, **kwargs)

    def _make_rule(self):
        return variants.AdamRule(**self._rule_args)


class FZOO(MeZO):
    r"""FZOO (Dang et al., "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models towards
    Adam-Scale Speed", arXiv 2506.09034, Algorithm 1): N Rademacher directions, the unperturbed loss once,
    and a step normalized by the spread of the perturbed losses::

        l_0 = L(theta),  l_i = L(theta + eps u_i),  sigma = std(l_1 .. l_N)
        theta <- theta - lr / (eps N sigma) sum_i (l_i - l_0) u_i

    :class:`MeZO` with ``estimator="fzoo"`` (:class:`zotune.optim.estimators.FZOO`),
    ``distribution="rademacher"`` and ``n_perturbations=8`` by default: N + 1 forward passes a step, run
    one after another on the in-place weights, so memory is that of inference, as MeZO's (``batched=True``:
    as the paper, in one batched forward over N + 1 perturbed copies, for accelerators); the trajectory
    records the N normalized coefficients per step (4N + 9 bytes, and 4 per parameter group) and replays bit for bit. Every other
    option of :class:`MeZO` applies (``fuse_next`` does not: each step starts from its clean weights).
    The learning rate is not MeZO's: the step per element is about ``lr / (eps sqrt(N))``.

    Example::

        opt = zotune.FZOO(model.named_parameters(), lr=1e-6, eps=1e-3)
        for batch in loader:
            opt.step(lambda: model(**batch).loss)
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        n_perturbations: int | Callable[[int], int] = 8,
        distribution: str = "rademacher",
        **kwargs,
    ):
        if "estimator" in kwargs:
            raise TypeError("FZOO sets estimator='fzoo'; use zotune.MeZO for another estimator")
        super().__init__(
            params,
            lr,
            eps,
            weight_decay,
            seed,
            estimator="fzoo",
            n_perturbations=n_perturbations,
            distribution=distribution,
            **kwargs,
        )


class HiZOO(MeZO):
    r"""HiZOO (Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order
    Optimizer", arXiv 2402.15173, Algorithm 1): MeZO preconditioned by a diagonal estimated from the
    same forward passes. Each step, with s the diagonal's square root (ones at the start)::

        l_0 = L(theta),  l+- = L(theta +- eps s z)                  (three forward passes)
        c = (l+ - l-) / (2 eps),  kappa = |l+ + l- - 2 l_0| / (2 eps^2)
        s^2 <- (1 - alpha) s^2 + alpha kappa z^2 / s^2
        theta <- (1 - lr wd) theta - lr c s z

    in the form of the authors' released code (their diagonal is s^2; the update uses the new s).
    ``alpha`` is their "Hessian smooth" (1e-10 for full-parameter OPT-13B, 1e-6 for LoRA): kappa is of the
    order of the trace of the Hessian, so alpha kappa is what moves s; kappa was 1e2-2e3 on SmolLM2-135M
    (SST-2, eps 1e-3), where the default 1e-6 moves s by 1e-4-2e-3 a step. Memory: one float32 tensor per
    trainable parameter (s) beyond inference's, 4 bytes a parameter: an opt-in. The trajectory records
    c and kappa per step (``"S"`` and ``"K"`` records), from which replay and a resume rebuild s exactly.
    The probe and update sweeps are chunked torch over z drawn by the backend (no fused kernel yet).

    Example::

        opt = zotune.HiZOO(model.named_parameters(), lr=1e-6, eps=1e-3, alpha=1e-6)
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        alpha: float = 1e-6,
        **kwargs,
    ):
        if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise ValueError(f"Invalid alpha: {alpha} (must be in [0, 1])")
        for fixed in ("estimator", "n_perturbations"):
            if fixed in kwargs:
                raise TypeError(f"HiZOO sets {fixed} itself (one direction, three evaluations a step)")
        self._alpha = float(alpha)
        super().__init__(params, lr, eps, weight_decay, seed, estimator="hizoo", **kwargs)

    def _make_rule(self):
        return variants.HiZOORule(self._alpha)


class KerZOO(MeZO):
    r"""KerZOO (Mi et al., "KerZOO: Kernel Function Informed Zeroth-Order Optimization for Accurate and
    Accelerated LLM Fine-Tuning", arXiv 2505.18886): MeZO's two-sided step with each direction probed at
    a random multiple r of eps and its difference weighted by a kernel K(r)::

        r ~ U(-1, 1) (keyed: zotune.rng.radius of the direction's seed)
        c = K(r) (L(theta + eps r z) - L(theta - eps r z)) / (2 eps),   theta <- theta - lr c z

    ``kernel="cubic"`` (K(r) = 15 r (5 - 7 r^2) / 4) keeps the gradient term's mean and cancels the eps^2
    bias of the two-sided difference; ``"linear"`` (K(r) = 3 r) only keeps the mean. The rates are on
    MeZO's scale, but a step is noisier (:class:`zotune.optim.estimators.KerZOO`). :class:`MeZO` with
    ``estimator="kerzoo"`` (``"kerzoo-linear"``): two forward passes a step, inference's memory, the
    same trajectory as MeZO's (r is derived from the seed, not stored), bit-exact replay. ``fuse_next``
    is not offered.

    Example::

        opt = zotune.KerZOO(model.named_parameters(), lr=2e-5, eps=1e-3)
    """

    KERNELS = {"cubic": "kerzoo", "linear": "kerzoo-linear"}

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        kernel: str = "cubic",
        **kwargs,
    ):
        if kernel not in self.KERNELS:
            raise ValueError(f"Invalid kernel: {kernel!r} (choose one of {', '.join(self.KERNELS)})")
        if "estimator" in kwargs:
            raise TypeError("KerZOO sets its estimator from kernel=; use zotune.MeZO for another estimator")
        super().__init__(params, lr, eps, weight_decay, seed, estimator=self.KERNELS[kernel], **kwargs)


class ZOMuon(MeZO):
    r"""ZO-Muon (Lang et al., "Powering Up Zeroth-Order Training via Subspace Gradient Orthogonalization",
    arXiv 2602.17155): zeroth-order estimates in a random subspace of each matrix, orthogonalized as Muon does::

        u_i = P Psi_i     (P: m x r orthonormal, redrawn every ``lowrank_every`` steps; Psi_i: r x n Gaussian)
        c_i = the estimator's coefficient along u_i    (two-sided: (L(theta + eps u_i) - L(theta - eps u_i)) / 2 eps)
        G = 1/N sum_i c_i Psi_i,   theta <- theta - lr P msign(G)

    :class:`MeZO` with ``distribution="subspace"`` and the ``"muon"`` update rule
    (:class:`zotune.optim.variants.MuonRule`); N = ``n_perturbations`` queries (2N forward passes two-sided,
    N + 1 one-sided). Only 2-D weight matrices move; biases and norms stay as they are. Memory: inference's,
    plus P and G of one matrix at a time during the update ((m + n) r floats). msign is the exact polar factor
    of the r x n estimate (an SVD; the paper approximates it by Newton-Schulz iterations). The trajectory is
    MeZO's (seeds and c_i); replay rebuilds each update bit for bit on the same backend (the QR and the SVD
    run in float64 through the backend's LAPACK). Each update has the same size whatever the losses (the
    singular values of msign are 1): its rate is not MeZO's.

    Example::

        opt = zotune.ZOMuon(model.named_parameters(), lr=1e-3, eps=1e-2, n_perturbations=4, lowrank_rank=8)
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        n_perturbations: int | Callable[[int], int] = 4,
        lowrank_rank: int = 8,
        lowrank_every: int = 50,
        **kwargs,
    ):
        if kwargs.get("distribution", "subspace") != "subspace":
            raise TypeError("ZOMuon sets distribution='subspace'; use zotune.MeZO for another distribution")
        kwargs.pop("distribution", None)
        super().__init__(
            params,
            lr,
            eps,
            weight_decay,
            seed,
            distribution="subspace",
            n_perturbations=n_perturbations,
            lowrank_rank=lowrank_rank,
            lowrank_every=lowrank_every,
            **kwargs,
        )

    def _make_rule(self):
        return variants.MuonRule()


def _check_rule_args(
    *, beta: float, window: int, state: str, beta2: float = 0.5, names: tuple[str, str] = ("beta", "beta2")
) -> None:
    for name, b in zip(names, (beta, beta2)):
        if not (isinstance(b, (int, float)) and 0 <= b < 1):
            raise ValueError(f"Invalid {name}: {b} (must be in [0, 1))")
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"Invalid window: {window!r} (must be an integer >= 1)")
    if state not in ("history", "stored"):
        raise ValueError(f"Invalid state: {state!r} (choose 'history' or 'stored')")
