"""Sparse-MeZO's directions (arXiv 2402.15751): ``u = m * z`` with ``m`` a magnitude mask of each matrix.

:func:`magnitude_mask` packs the mask one bit a parameter from the clean weights at the start of a
step; :func:`masked_sweep_` moves one tensor along ``m * z``, through the backend's one-pass
``masked_axpy`` where it has one (numba, Triton) or a chunked torch path with the same numbers.
:func:`zotune.optim.functional.sweep_` dispatches here when it is given masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from zotune import kernels, rng
from zotune.optim.chunks import chunk_size, flat_view, float_work, write_back

__all__ = ["MASK_SAMPLE", "below", "magnitude_mask", "magnitude_threshold", "masked_sweep_", "unpack_mask"]

MASK_SAMPLE = 1 << 16  # elements of a tensor, evenly strided, whose magnitudes set its threshold
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def magnitude_mask(
    p: torch.Tensor, sparsity: float, *, chunk: int = 1 << 20, backend: str | None = None
) -> torch.Tensor:
    """Sparse-MeZO's mask of one tensor, packed 8 elements a byte (bit i of byte k: element 8k + i).

    m = |theta| <= h with h the ``1 - sparsity`` quantile of |theta| over at most ~2 x :data:`MASK_SAMPLE`
    elements taken at a fixed stride (``h`` is the ``ceil((1 - sparsity) s)``-th smallest of the s sampled
    magnitudes, an element's own value, so every device and every run finds the same one). A pure function
    of the tensor's bits: the optimizer computes it from the clean weights at the start of a step, replay
    from the same weights, and neither keeps it past the step (memory: one bit a parameter while it lives).
    Hand-written because no library packs a boolean tensor into bits in torch (numpy's packbits would
    copy through the host); a backend with ``pack_mask`` (numba) packs a float32 tensor in one pass instead
    of this chunked torch loop, bit for bit the same (``backend`` as in :func:`sweep_`).
    """
    flat = flat_view(p)
    n = flat.numel()
    h = magnitude_threshold(p, sparsity)
    bits = torch.zeros((n + 7) // 8, dtype=torch.uint8, device=p.device)
    be = kernels.select(p.device, backend)
    if be.pack_mask is not None and flat.dtype == torch.float32:  # one pass, no temporaries (the same bits)
        be.pack_mask(flat, float(h), bits)
        return bits
    weights = _BITS.to(p.device)
    chunk -= chunk % 8
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        m = part.abs().float() <= h
        if m.numel() % 8:
            m = torch.cat([m, m.new_zeros(8 - m.numel() % 8)])
        torch.sum(
            m.view(-1, 8).to(torch.uint8) * weights,
            dim=1,
            dtype=torch.uint8,
            out=bits[start // 8 : (start + m.numel()) // 8],
        )
    return bits


def magnitude_threshold(p: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sparse-MeZO's threshold h of one tensor (a float32 scalar tensor): the ``ceil((1 - sparsity) s)``-th smallest
    of s magnitudes sampled at a fixed stride (:func:`magnitude_mask`); the tensor's mask is ``|theta| <= h``."""
    if hasattr(p, "placements"):
        raise ValueError("sparse directions need whole tensors: a DTensor (FSDP2 shard) has no whole-tensor threshold")
    flat = flat_view(p)
    n = flat.numel()
    stride = max(1, n // MASK_SAMPLE)
    sample = flat[::stride].abs().float()
    k = min(sample.numel(), max(1, math.ceil((1.0 - sparsity) * sample.numel())))
    if sample.device.type == "cpu":  # numpy's introselect: the same k-th smallest, ~12x torch's kthvalue here
        return torch.tensor(np.partition(sample.detach().numpy(), k - 1)[k - 1])
    return sample.kthvalue(k).values


def below(p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The mask ``|theta| <= h`` of a tensor as booleans of its shape (one tensor's, for a moment: GRZO's)."""
    return p.detach().abs().float() <= h.to(p.device)


def unpack_mask(bits: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Elements ``start .. start + count - 1`` of a packed mask as float32 0 / 1 (``start`` a multiple of 8)."""
    b = bits[start // 8 : (start + count + 7) // 8]
    return (b.unsqueeze(1) & _BITS.to(b.device)).ne(0).view(-1)[:count].float()


def masked_sweep_(p, key, bits, terms, scale, distribution, rounding_seed, backend) -> None:
    """theta <- scale theta + sum(c m z): a chunk of float32 work, its z and its unpacked mask at a time."""
    if distribution not in rng.DISTRIBUTIONS:
        raise ValueError(
            f"sparse directions draw element-wise z ({', '.join(rng.DISTRIBUTIONS)}), not {distribution!r}"
        )
    be = kernels.select(p.device, backend)
    flat = flat_view(p)
    n, chunk = flat.numel(), chunk_size(be) - chunk_size(be) % 8
    fused = be.masked_axpy is not None and len(terms) <= 2  # the backend's one pass: z, mask and update
    zbuf = None if fused else torch.empty(min(chunk, n), dtype=torch.float32, device=p.device)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        work = float_work(part)
        if fused:
            chunk_bits = bits[start // 8 : (start + part.numel() + 7) // 8]
            be.masked_axpy(work, distribution, key, start, scale, terms, chunk_bits)
            write_back(part, work, rounding_seed, key, start, be)
            continue
        z, m = zbuf[: part.numel()], unpack_mask(bits, start, part.numel())
        if scale != 1.0:
            work.mul_(scale)
        for seed, c in terms:
            be.fill(z, distribution, int(seed), key, start)
            work.addcmul_(m, z, value=float(c))
        write_back(part, work, rounding_seed, key, start, be)
