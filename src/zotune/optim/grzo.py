r"""GRZO: one perturbation per example, from two forward passes (Tan et al., arXiv 2606.02857).

MeZO's two forward passes estimate the gradient along one direction. GRZO perturbs each example of the
batch along its own direction (:mod:`zotune.optim.flipout`: Delta_i = U (.) r_i s_i^T on every weight
matrix, U shared, the signs per example), so the same two passes give B directions, and normalises the
examples' loss differences by their spread before the update (:class:`zotune.optim.estimators.GRZO`,
:class:`zotune.optim.variants.GRZORule`). The per-example weights are never formed: a forward hook on
each trained ``nn.Linear`` adds ``eps r_i (.) (U (s_i (.) x_i))`` to its output, one more matmul of the
layer's size, with U (one matrix at a time) and the signs regenerated from the step's seed.

What it trains: the weights of the model's ``nn.Linear`` layers that require grad, but not the output
head (whose weight is the input embedding's in tied models; the authors freeze it too). Biases,
embeddings and normalisation weights stay as they are (the authors' code also perturbs norms and
embedding rows; not here yet). With LoRA, the adapters' ``lora_A`` / ``lora_B`` are such layers.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence

import torch

from zotune.optim import flipout, functional, variants
from zotune.optim.mezo import MeZO, NonFiniteLossError
from zotune.optim.step import StepPlan, update_of
from zotune.trajectory import MultiStep, Step

__all__ = ["GRZO", "linear_targets"]


def linear_targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every ``nn.Linear`` GRZO trains: trainable weight, not the output head, not tied
    to an embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and m is not head and id(m.weight) not in tied
    ]


class GRZO(MeZO):
    r"""GRZO (Tan et al., "GRZO: Group-Relative Zeroth-Order Optimization for Large Language Model
    Fine-Tuning", arXiv 2606.02857): per-example directions and a group-relative step. Each step::

        l+_q, l-_q = per-example losses at theta +- eps Delta_i      (two forward passes, hooks)
        delta_q = (l+_q - l-_q) / 2,  a_q = delta_q / (std(delta) + 1e-8)
        theta <- theta - lr / (2 eps B) sum_i a_q(i) Delta_i,    Delta_i = U (.) (r_i s_i^T)

    ``step(closure, rows=None)``: the closure returns the B per-example losses (a 1-D tensor) and must run
    the model once over all rows, in batch order; ``rows`` gives each example's rows (a multiple-choice
    question's options share its advantage, each option its own signs; default one row each). Memory: that
    of inference plus one layer's U and d_out x d_in update matrix at a time. The trajectory records the
    per-row coefficients (4 bytes a row a step) and replays bit for bit. Not with ``fuse_next`` (nothing is
    swept in), n-SPSA, layerwise scaling, sparse or low-rank directions, or momentum/Adam.

    Args:
        model: the module; GRZO trains the weights of :func:`linear_targets` and hooks those layers
            (``remove_hooks()`` detaches them).
        lr, eps, weight_decay, seed, on_nonfinite, backend, trajectory: as :class:`zotune.MeZO`.

    Example::

        opt = zotune.GRZO(model, lr=1e-6, eps=1e-3)
        for batch in loader:
            opt.step(lambda: torch.nn.functional.cross_entropy(model(batch.x), batch.y, reduction="none"))
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        on_nonfinite: str = "raise",
        backend: str | None = None,
        trajectory: str | os.PathLike | None = None,
    ):
        targets = linear_targets(model)
        if not targets:
            raise ValueError("GRZO found no trainable nn.Linear layer (other than the output head) to train")
        self.modules_ = [m for _, m in targets]
        params = [(f"{name}.weight", m.weight) for name, m in targets]
        super().__init__(
            params,
            lr,
            eps,
            weight_decay,
            seed,
            estimator="grzo",
            fuse_next=False,
            on_nonfinite=on_nonfinite,
            backend=backend,
            trajectory=trajectory,
        )
        self._active: tuple[int, float] | None = None  # (step seed, +-eps) while a probe pass runs
        self._rows: int | None = None
        self._calls = [0] * len(self.modules_)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules_)]

    def _make_rule(self):
        return variants.GRZORule()

    def remove_hooks(self) -> None:
        """Detach the forward hooks (the model then runs as without GRZO)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if self._active is None:
                return None
            seed, c = self._active
            x = inputs[0]
            if self._rows is None:
                self._rows = x.shape[0]
            self._calls[i] += 1
            if x.shape[0] != self._rows or self._calls[i] > 1:
                raise ValueError(
                    "GRZO needs the closure to run the model once over all of the batch's rows "
                    f"(layer {i} saw {x.shape[0]} rows after {self._rows}, call {self._calls[i]})"
                )
            w = module.weight
            key = self._table[i]["key"]
            u = flipout.base(seed, key, w.shape, w.device, self.backend)
            r = flipout.signs(seed, key, "r", self._rows, w.shape[0], w.device, self.backend)
            s = flipout.signs(seed, key, "s", self._rows, w.shape[1], w.device, self.backend)
            return flipout.perturb_output(x, output, u, r, s, c)

        return hook

    def _pass(self, closure, seed: int, c: float) -> list[float]:
        self._active, self._rows, self._calls = (seed, c), None, [0] * len(self.modules_)
        try:
            if self.forward_passes is not None:
                self.forward_passes += 1
            values = closure()
        finally:
            self._active = None
        missing = [i for i, k in enumerate(self._calls) if k == 0]
        if missing:
            name = self._table[missing[0]]["name"]
            raise ValueError(f"GRZO: the layer of {name} did not run in the closure's forward (freeze it)")
        values = torch.as_tensor(values).detach().reshape(-1).double().cpu().tolist()
        return values

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor], rows: Sequence[int] | None = None):  # type: ignore[override]
        """One step; ``closure()`` returns the per-example losses (B,). Returns their mean at theta + eps Delta."""
        if closure is None:
            raise ValueError("GRZO.step needs a closure that returns the per-example losses")
        t = self._step
        eps = functional.f32(self.eps)
        seed = self._directions().seed(t, 0)
        plus = self._pass(closure, seed, eps)
        rows = [1] * len(plus) if rows is None else [int(k) for k in rows]
        if len(rows) != len(plus) or sum(rows) != self._rows:
            raise ValueError(
                f"GRZO: the closure returned {len(plus)} losses for {self._rows} rows, and rows= says "
                f"{len(rows)} examples with {sum(rows)} rows: return one loss per example, and pass rows="
            )
        if not all(math.isfinite(x) for x in plus):
            return self._stop(t, 1, plus, None)
        minus = self._pass(closure, seed, -eps)
        if not all(math.isfinite(x) for x in minus):
            return self._stop(t, 2, plus, minus)
        coefs = self._estimator.row_coefficients(plus, minus, rows, eps)
        if not all(math.isfinite(c) for c in coefs):
            return self._stop(t, 2, plus, minus)
        plan = StepPlan(t, len(coefs), self._estimator, eps)
        u = update_of(plan, self._directions(), coefs, None)
        groups = self._groups()
        self.rule.apply(groups, u, distribution=self._directions().zdist, rounding_seed=None, backend=self.backend)
        lrs = tuple(g.lr for g in groups)
        self._record(Step(t, coefs[0], lrs) if len(coefs) == 1 else MultiStep(t, tuple(coefs), lrs))
        self._step = t + 1
        self.last_step_skipped = False
        self.projected_grads = coefs
        self.projected_grad = float(sum(coefs) / len(coefs))
        self.last_losses = (math.fsum(plus) / len(plus), math.fsum(minus) / len(minus))
        return torch.tensor(self.last_losses[0])

    def _stop(self, t: int, phase: int, plus, minus):
        """A non-finite loss or estimate: nothing moved; record a skip, then raise or warn."""
        self._skip(StepPlan(t, 1, self._estimator, functional.f32(self.eps)), phase)
        values = plus if minus is None else minus
        message = (
            f"step {t}: the per-example losses at {self._estimator.where(phase, 1)} give no finite estimate "
            f"({values[:8]}{' ...' if len(values) > 8 else ''}); the parameters were not updated"
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(message)
        warnings.warn(message + " (skipped)", RuntimeWarning, stacklevel=3)
        mean = math.fsum(plus) / len(plus)
        self.last_losses = (mean, math.nan if minus is None else math.fsum(minus) / len(minus))
        return torch.tensor(mean)
