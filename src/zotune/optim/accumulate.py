"""Gradient accumulation for MeZO: several micro-batches under one perturbation z."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["accumulate"]


def accumulate(
    closures: Sequence[Callable[[], torch.Tensor | float]], weights: Sequence[float] | None = None
) -> Callable[[], torch.Tensor]:
    r"""One closure whose loss is the weighted mean of the micro-batch losses.

    .. math:: L(\theta) = \frac{\sum_i w_i L_i(\theta)}{\sum_i w_i}

    MeZO calls its closure once at :math:`\theta + \epsilon z` and once at :math:`\theta - \epsilon z`,
    so every micro-batch is evaluated under the same z on each side, and the projected gradient
    :math:`(L_+ - L_-) / 2\epsilon` is formed only from the accumulated losses: the step equals one
    step on the whole batch (exactly, up to float rounding, when the losses are means and the
    weights are the micro-batch sizes). Memory is that of one micro-batch forward. The sum is kept
    in float64.

    Args:
        closures: one closure per micro-batch, each returning its loss (no backward).
        weights: one weight per micro-batch (e.g. its number of examples or target tokens);
            default: equal weights.

    Example::

        micro = [batch[i : i + 8] for i in range(0, len(batch), 8)]
        opt.step(zotune.optim.accumulate([lambda b=b: model(**b).loss for b in micro], [len(b) for b in micro]))
    """
    closures = list(closures)
    if not closures:
        raise ValueError("accumulate needs at least one closure")
    if weights is None:
        weights = [1.0] * len(closures)
    weights = [float(w) for w in weights]
    if len(weights) != len(closures):
        raise ValueError(f"got {len(closures)} closures but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights)

    def closure() -> torch.Tensor:
        loss, device = 0.0, "cpu"
        for fn, w in zip(closures, weights):
            value = fn()
            if isinstance(value, torch.Tensor):
                device = value.device
            loss += w * float(value)
        return torch.tensor(loss / total, dtype=torch.float64, device=device)

    return closure
