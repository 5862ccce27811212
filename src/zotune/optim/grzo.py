r"""GRZO: one perturbation per example, from two forward passes (Tan et al., arXiv 2606.02857).

MeZO's two forward passes estimate the gradient along one direction. GRZO perturbs each example of the
batch along its own direction (:mod:`zotune.optim.flipout`: Delta_i = U (.) r_i s_i^T on every weight
matrix, U shared, the signs per example), so the same two passes give B directions, and normalises the
examples' loss differences by their spread before the update (:class:`zotune.optim.estimators.GRZO`,
:class:`zotune.optim.variants.GRZORule`). The per-example weights are never formed: a forward hook on
each trained ``nn.Linear`` adds ``eps r_i (.) (U (s_i (.) x_i))`` to its output, one more matmul of the
layer's size, with U (one matrix at a time) and the signs regenerated from the step's seed; a hook on each
LayerNorm / RMSNorm adds ``eps r_i (.) x-hat_i`` (its weight's direction is the signs r_i; a bias's its own).

What it trains (:func:`linear_targets`): the weights of the ``nn.Linear`` layers that require grad, but not
the output head (whose weight is the input embedding's in tied models; the authors freeze it too), and the
weights and biases of LayerNorm and RMSNorm layers. Linear biases and embeddings stay as they are (the
authors' code also perturbs the rows of the embedding that a batch uses: not here, since replay would need
the batch's tokens). With LoRA, the adapters' ``lora_A`` / ``lora_B`` are such layers.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence

import torch

from zotune import distributed
from zotune.optim import flipout, functional, variants
from zotune.optim.mezo import MeZO, NonFiniteLossError
from zotune.optim.step import StepPlan, update_of
from zotune.trajectory import MultiStep, Step

__all__ = ["GRZO", "linear_targets"]


def linear_targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every layer GRZO perturbs: each ``nn.Linear`` with a trainable weight but the output head
    (and any weight tied to an embedding), and each LayerNorm / RMSNorm with a trainable weight or bias."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if m.weight.requires_grad and m is not head and id(m.weight) not in tied:
                out.append((name, m))
        elif flipout.is_norm(m) and any(
            isinstance(getattr(m, part, None), torch.Tensor) and getattr(m, part).requires_grad
            for part in ("weight", "bias")
        ):
            out.append((name, m))
    return out


def _trained(name: str, m: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors GRZO trains in a target layer: a Linear's weight (not its bias); a norm's weight and bias."""
    parts = ("weight",) if isinstance(m, torch.nn.Linear) else ("weight", "bias")
    out = []
    for part in parts:
        t = getattr(m, part, None)
        if isinstance(t, torch.Tensor) and t.requires_grad:
            out.append((f"{name}.{part}" if name else part, t))
    return out


class GRZO(MeZO):
    r"""GRZO (Tan et al., "GRZO: Group-Relative Zeroth-Order Optimization for Large Language Model
    Fine-Tuning", arXiv 2606.02857): per-example directions and a group-relative step. Each step::

        l+_q, l-_q = per-example losses at theta +- eps Delta_i      (two forward passes, hooks)
        delta_q = (l+_q - l-_q) / 2,  a_q = delta_q / (std(delta) + 1e-8)
        theta <- theta - lr / (2 eps B) sum_i a_q(i) Delta_i,    Delta_i = U (.) (r_i s_i^T)

    ``step(closure, rows=None)``: the closure returns the B per-example losses (a 1-D tensor) and runs the
    model over the batch's rows in order, in one forward or in consecutive slices (row j of the evaluation
    is the j-th row the layers see); ``rows`` gives each example's rows (a multiple-choice
    question's options share its advantage, each option its own signs; default one row each). Memory: that
    of inference plus one layer's U and d_out x d_in update matrix at a time. The trajectory records the
    per-row coefficients (4 bytes a row a step) and replays bit for bit. Not with ``fuse_next`` (nothing is
    swept in), n-SPSA, layerwise scaling, sparse or low-rank directions, or momentum/Adam; nor with prefix
    tuning (its prefix is not a Linear layer).

    Data parallel (``data_parallel=True`` in an initialised ``torch.distributed`` process group): every rank
    holds the whole model and the same optimizer, runs its own examples and passes their ``rows``; its rows
    take the directions of their places in the whole batch (rank 0's rows first), and
    :func:`zotune.distributed.gather_lists` gathers the per-example losses, so every rank applies the update
    one process would on the whole batch (the authors also gather the losses). Communication a step: the
    rows (two small all-gathers) and each pass's B losses.

    Args:
        model: the module; GRZO trains the weights of :func:`linear_targets` and hooks those layers
            (``remove_hooks()`` detaches them).
        lr, eps, weight_decay, seed, on_nonfinite, backend, trajectory: as :class:`zotune.MeZO`.
        normalise: divide the examples' loss differences by their spread (GRZO); False: the raw differences
            (estimator ``"grzo-raw"``, the authors' ``two`` ablation: B MeZO estimates averaged, a step that shrinks
            with the differences; its rate is on MeZO's scale, not GRZO's).
        sparsity: Sparse-GRZO (the authors' ``grzo_sparse``; Sparse-MeZO's masks, arXiv 2402.15751): in (0, 1), each
            matrix's base noise U is masked to ``|theta| <= h``, h its ``1 - sparsity`` magnitude quantile from the
            weights as the step found them, so only those elements are perturbed and updated (0.75: the smallest
            quarter, the authors' ``--sparse_ratio 0.25 --sparse_rule small``); norms' vectors are not masked.
            Memory: one layer's mask while its hook or update runs; nothing kept.
        stochastic_rounding: round bf16/fp16 weights stochastically in the update (as :class:`zotune.MeZO`'s), so
            that updates below half a unit in the last place move the weights on average; replay repeats it.
        data_parallel: gather the ranks' per-example losses (a no-op without a process group or with one rank).
        group: the process group (the default group when None).

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
        stochastic_rounding: bool = False,
        sparsity: float = 0.0,
        normalise: bool = True,
        data_parallel: bool = False,
        group=None,
    ):
        if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
            raise ValueError(f"Invalid sparsity: {sparsity!r} (the fraction of each matrix left still, in [0, 1))")
        self._sparsity = float(sparsity)  # the rule's (built by MeZO's constructor): Sparse-GRZO's masks
        targets = linear_targets(model)
        if not any(isinstance(m, torch.nn.Linear) for _, m in targets):
            raise ValueError("GRZO found no trainable nn.Linear layer (other than the output head) to train")
        self.modules_ = [m for _, m in targets]
        params = [pair for name, m in targets for pair in _trained(name, m)]
        super().__init__(
            params,
            lr,
            eps,
            weight_decay,
            seed,
            estimator="grzo" if normalise else "grzo-raw",
            fuse_next=False,
            stochastic_rounding=stochastic_rounding,
            on_nonfinite=on_nonfinite,
            backend=backend,
            trajectory=trajectory,
        )
        index = {e["name"]: i for i, e in enumerate(self._table)}  # weight decay may regroup (and reorder) them
        # per layer: the table entries (key) of its weight and of its bias (None where not trained)
        self._slots = []
        for name, m in targets:
            names = {n.rsplit(".", 1)[-1]: n for n, _ in _trained(name, m)}
            self._slots.append(
                tuple(self._table[index[names[p]]]["key"] if p in names else None for p in ("weight", "bias"))
            )
        self._active: tuple[int, float] | None = None  # (step seed, +-eps) while a probe pass runs
        self._rows: int | None = None  # rows the last evaluation ran
        self._offsets = [0] * len(self.modules_)  # per layer: rows it has seen in this evaluation
        self._names = [name for name, _ in targets]
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules_)]
        self.data_parallel, self.group = bool(data_parallel), group
        self._thresholds: dict[int, torch.Tensor] = {}

    def _make_rule(self):
        return variants.GRZORule(self._sparsity)

    def _keep(self, i: int, w: torch.Tensor) -> torch.Tensor | None:
        """Layer i's Sparse-GRZO mask (None: not sparse): the rule's, its threshold kept for the step's passes."""
        if i not in self._thresholds:
            self._thresholds[i] = self.rule.threshold(w)
        return self.rule.keep(w, self._thresholds[i]) if self._thresholds[i] is not None else None

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
            first, n = self._offsets[i], x.shape[0]  # a forward over a slice: the rows after those already seen
            self._offsets[i] = first + n
            kw, kb = self._slots[i]
            be = self.backend
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                u = flipout.base(seed, kw, w.shape, w.device, be)
                keep = self._keep(i, w)
                if keep is not None:
                    u.mul_(keep)
                r = flipout.signs(seed, kw, "r", n, w.shape[0], w.device, be, first)
                s = flipout.signs(seed, kw, "s", n, w.shape[1], w.device, be, first)
                return flipout.perturb_output(x, output, u, r, s, c)
            d = output.shape[-1]
            rw = None if kw is None else flipout.signs(seed, kw, "r", n, d, output.device, be, first)
            rb = None if kb is None else flipout.signs(seed, kb, "r", n, d, output.device, be, first)
            xhat = None if kw is None else flipout.normalized(module, x)
            return flipout.perturb_norm_output(xhat, output, rw, rb, c)

        return hook

    def _pass(self, closure, seed: int, c: float, first: int) -> list[float]:
        """This rank's per-example losses at theta + c Delta, its rows numbered from ``first``."""
        self._active, self._offsets = (seed, c), [first] * len(self.modules_)
        try:
            if self.forward_passes is not None:
                self.forward_passes += 1
            values = closure()
        finally:
            self._active = None
        missing = [i for i, k in enumerate(self._offsets) if k == first]
        if missing:
            raise ValueError(
                f"GRZO: the layer {self._names[missing[0]]!r} did not run in the closure's forward (freeze it)"
            )
        if len(set(self._offsets)) > 1:
            raise ValueError(
                "GRZO: the layers saw different numbers of rows in one evaluation (a layer run twice a forward?): "
                f"{min(self._offsets)} to {max(self._offsets)}"
            )
        self._rows = self._offsets[0] - first
        values = torch.as_tensor(values).detach().reshape(-1).double().cpu().tolist()
        return values

    def _shards(self, rows: Sequence[int] | None) -> tuple[int, list[int] | None, list[int] | None]:
        """(this rank's first row in the whole batch, every rank's example count, the whole batch's rows); the
        counts and rows are None in one process (the rows then default to one per loss)."""
        if not self.data_parallel or distributed.world_size(self.group) == 1:
            return 0, None, None
        if rows is None:
            raise ValueError("GRZO across ranks needs rows= (each of this rank's examples' row counts; [1] * B)")
        shards = distributed.gather_lists([int(k) for k in rows], self.group, dtype=torch.int64)
        first = sum(sum(s) for s in shards[: distributed.rank(self.group)])
        return first, [len(s) for s in shards], [k for s in shards for k in s]

    def _gather(self, values: list[float], lengths: list[int] | None) -> list[float]:
        """The whole batch's per-example losses, ranks in order (this rank's alone in one process)."""
        if lengths is None:
            return values
        return [v for shard in distributed.gather_lists(values, self.group, lengths=lengths) for v in shard]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor], rows: Sequence[int] | None = None):  # type: ignore[override]
        """One step; ``closure()`` returns the per-example losses (B,). Returns their mean at theta + eps Delta."""
        if closure is None:
            raise ValueError("GRZO.step needs a closure that returns the per-example losses")
        t = self._step
        eps = functional.f32(self.eps)
        seed = self._directions().seed(t, 0)
        self._thresholds = {}  # Sparse-GRZO: each layer's, from this step's weights (none moves before the update)
        first, lengths, everyone = self._shards(rows)
        plus = self._pass(closure, seed, eps, first)
        rows = [1] * len(plus) if rows is None else [int(k) for k in rows]
        if len(rows) != len(plus) or sum(rows) != self._rows:
            raise ValueError(
                f"GRZO: the closure returned {len(plus)} losses for {self._rows} rows, and rows= says "
                f"{len(rows)} examples with {sum(rows)} rows: return one loss per example, and pass rows="
            )
        plus, rows = self._gather(plus, lengths), rows if everyone is None else everyone
        if not all(math.isfinite(x) for x in plus):
            return self._stop(t, 1, plus, None)
        minus = self._gather(self._pass(closure, seed, -eps, first), lengths)
        if not all(math.isfinite(x) for x in minus):
            return self._stop(t, 2, plus, minus)
        coefs = self._estimator.row_coefficients(plus, minus, rows, eps)
        if not all(math.isfinite(c) for c in coefs):
            return self._stop(t, 2, plus, minus)
        plan = StepPlan(t, len(coefs), self._estimator, eps)
        u = update_of(plan, self._directions(), coefs, None)
        groups = self._groups()
        rounding = u.seeds[0] if self.stochastic_rounding else None
        self.rule.apply(groups, u, distribution=self._directions().zdist, rounding_seed=rounding, backend=self.backend)
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
