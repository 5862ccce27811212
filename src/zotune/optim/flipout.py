r"""GRZO's per-example directions (Flipout-style), their forward perturbation and their update: the tensor work.

GRZO (Tan et al., "GRZO: Group-Relative Zeroth-Order Optimization for Large Language Model Fine-Tuning",
arXiv 2606.02857) gives every row i of a batch (an example; each option of a multiple-choice question)
its own direction on every weight matrix W (d_out x d_in) at step t::

    Delta_i = U (.) (r_i s_i^T),   U ~ N(0, I) shared by the rows,  r_i in {+-1}^d_out,  s_i in {+-1}^d_in

so that a forward pass at ``W + c Delta_i`` for row i costs one more matmul of the layer's size:
``(W + c Delta_i) x_i = W x_i + c r_i (.) (U (s_i (.) x_i))`` (:func:`perturb_output`). An update with one
coefficient per row is ``W <- W - lr U (.) (R^T diag(c) S)`` (:func:`update_`): a matrix product of the
rows' signs, then an element-wise sweep along U.

Keys: U is the run's Gaussian stream of the tensor's key at the step's seed (the z MeZO would draw for it);
R (rows x d_out) and S (rows x d_in) are the Rademacher streams of the seeds ``step_seed(seed_t, 0, 1)`` and
``step_seed(seed_t, 0, 2)``, row i being elements ``i d .. (i + 1) d``. Nothing is stored: the forward
hooks, the update and replay regenerate them from (seed_t, key, rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zotune import kernels, rng
from zotune.optim import functional

__all__ = ["base", "perturb_output", "signs", "update_"]

_R, _S = 1, 2  # the index of the sign streams' seeds


def base(seed: int, key: int, shape, device, backend: str | None = None) -> torch.Tensor:
    """U: the float32 Gaussian z of (seed, key) over a tensor of ``shape``."""
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    kernels.select(out.device, backend).fill(out.view(-1), "gaussian", seed, key, 0)
    return out


def signs(seed: int, key: int, which: str, rows: int, d: int, device, backend: str | None = None) -> torch.Tensor:
    """R (``which="r"``, d = d_out) or S (``"s"``, d = d_in): ``rows`` x d float32 signs."""
    index = _R if which == "r" else _S
    out = torch.empty((rows, d), dtype=torch.float32, device=device)
    kernels.select(out.device, backend).fill(out.view(-1), "rademacher", rng.step_seed(seed, 0, index), key, 0)
    return out


def perturb_output(x: torch.Tensor, out: torch.Tensor, u: torch.Tensor, r: torch.Tensor, s: torch.Tensor, c: float):
    """``out + c r_i (.) (U (s_i (.) x_i))`` for every row i (the first dimension of x and out).

    x: (rows, ..., d_in), out: (rows, ..., d_out), u: (d_out, d_in), r: (rows, d_out), s: (rows, d_in).
    """
    shape = (x.shape[0],) + (1,) * (x.dim() - 2)
    xs = x * s.to(x.dtype).view(*shape, s.shape[1])
    return torch.addcmul(out, xs @ u.to(x.dtype).t(), r.to(x.dtype).view(*shape, r.shape[1]), value=c)


def update_(
    p: torch.Tensor,
    key: int,
    seed: int,
    coefs: Sequence[float],
    lr: float,
    *,
    backend: str | None = None,
) -> None:
    """``W <- W - lr U (.) (R^T diag(c) S)`` in place: one coefficient per row (its length is the rows)."""
    rows = len(coefs)
    d_out, d_in = p.shape
    r = signs(seed, key, "r", rows, d_out, p.device, backend)
    s = signs(seed, key, "s", rows, d_in, p.device, backend)
    c = torch.tensor(list(coefs), dtype=torch.float32, device=p.device)
    m = (r * c[:, None]).t() @ s  # sum_i c_i r_i s_i^T, d_out x d_in (one matrix at a time)
    functional.scaled_sweep_(p, key, m, [(seed, -float(lr))], distribution="gaussian", backend=backend)
