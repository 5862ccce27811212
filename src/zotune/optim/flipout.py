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
from zotune.optim import chunks, functional

__all__ = [
    "base",
    "is_norm",
    "normalized",
    "perturb_norm_output",
    "perturb_output",
    "signs",
    "update_",
    "update_vector_",
]

_R, _S = 1, 2  # the index of the sign streams' seeds


def base(seed: int, key: int, shape, device, backend: str | None = None) -> torch.Tensor:
    """U: the float32 Gaussian z of (seed, key) over a tensor of ``shape``."""
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    kernels.select(out.device, backend).fill(out.view(-1), "gaussian", seed, key, 0)
    return out


def signs(
    seed: int, key: int, which: str, rows: int, d: int, device, backend: str | None = None, first: int = 0
) -> torch.Tensor:
    """Rows ``first .. first + rows - 1`` of R (``which="r"``, d = d_out) or S (``"s"``, d = d_in): float32 signs."""
    index = _R if which == "r" else _S
    out = torch.empty((rows, d), dtype=torch.float32, device=device)
    be = kernels.select(out.device, backend)
    be.fill(out.view(-1), "rademacher", rng.step_seed(seed, 0, index), key, first * d)
    return out


def perturb_output(x: torch.Tensor, out: torch.Tensor, u: torch.Tensor, r: torch.Tensor, s: torch.Tensor, c: float):
    """``out + c r_i (.) (U (s_i (.) x_i))`` for every row i (the first dimension of x and out).

    x: (rows, ..., d_in), out: (rows, ..., d_out), u: (d_out, d_in), r: (rows, d_out), s: (rows, d_in).
    """
    shape = (x.shape[0],) + (1,) * (x.dim() - 2)
    xs = x * s.to(x.dtype).view(*shape, s.shape[1])
    return torch.addcmul(out, xs @ u.to(x.dtype).t(), r.to(x.dtype).view(*shape, r.shape[1]), value=c)


def is_norm(module: torch.nn.Module) -> bool:
    """A normalisation layer :func:`normalized` knows: ``nn.LayerNorm``, ``nn.RMSNorm``, Hugging Face's ``*RMSNorm``."""
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def normalized(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """x-hat of a normalisation layer (what its weight multiplies), or None for a kind not known here:
    ``nn.LayerNorm`` ((x - mean) / std), and RMSNorm (``nn.RMSNorm``, and Hugging Face's ``*RMSNorm`` with
    ``variance_epsilon``: x / rms(x), in float32 then back to x's dtype, as they compute it)."""
    if isinstance(module, torch.nn.LayerNorm):
        return torch.nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, torch.nn.RMSNorm) or type(module).__name__.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        eps = torch.finfo(torch.float32).eps if eps is None else eps
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return None


def perturb_norm_output(xhat, out: torch.Tensor, rw: torch.Tensor | None, rb: torch.Tensor | None, c: float):
    """A normalisation layer at weight ``g + c r_i`` and bias ``b + c r'_i`` for every row i:
    ``out + c r_i (.) x-hat_i + c r'_i``; rw, rb: (rows, d) signs, or None for a part that is not trained."""
    if rw is not None:
        shape = (out.shape[0],) + (1,) * (out.dim() - 2) + (rw.shape[1],)
        out = torch.addcmul(out, xhat, rw.to(out.dtype).view(shape), value=c)
    if rb is not None:
        shape = (out.shape[0],) + (1,) * (out.dim() - 2) + (rb.shape[1],)
        out = out.add(rb.to(out.dtype).view(shape), alpha=c)
    return out


def update_vector_(
    p: torch.Tensor,
    key: int,
    seed: int,
    coefs: Sequence[float],
    lr: float,
    *,
    scale: float = 1.0,
    rounding_seed: int | None = None,
    backend: str | None = None,
) -> None:
    """A vector's update ``p <- scale p - lr R^T c`` (its rows' directions are their signs r_i: a norm's weight or
    bias; ``scale``: weight decay's 1 - lr wd); ``rounding_seed``: a bf16/fp16 vector's result rounded
    stochastically."""
    r = signs(seed, key, "r", len(coefs), p.shape[0], p.device, backend)
    c = torch.tensor(list(coefs), dtype=torch.float32, device=p.device)
    flat = p.detach().view(-1)
    work = chunks.float_work(flat)
    if scale != 1.0:
        work.mul_(scale)
    work.add_(r.t() @ c, alpha=-float(lr))
    chunks.write_back(flat, work, rounding_seed, key, 0, kernels.select(p.device, backend))


def update_(
    p: torch.Tensor,
    key: int,
    seed: int,
    coefs: Sequence[float],
    lr: float,
    *,
    keep: torch.Tensor | None = None,
    scale: float = 1.0,
    rounding_seed: int | None = None,
    backend: str | None = None,
) -> None:
    """``W <- scale W - lr U (.) (R^T diag(c) S)`` in place (``scale``: weight decay's 1 - lr wd), one coefficient
    per row (its length is the rows);
    ``keep``: a boolean mask of W's shape (Sparse-GRZO: ``U (.) keep`` is the base noise, so only those elements
    move); ``rounding_seed``: a bf16/fp16 weight's result rounded stochastically."""
    rows = len(coefs)
    d_out, d_in = p.shape
    r = signs(seed, key, "r", rows, d_out, p.device, backend)
    s = signs(seed, key, "s", rows, d_in, p.device, backend)
    c = torch.tensor(list(coefs), dtype=torch.float32, device=p.device)
    m = (r * c[:, None]).t() @ s  # sum_i c_i r_i s_i^T, d_out x d_in (one matrix at a time)
    if keep is not None:
        m.mul_(keep)
    functional.scaled_sweep_(
        p,
        key,
        m,
        [(seed, -float(lr))],
        distribution="gaussian",
        scale=scale,
        rounding_seed=rounding_seed,
        backend=backend,
    )
