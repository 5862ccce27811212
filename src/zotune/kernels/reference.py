"""The reference backend: z from :mod:`zotune.rng` (NumPy, on the CPU), then plain torch arithmetic.

Slow and obviously correct; runs on every device (z is made on the CPU and copied over).
"""

from __future__ import annotations

import torch

from zotune import rng

__all__ = ["BACKEND", "axpy", "fill"]


def _z(distribution: str, seed: int, key: int, start: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(rng.z(distribution, seed, key, start, n)).to(device)


def fill(x: torch.Tensor, distribution: str, seed: int, key: int, start: int) -> None:
    x.copy_(_z(distribution, seed, key, start, x.numel(), x.device))


def axpy(x: torch.Tensor, distribution: str, key: int, start: int, scale: float, terms) -> None:
    if scale != 1.0:
        x.mul_(scale)
    for seed, coef in terms:
        x.add_(_z(distribution, seed, key, start, x.numel(), x.device), alpha=coef)


def _supports(device: torch.device) -> bool:
    return True


from zotune.kernels import Backend  # noqa: E402

BACKEND = Backend("reference", fill, axpy, _supports, priority=0)
