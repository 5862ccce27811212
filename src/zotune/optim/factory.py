"""Build the MeZO optimizer (or a variant) that an :class:`~zotune.config.OptimConfig` describes."""

from __future__ import annotations

import os

import torch

from zotune.optim import estimators
from zotune.optim.grzo import GRZO
from zotune.optim.mezo import HiZOO, MeZO, MeZOAdam, MeZOMomentum, ZOMuon
from zotune.optim.variants import linear_n

__all__ = ["make_optimizer", "stochastic_rounding"]


def stochastic_rounding(setting: bool | None, trained) -> bool:
    """The config's stochastic_rounding, or (None) on exactly when a trained tensor is bf16 / fp16: their ulp often
    exceeds twice a step's lr |g| z, which rounding to nearest would drop."""
    if setting is not None:
        return setting
    return any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in trained)


def make_optimizer(
    named_params,
    optim_config,
    *,
    trajectory: str | os.PathLike | None = None,
    on_nonfinite: str = "skip",
    model: torch.nn.Module | None = None,
) -> MeZO:
    """The optimizer of ``optim_config``: :class:`MeZO`, :class:`MeZOMomentum`, :class:`MeZOAdam`, :class:`HiZOO`,
    :class:`ZOMuon` or :class:`GRZO`.

    ``fuse_next`` is honoured where it applies: the one-sided estimators (one-sided, FZOO), the layerwise scaling,
    sparse and ZO-Muon steps need each step to start from clean weights, and batched steps never perturb in place,
    so with them it is off whatever the config says.

    Args:
        named_params: ``(name, tensor)`` pairs of the trainable parameters.
        optim_config: a :class:`zotune.config.OptimConfig`.
        trajectory: the trajectory file to write (``zotune.replay`` rebuilds the weights from it).
        on_nonfinite: ``"skip"`` (the training loop's choice) or ``"raise"``.
        model: the module itself: GRZO (``estimator="grzo"`` or ``"grzo-raw"``) hooks its layers and takes the tensors it trains
            from them (:func:`zotune.optim.grzo.linear_targets`; ``named_params`` is then not used).

    Example::

        opt = make_optimizer(model.named_parameters(), OptimConfig(lr=1e-6, variant="adam", state="stored"))
    """
    oc = optim_config
    named_params = list(named_params)
    grzo = estimators.get(oc.estimator).rule == "grzo"  # "grzo" and "grzo-raw": zotune.GRZO
    trained = [p for _, p in named_params] if not grzo or model is None else list(model.parameters())
    rounding = stochastic_rounding(oc.stochastic_rounding, trained)
    if oc.n_schedule == "linear":
        n = linear_n(oc.n_perturbations, oc.n_perturbations_final, oc.n_ramp_steps)
    else:
        n = oc.n_perturbations
    fuse = oc.fuse_next and estimators.get(oc.estimator).fusable and oc.layerwise == "none"
    fuse = fuse and not oc.sparsity and oc.variant != "muon"  # each step's mask / update needs its clean weights
    fuse = fuse and not oc.batched  # batched steps never perturb the weights in place
    common = dict(
        distribution=oc.distribution,
        fuse_next=fuse,
        stochastic_rounding=rounding,
        on_nonfinite=on_nonfinite,
        trajectory=trajectory,
        n_perturbations=n,
        estimator=oc.estimator,
        layerwise=oc.layerwise,
        grad_norm_every=oc.grad_norm_every,
        grad_norm_probes=oc.grad_norm_probes,
        lowrank_rank=oc.lowrank_rank,
        lowrank_every=oc.lowrank_every,
        sparsity=oc.sparsity,
        batched=oc.batched,
    )
    args = (named_params, oc.lr, oc.eps, oc.weight_decay, oc.seed)
    if grzo:
        if model is None:
            raise ValueError("GRZO hooks the model's layers: pass make_optimizer(..., model=the model)")
        return GRZO(
            model,
            *args[1:],
            stochastic_rounding=rounding,
            sparsity=oc.sparsity,
            normalise=oc.estimator == "grzo",
            on_nonfinite=on_nonfinite,
            trajectory=trajectory,
        )
    if oc.estimator == "hizoo":
        common.pop("estimator"), common.pop("n_perturbations")
        return HiZOO(*args, alpha=oc.hizoo_alpha, **common)
    if oc.variant == "muon":
        return ZOMuon(*args, **{**common, "distribution": "subspace"})
    if oc.variant == "momentum":
        return MeZOMomentum(*args, beta=oc.beta1, window=oc.window, state=oc.state, **common)
    if oc.variant == "adam":
        return MeZOAdam(
            *args, betas=(oc.beta1, oc.beta2), adam_eps=oc.adam_eps, window=oc.window, state=oc.state, **common
        )
    return MeZO(*args, **common)
