"""MeZO: memory-efficient zeroth-order SGD as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable

import torch

from zotune import kernels, rng
from zotune.optim import functional as F
from zotune.trajectory import Flush, Hyper, Skip, Step, TrajectoryWriter

__all__ = ["MeZO", "NonFiniteLossError"]

_STATE_FORMAT = 1


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or infinity; the parameters were restored and not updated."""


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
    # Weight decay on matrices only: biases and normalisation weights are the tensors of rank < 2.
    decay = [p for p in trainable if _tensor(p).ndim >= 2]
    no_decay = [p for p in trainable if _tensor(p).ndim < 2]
    groups = [{"params": decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _as_list(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _tensor(p) -> torch.Tensor:
    return p[1] if isinstance(p, tuple) else p


def _trainable(p) -> bool:
    return _tensor(p).requires_grad


class MeZO(torch.optim.Optimizer):
    r"""Zeroth-order SGD with in-place, regenerated perturbations (MeZO).

    Each step samples a seed s_t, and with z = z(s_t) regenerated from the keyed generator
    (never stored)::

        L+ = L(theta + eps z),   L- = L(theta - eps z),   g = (L+ - L-) / (2 eps)
        theta <- theta - lr (g z + wd theta)

    all in place, in three sweeps over the parameters (+eps, -2eps, restore-and-update), or two with
    ``fuse_next=True`` (the next step's +eps is fused into the update sweep). Memory is that of
    inference: no gradients, no optimizer state per parameter, no stored z.

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
        distribution: ``"gaussian"`` (the paper) or ``"rademacher"``.
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

    Example::

        opt = zotune.MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0)
        for batch in loader:
            loss = opt.step(lambda: model(**batch).loss)

    Reference: Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023
    (arXiv 2305.17333), Algorithm 1.
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
    ):
        if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"Invalid learning rate: {lr} (must be a finite number >= 0)")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"Invalid eps: {eps} (must be a finite number > 0)")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be a finite number >= 0)")
        if not (isinstance(seed, int) and 0 <= seed < 2**64):
            raise ValueError(f"Invalid seed: {seed!r} (must be an integer in [0, 2**64))")
        if distribution not in rng.DISTRIBUTIONS:
            raise ValueError(f"Invalid distribution: {distribution!r} (choose one of {', '.join(rng.DISTRIBUTIONS)})")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (choose 'raise' or 'skip')")
        if backend is not None:
            kernels.get(backend)
        super().__init__(_prepare_params(params, weight_decay), dict(lr=lr, weight_decay=weight_decay))
        self.eps = float(eps)
        self.seed = seed
        self.distribution = distribution
        self.fuse_next = bool(fuse_next)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.on_nonfinite = on_nonfinite
        self.backend = backend
        self.trajectory_path = None if trajectory is None else os.fspath(trajectory)
        self.projected_grad: float | None = None  # g of the last applied step
        self.last_losses: tuple[float, float] | None = None  # (L+, L-) of the last step
        self._step = 0
        self._pending: int | None = None  # step whose +eps perturbation the parameters carry
        self._in_step = False
        self._writer: TrajectoryWriter | None = None
        self._resume_at: int | None = None
        self._written_hyper: Hyper | None = None
        self._table = self._param_table()

    # -- bookkeeping ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_writer", None) is not None:
            raise RuntimeError("cannot add parameters to a MeZO optimizer that is writing a trajectory")
        super().add_param_group(param_group)
        if hasattr(self, "_table"):
            self._table = self._param_table()

    def _param_table(self) -> list[dict]:
        named = ["param_names" in g for g in self.param_groups]
        if any(named) and not all(named):
            raise ValueError("give names for all parameter groups (named_parameters()) or for none")
        table, index = [], 0
        for g in self.param_groups:
            for i, p in enumerate(g["params"]):
                name = g["param_names"][i] if "param_names" in g else str(index)
                table.append({"name": name, "key": rng.param_key(name), "shape": list(p.shape),
                              "dtype": str(p.dtype).removeprefix("torch.")})
                index += 1
        seen: dict[int, str] = {}
        for entry in table:
            if entry["key"] in seen:
                raise ValueError(f"parameters {seen[entry['key']]!r} and {entry['name']!r} have the same key: "
                                 "give every parameter a distinct name")
            seen[entry["key"]] = entry["name"]
        return table

    def _keys(self, group_index: int) -> list[int]:
        start = sum(len(g["params"]) for g in self.param_groups[:group_index])
        return [e["key"] for e in self._table[start : start + len(self.param_groups[group_index]["params"])]]

    def _all(self) -> tuple[list[torch.Tensor], list[int]]:
        return [p for g in self.param_groups for p in g["params"]], [e["key"] for e in self._table]

    def _header(self) -> dict:
        from zotune import __version__

        offsets = [0]
        for g in self.param_groups:
            offsets.append(offsets[-1] + len(g["params"]))
        return {
            "format": "zotune-trajectory",
            "zotune_version": __version__,
            "seed": self.seed,
            "distribution": self.distribution,
            "fuse_next": self.fuse_next,
            "stochastic_rounding": self.stochastic_rounding,
            "named": "param_names" in self.param_groups[0],
            "first_step": self._step,
            "params": [{**e, "key": f"{e['key']:016x}"} for e in self._table],
            "groups": [list(range(a, b)) for a, b in zip(offsets, offsets[1:])],
        }

    def _record(self, record) -> None:
        if self.trajectory_path is None:
            return
        if self._writer is None:
            self._writer = TrajectoryWriter(self.trajectory_path, self._header(), resume_at=self._resume_at)
        if isinstance(record, (Step, Skip)):
            hyper = Hyper(F.f32(self.eps), tuple(F.f32(g["weight_decay"]) for g in self.param_groups))
            if hyper != self._written_hyper:
                self._writer.append(hyper)
                self._written_hyper = hyper
        self._writer.append(record)

    # -- the sweeps ---------------------------------------------------------------------------
    def _perturb(self, step: int, coefficient: float) -> None:
        F.perturb_(*self._all(), rng.step_seed(self.seed, step), coefficient,
                   distribution=self.distribution, backend=self.backend)

    def flush(self) -> None:
        """Remove a pending perturbation (``fuse_next=True``) so the parameters are the trained ones."""
        if self._pending is None or self._in_step:
            return
        with torch.no_grad():
            self._perturb(self._pending, -F.f32(self.eps))
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

    @property
    def step_count(self) -> int:
        """Steps taken so far (applied or skipped): the next step is perturbed with step_seed(seed, step_count)."""
        return self._step

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float]):  # type: ignore[override]
        """One MeZO step. ``closure()`` must return the loss of the current batch and do no backward.

        Returns the loss at theta + eps z (the closure's first value), as the closure returned it.
        """
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss (and does no backward)")
        t = self._step
        eps = F.f32(self.eps)
        offset = 0.0  # the multiple of z_t the parameters currently carry, to undo on any failure
        losses = []
        try:
            if self._pending is None:
                self._perturb(t, eps)
            self._pending = None
            offset = eps
            self._in_step = True
            first = closure()
            losses.append(float(first))
            if math.isfinite(losses[0]):
                self._perturb(t, -2 * eps)
                offset = -eps
                losses.append(float(closure()))
        except BaseException:
            self._in_step = False
            if offset:
                self._perturb(t, -offset)
                self._record(Skip(t, 1 if offset > 0 else 2))
                self._step += 1
            raise
        self._in_step = False
        g = F.f32((losses[0] - losses[-1]) / (2 * eps)) if len(losses) == 2 else math.nan
        if not math.isfinite(g):
            self._perturb(t, -offset)
            phase = 1 if offset > 0 else 2
            self._record(Skip(t, phase))
            self._step += 1
            which = "theta + eps*z" if phase == 1 else "theta - eps*z"
            message = (f"step {t}: the loss at {which} is {losses[-1]}; the perturbation was undone "
                       "and the parameters were not updated")
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(message)
            import warnings

            warnings.warn(message + " (skipped)", RuntimeWarning, stacklevel=2)
            self.last_losses = (losses[0], losses[-1])
            return first
        seed = rng.step_seed(self.seed, t)
        next_terms = [(rng.step_seed(self.seed, t + 1), eps)] if self.fuse_next else []
        lrs = []
        for i, group in enumerate(self.param_groups):
            lr, wd = F.f32(group["lr"]), F.f32(group["weight_decay"])
            scale, coef = F.update_coefficients(lr, wd, eps, g)
            F.sweep_(group["params"], self._keys(i), [(seed, coef), *next_terms], scale=scale,
                     distribution=self.distribution, rounding_seed=seed if self.stochastic_rounding else None,
                     backend=self.backend)
            lrs.append(lr)
        self._record(Step(t, g, tuple(lrs)))
        self._step = t + 1
        self._pending = t + 1 if self.fuse_next else None
        self.projected_grad = g
        self.last_losses = (losses[0], losses[1])
        return first

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
            "step": self._step,
            "seed": self.seed,
            "eps": self.eps,
            "distribution": self.distribution,
            "fuse_next": self.fuse_next,
            "stochastic_rounding": self.stochastic_rounding,
            "params": [e["name"] for e in self._table],
            "trajectory_bytes": None if self._writer is None else self._writer.tell(),
            "pending": self._pending,
            # the last hyper-parameters written to the trajectory, so a resumed file continues identically
            "written_hyper": None if self._written_hyper is None else
            [self._written_hyper.eps, list(self._written_hyper.weight_decays)],
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue a run: restores the step counter, seed and eps, and truncates the trajectory to match.

        The model's weights must be those that went with the state: clean weights for a flushed
        state, or the still-perturbed ones (``replay(..., finish=False)``) for ``flush=False``.
        """
        state_dict = dict(state_dict)
        mezo = state_dict.pop("mezo", None)
        if mezo is None or mezo.get("format") != _STATE_FORMAT:
            raise ValueError("not a MeZO optimizer state (no 'mezo' entry of a known format)")
        names = [e["name"] for e in self._table]
        if mezo["params"] != names:
            raise ValueError("this optimizer state was saved for other parameters "
                             f"({len(mezo['params'])} recorded, {len(names)} here, or different names)")
        for option in ("distribution", "fuse_next", "stochastic_rounding"):
            if mezo[option] != getattr(self, option):
                raise ValueError(f"this optimizer state has {option}={mezo[option]!r}, "
                                 f"the optimizer {getattr(self, option)!r}")
        super().load_state_dict(state_dict)
        self._step, self.seed, self.eps = int(mezo["step"]), int(mezo["seed"]), float(mezo["eps"])
        self._pending = mezo.get("pending")
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._resume_at = mezo["trajectory_bytes"]
        written = mezo.get("written_hyper")
        self._written_hyper = None if written is None or self._resume_at is None else Hyper(written[0], tuple(written[1]))
