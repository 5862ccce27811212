"""A slow, obviously correct MeZO that stores z explicitly: the yardstick for :class:`zotune.MeZO`.

It follows Algorithm 1 of the paper literally, out of place: z is materialised for every parameter
from the same keyed generator, the two losses are evaluated at theta + eps z and theta - eps z
(theta kept aside), and theta <- theta - lr (g z + wd theta). It uses twice the memory of
:class:`zotune.MeZO` and is only for tests.
"""

from __future__ import annotations

import torch

from zotune import rng

__all__ = ["ReferenceMeZO"]


class ReferenceMeZO:
    """MeZO with explicit z. ``params`` are ``(name, tensor, weight_decay)`` triples; one lr for all."""

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
        seed = rng.step_seed(self.seed, self.step_count)
        theta = [p.detach().to(torch.float64).clone() for _, p, _ in self.params]
        zs = [self._z(name, p, seed) for name, p, _ in self.params]

        def loss_at(sign: float) -> float:
            for (_, p, _), t, z in zip(self.params, theta, zs):
                p.copy_(t + sign * self.eps * z)
            return float(closure())

        plus, minus = loss_at(+1.0), loss_at(-1.0)
        g = (plus - minus) / (2 * self.eps)
        for (_, p, wd), t, z in zip(self.params, theta, zs):
            p.copy_(t - self.lr * (g * z + wd * t))
        self.step_count += 1
        self.projected_grad = g
        return plus
