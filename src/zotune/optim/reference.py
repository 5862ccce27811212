"""Slow, obviously correct optimizers that store everything explicitly: the yardsticks for the fast ones.

:class:`ReferenceMeZO` (plain MeZO, the paper's Algorithm 1) lives in :mod:`zotune.optim.algorithm`,
the one-page MeZO, and is re-exported here. :class:`ReferenceVariant` covers the variants of
:class:`zotune.MeZO` (n-SPSA, one-sided, FZOO, sphere, layerwise, momentum, Adam). Both use more memory than
the optimizers they check and are only for tests.
"""

from __future__ import annotations

import math

import torch

from zotune import rng
from zotune.optim.algorithm import ReferenceMeZO

__all__ = ["ReferenceHiZOO", "ReferenceMeZO", "ReferenceVariant"]


class ReferenceVariant:
    """The variants of :class:`zotune.MeZO` with everything explicit: z, every estimate, m and v (float64).

    Out of place and memory-hungry, for tests only. ``params`` are ``(name, tensor)`` pairs (one group,
    no weight decay unless ``weight_decay``); ``rule`` is ``"sgd"``, ``"momentum"`` or ``"adam"``,
    with the full moving averages (no window). z_j = z(step_seed(seed, t, j)); the sphere
    distribution normalises the concatenated Gaussian draw to norm sqrt(d); ``layerwise="param-norm"``
    multiplies tensor l's z by ||theta_l|| / sqrt(d_l) at the start of the step; ``layerwise="grad-norm"``
    probes every layer alone (restoring theta exactly), c_l = sqrt(mean g_l^2) rescaled so that
    sum d_l / c_l^2 = d, then perturbs along z / c_l and estimates with c_l z.
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        seed: int = 0,
        *,
        n: int = 1,
        estimator: str = "two-sided",
        distribution: str = "gaussian",
        layerwise: str = "none",
        rule: str = "sgd",
        beta1: float = 0.9,
        beta2: float = 0.999,
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_norm_every: int = 0,
        grad_norm_probes: int = 1,
    ):
        self.params = list(params)
        self.grad_norm_every, self.grad_norm_probes = grad_norm_every, grad_norm_probes
        self.norms: list[float] | None = None  # grad-norm: c_l per tensor
        self.norms_step = 0
        self.lr, self.eps, self.seed, self.n = lr, eps, seed, n
        self.estimator, self.distribution, self.layerwise = estimator, distribution, layerwise
        self.rule, self.beta1, self.beta2, self.adam_eps, self.wd = rule, beta1, beta2, adam_eps, weight_decay
        self.step_count = 0
        self.estimates: list[list[torch.Tensor]] = []  # ghat_k of every applied step, kept whole
        self.m = self.v = None
        self.projected_grads = None
        self.sigma: float | None = None  # FZOO: the last step's std of the perturbed losses

    def z(self, seed: int) -> list[torch.Tensor]:
        """The perturbation of ``seed`` for every parameter (before the layerwise scale)."""
        dist = "gaussian" if self.distribution == "sphere" else self.distribution
        zs = [
            torch.from_numpy(rng.z(dist, seed, rng.param_key(name), 0, p.numel())).reshape(p.shape).double()
            for name, p in self.params
        ]
        if self.distribution == "sphere":
            d = sum(p.numel() for _, p in self.params)
            norm = math.sqrt(sum(float((z * z).sum()) for z in zs))
            zs = [z * math.sqrt(d) / norm for z in zs]
        return zs

    @torch.no_grad()
    def step(self, closure) -> list[float]:
        t = self.step_count
        theta = [p.detach().double().clone() for _, p in self.params]
        scales = gains = [1.0] * len(theta)
        if self.layerwise == "param-norm":
            scales = gains = [float(x.norm()) / math.sqrt(x.numel()) or 1.0 for x in theta]
        if self.layerwise == "grad-norm":
            if self.norms is None or (self.grad_norm_every and t - self.norms_step >= self.grad_norm_every):
                self.norms, self.norms_step = self._layer_norms(t, theta, closure), t
            scales, gains = [1.0 / c for c in self.norms], self.norms
        zs = [self.z(rng.step_seed(self.seed, t, j)) for j in range(self.n)]
        us = [[s * z for s, z in zip(scales, zj)] for zj in zs]

        def loss_at(u, sign):
            for (_, p), x, uj in zip(self.params, theta, u):
                p.copy_(x + sign * self.eps * uj)
            return float(closure())

        if self.estimator == "two-sided":
            grads = [(loss_at(u, 1.0) - loss_at(u, -1.0)) / (2 * self.eps) for u in us]
        else:
            base = loss_at(us[0], 0.0)
            perturbed = [loss_at(u, 1.0) for u in us]
            grads = [(x - base) / self.eps for x in perturbed]
            if self.estimator == "fzoo":  # FZOO (arXiv 2506.09034): divided by the perturbed losses' sample std
                mean = sum(perturbed) / self.n
                self.sigma = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / (self.n - 1))
                grads = [g / self.sigma for g in grads]
        ghat = [sum(g * gains[i] * zj[i] for g, zj in zip(grads, zs)) / self.n for i in range(len(theta))]
        self.estimates.append(ghat)
        c = len(self.estimates)
        if self.rule == "sgd":
            direction = ghat
        elif self.rule == "momentum":
            direction = [
                sum((1 - self.beta1) * self.beta1 ** (c - 1 - k) * e[i] for k, e in enumerate(self.estimates))
                for i in range(len(theta))
            ]
        else:
            b1, b2 = self.beta1, self.beta2
            m = [
                sum((1 - b1) * b1 ** (c - 1 - k) * e[i] for k, e in enumerate(self.estimates))
                for i in range(len(theta))
            ]
            v = [
                sum((1 - b2) * b2 ** (c - 1 - k) * e[i] ** 2 for k, e in enumerate(self.estimates))
                for i in range(len(theta))
            ]
            direction = [(mi / (1 - b1**c)) / ((vi / (1 - b2**c)).sqrt() + self.adam_eps) for mi, vi in zip(m, v)]
            self.m, self.v = m, v
        for (_, p), x, dx in zip(self.params, theta, direction):
            p.copy_((1 - self.lr * self.wd) * x - self.lr * dx)
        self.step_count += 1
        self.projected_grads = grads
        return grads

    def _layer_norms(self, t: int, theta, closure) -> list[float]:
        """c_l of the gradient-norm variant from explicit per-layer probes (theta restored exactly)."""
        from zotune.optim.variants import layer_groups, layer_probe_seed

        names = [name for name, _ in self.params]
        layers = layer_groups(names)
        dist = "gaussian" if self.distribution == "sphere" else self.distribution
        norms = []
        for i, layer in enumerate(layers):
            squares = []
            for r in range(self.grad_norm_probes):
                seed = layer_probe_seed(self.seed, t, i, r, len(layers))
                z = {
                    x: torch.from_numpy(rng.z(dist, seed, rng.param_key(names[x]), 0, theta[x].numel()))
                    .reshape(theta[x].shape)
                    .double()
                    for x in layer
                }
                losses = []
                for sign in (1.0, -1.0):
                    for x in layer:
                        self.params[x][1].copy_(theta[x] + sign * self.eps * z[x])
                    losses.append(float(closure()))
                for x in layer:
                    self.params[x][1].copy_(theta[x])
                squares.append(((losses[0] - losses[1]) / (2 * self.eps)) ** 2)
            norms.append(math.sqrt(sum(squares) / len(squares)))
        dims = [sum(theta[x].numel() for x in layer) for layer in layers]
        kappa = math.sqrt(sum(dims) / sum(d / c**2 for d, c in zip(dims, norms)))
        out = [1.0] * len(theta)
        for layer, c in zip(layers, norms):
            for x in layer:
                out[x] = c / kappa
        return out


class ReferenceHiZOO:
    """HiZOO (arXiv 2402.15173) with everything explicit and in float64: z, s, the three losses. Tests only.

    ``update_with_old_s=True`` is a deliberately wrong variant (the update along the s of the probes), for
    checking that a test can tell the two apart.
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        seed: int = 0,
        *,
        alpha: float = 1e-10,
        distribution: str = "gaussian",
        weight_decay: float = 0.0,
        update_with_old_s: bool = False,
    ):
        self.params = list(params)
        self.lr, self.eps, self.seed, self.alpha, self.wd = lr, eps, seed, alpha, weight_decay
        self.distribution, self.update_with_old_s = distribution, update_with_old_s
        self.s = [torch.ones(p.shape, dtype=torch.float64) for _, p in self.params]
        self.step_count = 0
        self.projected_grads: list[float] | None = None
        self.kappa: float | None = None

    @torch.no_grad()
    def step(self, closure) -> float:
        seed = rng.step_seed(self.seed, self.step_count)
        theta = [p.detach().double().clone() for _, p in self.params]
        zs = [
            torch.from_numpy(rng.z(self.distribution, seed, rng.param_key(name), 0, p.numel()))
            .reshape(p.shape)
            .double()
            for name, p in self.params
        ]

        def loss_at(sign):
            for (_, p), x, s, z in zip(self.params, theta, self.s, zs):
                p.copy_(x + sign * self.eps * s * z)
            return float(closure())

        l0, lp, lm = loss_at(0.0), loss_at(1.0), loss_at(-1.0)
        c = (lp - lm) / (2 * self.eps)
        kappa = abs(lp + lm - 2 * l0) / (2 * self.eps**2)
        old = [s.clone() for s in self.s]
        self.s = [((1 - self.alpha) * s * s + self.alpha * kappa * z * z / (s * s)).sqrt() for s, z in zip(self.s, zs)]
        along = old if self.update_with_old_s else self.s
        for (_, p), x, s, z in zip(self.params, theta, along, zs):
            p.copy_((1 - self.lr * self.wd) * x - self.lr * c * s * z)
        self.step_count += 1
        self.projected_grads, self.kappa, self.last_z = [c], kappa, zs
        return lp
