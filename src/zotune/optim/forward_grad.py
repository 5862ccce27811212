"""The forward-gradient estimator (MeZO paper, Appendix D): g = z^T grad L, exact, from one forward pass.

A comparison point for MeZO. Both move the parameters along the same random direction z; MeZO
estimates the directional derivative by a finite difference of two losses, this optimizer computes
it exactly with forward-mode automatic differentiation (``torch.func.jvp``: one forward pass in dual
numbers). The price is memory: z must exist as a tensor (a tangent for every trainable parameter),
and every activation carries its tangent through the forward pass.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch

from zotune import kernels, rng
from zotune.optim import functional
from zotune.optim.groups import decay_groups
from zotune.optim.keyed import KeyedOptimizer, check_arguments
from zotune.optim.mezo import NonFiniteLossError
from zotune.trajectory import Hyper, Skip, Step

__all__ = ["ForwardGradient"]

_STATE_FORMAT = 1
_ESTIMATOR = "forward-gradient"  # the trajectory header's "estimator": replay applies one sweep per step


def _named(items, where: str) -> list[tuple[str, torch.Tensor]]:
    items = [items] if isinstance(items, torch.Tensor) else list(items)
    for item in items:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            raise ValueError(
                f"ForwardGradient needs named parameters in {where}: pass model.named_parameters() "
                "(the names key z and are the keys of the dict the loss function receives)"
            )
    return [(n, p) for n, p in items if p.requires_grad]


def _prepare_params(params, weight_decay: float) -> list:
    """Named, trainable tensors only; a flat list is split into decay / no-decay groups by tensor rank."""
    params = list(params)
    if not params:
        raise ValueError("ForwardGradient got an empty parameter list")
    if isinstance(params[0], dict):
        groups = []
        for i, group in enumerate(params):
            group = dict(group)
            group["params"] = _named(group["params"], f"parameter group {i}")
            groups.append(group)
        if not any(g["params"] for g in groups):
            raise ValueError("ForwardGradient got no trainable parameter (all have requires_grad=False)")
        return groups
    trainable = _named(params, "params")
    if not trainable:
        raise ValueError("ForwardGradient got no trainable parameter (all have requires_grad=False)")
    if weight_decay == 0.0:
        return trainable
    return decay_groups(trainable)  # weight decay on matrices only, as MeZO


class _Closure(torch.nn.Module):
    """Holds a model and a zero-argument closure, so ``functional_call`` can run the closure with
    the model's parameters swapped for other tensors (the dual ones)."""

    def __init__(self, model: torch.nn.Module, closure: Callable[[], torch.Tensor]):
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self):
        return self.closure()


class ForwardGradient(KeyedOptimizer):
    r"""SGD with the forward gradient: the exact directional derivative along MeZO's z (Appendix D).

    Step t uses the z that :class:`zotune.MeZO` with the same seed uses at step t (parameter key
    ``rng.param_key(name)``, step seed ``rng.step_seed(seed, t)``)::

        g     = z^T grad L(theta)            (torch.func.jvp: one forward pass with tangents z)
        theta <- (1 - lr wd) theta - lr g z  (zotune.optim.functional.sweep_: z regenerated, in place)

    E[g z] = grad L for z with identity covariance, so this is an unbiased estimate of the gradient,
    whereas MeZO's g = (L(theta + eps z) - L(theta - eps z)) / (2 eps) approximates the same g to
    O(eps^2). The trajectory it writes (``trajectory=``) is MeZO's format with ``eps`` recorded as 0
    and the header field ``"estimator": "forward-gradient"``; :func:`zotune.replay` rebuilds the
    weights bit for bit (with ``exact=False``, one sweep per step; with eps = 0 the default
    ``exact=True`` sweeps reduce to the same arithmetic).

    Memory: the tangents are a second copy of the trainable parameters, and every activation of the
    forward pass carries a tangent of its own size (forward-mode AD keeps nothing for a backward
    pass, so activations are still freed as the forward proceeds). Measured on a 34M-parameter random
    Llama, float32, on a 2-core CPU (``benchmarks/forward_grad_memory.py``, results in
    ``benchmarks/RESULTS.md``), weights + peak working memory relative to no-grad inference:

        ================  ==================  ==================
        tokens            batch 2 x 128       batch 8 x 512
        ================  ==================  ==================
        MeZO              1.00x               1.00x
        forward gradient  2.05x               2.24x
        backprop (SGD)    1.69x               3.61x
        ================  ==================  ==================

    About two forward passes' worth, as the paper says: at short sequences the copy of the weights
    dominates (and backprop, whose gradients replace the activations it frees, can use less); at
    long ones the dual activations do (working memory 2.7x inference's, the tangents' 130 MiB included).

    Attention: ``scaled_dot_product_attention``'s fused kernels have no forward-mode derivative, so
    the step runs the loss under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (the unfused
    math kernel, whose memory grows with the square of the sequence length).

    Args:
        params: ``model.named_parameters()``, or parameter groups (dicts) whose ``"params"`` are
            (name, tensor) pairs. Names are required: they key z and are the keys of the dict that
            the loss function receives. Tensors with ``requires_grad=False`` are left out.
        lr: learning rate. The estimate has the scale of MeZO's, so MeZO's learning rates apply.
        weight_decay: L2 penalty, applied in the update sweep; with a flat list of parameters it
            goes to tensors of rank >= 2 only (not to biases and normalisation weights).
        seed: the run's seed; step t draws z from ``zotune.rng.step_seed(seed, t)``.
        distribution: ``"gaussian"`` (the paper), ``"gaussian-fast"`` or ``"rademacher"``.
        on_nonfinite: ``"raise"`` (:class:`zotune.NonFiniteLossError`) or ``"skip"`` (warn and go on)
            when the loss or g is NaN or infinite; either way the parameters are not changed.
        backend: the sweep implementation (``zotune.kernels.available()``); default: fastest per device.
        trajectory: a file to append each step's (projected gradient, lr) to, for :func:`zotune.replay`.

    Example::

        opt = ForwardGradient(model.named_parameters(), lr=1e-6, seed=0)
        for batch in loader:
            # the closure you would give MeZO, run with the model's parameters made dual:
            loss = opt.step(lambda: model(**batch).loss, model=model)
            # or a function of the parameters, evaluated with torch.func.functional_call:
            loss = opt.step(lambda params: torch.func.functional_call(model, params, (), batch).loss)

    Reference: Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023
    (arXiv 2305.17333), Appendix D; Baydin et al., "Gradients without Backpropagation" (2022).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        distribution: str = "gaussian",
        on_nonfinite: str = "raise",
        backend: str | None = None,
        trajectory: str | os.PathLike | None = None,
    ):
        check_arguments(lr=lr, weight_decay=weight_decay, seed=seed, on_nonfinite=on_nonfinite, backend=backend)
        if distribution not in rng.DISTRIBUTIONS:
            raise ValueError(f"Invalid distribution: {distribution!r} (choose one of {', '.join(rng.DISTRIBUTIONS)})")
        super().__init__(_prepare_params(params, weight_decay), dict(lr=lr, weight_decay=weight_decay))
        self.on_nonfinite = on_nonfinite
        self.backend = backend
        self.projected_grad: float | None = None  # g of the last applied step
        self.last_loss: float | None = None
        self._setup(seed, distribution, trajectory)

    # -- bookkeeping ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if "param_names" not in param_group and getattr(self, "_writer", None) is None:
            param_group = dict(param_group)
            param_group["params"] = _named(param_group["params"], "the added parameter group")
        super().add_param_group(param_group)

    def _header_options(self) -> dict:
        return {"estimator": _ESTIMATOR, "fuse_next": False, "stochastic_rounding": False, "named": True}

    def _record(self, record) -> None:
        # eps = 0: there is no perturbation to undo, and replay's perturb sweeps become no-ops
        self._write(record, Hyper(0.0, tuple(functional.f32(g["weight_decay"]) for g in self.param_groups)))

    # -- the step -------------------------------------------------------------------------------
    def tangents(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """z of step ``step`` (default: the next one) as tensors shaped and typed like the parameters.

        This is the memory the method costs: one more copy of the trainable parameters. For bf16 /
        fp16 parameters z is rounded to their dtype here, so g is the derivative along the rounded z
        while the update sweep adds the float32 z (a relative difference of the order of 2**-8).
        """
        seed = rng.step_seed(self.seed, self._step if step is None else step)
        out = {}
        for g in self.param_groups:
            for name, p in zip(g["param_names"], g["params"]):
                be = kernels.select(p.device, self.backend)
                z = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                flat = z.view(-1)
                # the backends fill float32; other dtypes go through one float32 chunk, rounded to nearest
                buf = (
                    None
                    if p.dtype == torch.float32
                    else torch.empty(min(be.chunk, flat.numel()), dtype=torch.float32, device=p.device)
                )
                for start in range(0, flat.numel(), be.chunk):
                    part = flat[start : start + be.chunk]
                    work = part if buf is None else buf[: part.numel()]
                    be.fill(work, self.distribution, seed, rng.param_key(name), start)
                    if buf is not None:
                        part.copy_(work)
                out[name] = z
        return out

    def _loss_fn(self, closure, model):
        if model is None:
            return closure
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        own = dict(model.named_parameters(remove_duplicate=False))
        for g in self.param_groups:
            for name, p in zip(g["param_names"], g["params"]):
                if own.get(name) is not p:
                    raise ValueError(
                        f"the optimizer's parameter {name!r} is not the model's parameter of that name: "
                        "build the optimizer from this model's named_parameters()"
                    )
        wrapper = _Closure(model, closure)
        return lambda params: torch.func.functional_call(wrapper, {f"model.{n}": t for n, t in params.items()}, ())

    @torch.no_grad()
    def step(self, closure: Callable, *, model: torch.nn.Module | None = None):  # type: ignore[override]
        """One forward-gradient step; returns the loss at the current parameters (a detached tensor).

        Args:
            closure: without ``model``: ``closure(params) -> loss`` where ``params`` maps each of the
                optimizer's parameter names to the tensor to compute with (pass it to
                ``torch.func.functional_call``). With ``model``: the zero-argument closure you would
                give MeZO (``lambda: model(**batch).loss``), run with ``model``'s parameters replaced.
                Either way the loss is a scalar tensor and no backward is done.
            model: the module whose ``named_parameters()`` the optimizer was built from.
        """
        if closure is None:
            raise ValueError("ForwardGradient.step needs a closure that returns the loss")
        loss_fn = self._loss_fn(closure, model)
        names = [n for g in self.param_groups for n in g["param_names"]]
        primals = tuple(p.detach() for g in self.param_groups for p in g["params"])
        t = self._step
        tangents = self.tangents(t)

        def f(*tensors):
            loss = loss_fn(dict(zip(names, tensors)))
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise ValueError(
                    f"the closure must return the loss as a scalar tensor, got {type(loss).__name__}"
                    + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                )
            return loss.reshape(())

        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no forward-mode derivative
            loss, jvp = torch.func.jvp(f, primals, tuple(tangents[n] for n in names))
        del tangents  # the update regenerates z chunk by chunk: the copy is not needed any more
        self.last_loss = float(loss)
        g = functional.f32(float(jvp))
        if not (math.isfinite(self.last_loss) and math.isfinite(g)):
            self._record(Skip(t, 1))
            self._step += 1
            message = (
                f"step {t}: the loss is {self.last_loss} and its directional derivative {g}; "
                "the parameters were not updated"
            )
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(message)
            warnings.warn(message + " (skipped)", RuntimeWarning, stacklevel=2)
            return loss
        seed = rng.step_seed(self.seed, t)
        lrs, start = [], 0
        for group in self.param_groups:
            lr, wd = functional.f32(group["lr"]), functional.f32(group["weight_decay"])
            keys = [e["key"] for e in self._table[start : start + len(group["params"])]]
            start += len(group["params"])
            # as replay(exact=False) computes them, so that a trajectory replays bit for bit
            scale, coef = 1.0 - lr * wd, -lr * g
            functional.sweep_(
                group["params"], keys, [(seed, coef)], scale=scale, distribution=self.distribution, backend=self.backend
            )
            lrs.append(lr)
        self._record(Step(t, g, tuple(lrs)))
        self._step = t + 1
        self.projected_grad = g
        return loss

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The torch state plus the step counter, seed, options and the trajectory length (JSON-serialisable)."""
        state = super().state_dict()
        state["forward_gradient"] = {
            "format": _STATE_FORMAT,
            **self._keyed_state(),
            "written_weight_decays": None if self._written_hyper is None else list(self._written_hyper.weight_decays),
        }
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Continue a run: restores the step counter and seed, and truncates the trajectory to match."""
        state_dict = dict(state_dict)
        own = state_dict.pop("forward_gradient", None)
        if own is None or own.get("format") != _STATE_FORMAT:
            raise ValueError("not a ForwardGradient optimizer state (no 'forward_gradient' entry of a known format)")
        self._check_keyed_state(own)
        super().load_state_dict(state_dict)
        self._restore_keyed_state(own)
        wds = own.get("written_weight_decays")
        self._written_hyper = None if wds is None or self._resume_at is None else Hyper(0.0, tuple(wds))
