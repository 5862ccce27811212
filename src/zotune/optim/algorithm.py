r"""MeZO in one page: the paper's Algorithm 1, written to be read, and the oracle the tests compare with.

One step t draws a seed s_t; z ~ N(0, I_d) is a pure function of s_t (and of each parameter's name)::

    L+ = L(theta + eps z; B),   L- = L(theta - eps z; B)
    g  = (L+ - L-) / (2 eps)                    the SPSA estimate, eq. (1): grad L ~ g z
    theta <- theta - lr (g z + wd theta)        ZO-SGD on that estimate, with weight decay

Algorithm 1 never stores z: ``PerturbParameters(theta, eps, s)`` resets the generator to s and adds
eps z in place, called with +eps, -2 eps and +eps (the reset), and the descent loop regenerates z once
more. :class:`ReferenceMeZO` takes the same steps in the same order but keeps what the paper avoids
keeping: z (materialised from :func:`zotune.rng.z`) and a float64 copy theta_0 of the weights, so that
every perturbed point is rounded once from the exact one and the reset is exact. It is slow and uses
twice the memory: it is for reading and for tests. :class:`zotune.MeZO` is the in-place version of the
same step (three float32 sweeps, z regenerated and never stored) and is checked against this class step
by step (tests/test_optim.py).

Reference: Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023
(arXiv 2305.17333), Algorithm 1 and eq. (1).

Example::

    ref = ReferenceMeZO([(n, p, 0.0) for n, p in model.named_parameters()], lr=1e-6, eps=1e-3, seed=0)
    loss_plus = ref.step(lambda: model(**batch).loss)
"""

from __future__ import annotations

import torch

from zotune import rng

__all__ = ["ReferenceMeZO"]


class ReferenceMeZO:
    """MeZO with explicit z (Algorithm 1). ``params`` are ``(name, tensor, weight_decay)`` triples; one lr.

    Args:
        params: ``(name, tensor, weight_decay)`` triples; the names key z, as in :class:`zotune.MeZO`.
        lr: the learning rate eta (constant).
        eps: the perturbation scale epsilon.
        seed: the run's seed; step t uses ``zotune.rng.step_seed(seed, t)``.
        distribution: ``"gaussian"`` (the paper), ``"gaussian-fast"`` or ``"rademacher"``.
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, seed: int = 0, distribution: str = "gaussian"):
        self.params = [(name, p, wd) for name, p, wd in params]
        self.lr, self.eps, self.seed, self.distribution = lr, eps, seed, distribution
        self.step_count = 0
        self.projected_grad = None

    def _z(self, name: str, p: torch.Tensor, seed: int) -> torch.Tensor:
        values = rng.z(self.distribution, seed, rng.param_key(name), 0, p.numel())
        return torch.from_numpy(values).reshape(p.shape).to(p.device, torch.float64)

    @torch.no_grad()
    def step(self, closure) -> float:
        """One step of Algorithm 1 on the batch ``closure`` evaluates; returns L+ (the loss at theta + eps z)."""
        seed = rng.step_seed(self.seed, self.step_count)  # "Sample ... random seed s"
        theta = [p.detach().to(torch.float64).clone() for _, p, _ in self.params]  # theta_0, kept aside
        zs = [self._z(name, p, seed) for name, p, _ in self.params]  # z ~ N(0, 1) for every theta_i

        def loss_at(sign: float) -> float:  # PerturbParameters, from theta_0: theta <- theta_0 + sign eps z
            for (_, p, _), t, z in zip(self.params, theta, zs):
                p.copy_(t + sign * self.eps * z)
            return float(closure())

        plus = loss_at(+1.0)  # theta <- PerturbParameters(theta, eps, s); l+ <- L(theta; B)
        minus = loss_at(-1.0)  # theta <- PerturbParameters(theta, -2 eps, s); l- <- L(theta; B)
        g = (plus - minus) / (2 * self.eps)  # projected_grad <- (l+ - l-) / (2 eps): eq. (1) is g z
        # "theta <- PerturbParameters(theta, eps, s)" resets to theta_0 (exact here), and the descent loop
        # "theta_i <- theta_i - eta_t * projected_grad * z", plus the weight-decay term eta_t wd theta_i, in one write.
        for (_, p, wd), t, z in zip(self.params, theta, zs):
            p.copy_(t - self.lr * (g * z + wd * t))
        self.step_count += 1
        self.projected_grad = g
        return plus
