"""What every chunked torch sweep of :mod:`zotune.optim` shares: a parameter's flat view, its local shard,
the size of a chunk, float32 work on a chunk and its way back into the parameter's dtype.

A sweep that has no fused kernel (more than two terms, masks, factored directions, HiZOO's scaled ones,
the moments) walks a parameter in chunks of :func:`chunk_size` elements, works on each in float32
(:func:`float_work`) and stores it back rounded to nearest or stochastically (:func:`write_back`,
:func:`stochastic_round_`), so no temporary is larger than a chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from zotune import rng

__all__ = [
    "FALLBACK_CHUNK",
    "FLOAT_TYPES",
    "chunk_size",
    "f32",
    "flat_view",
    "float_work",
    "local_shard",
    "stochastic_round_",
    "write_back",
]

FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)


def f32(x: float) -> float:
    """``x`` rounded to float32 (as a Python float): every scalar a trajectory records is stored so."""
    return float(np.float32(x))


FALLBACK_CHUNK = 1 << 22  # elements: a torch path's temporaries stay under 16 MB of float32 on any backend


def chunk_size(be) -> int:
    """Elements per piece of a chunked torch path: the backend's chunk, at most :data:`FALLBACK_CHUNK` (Triton's
    is a whole tensor, which would make a float32 buffer the size of the largest parameter: an embedding's)."""
    return min(be.chunk, FALLBACK_CHUNK)


def flat_view(p: torch.Tensor) -> torch.Tensor:
    """p's elements as a 1-D view of its own storage (what a sweep writes into); a clear error if p is strided."""
    if not p.is_contiguous():
        raise ValueError(
            f"MeZO perturbs parameters in place and needs contiguous tensors; got one of shape "
            f"{tuple(p.shape)} with strides {p.stride()} (call .contiguous() on it before building the optimizer)"
        )
    return p.detach().view(-1)


def stochastic_round_(
    dst: torch.Tensor, src: torch.Tensor, seed: int, key: int, start: int, words_fn=None, *, on_device: bool = False
) -> None:
    """dst <- src (float32) rounded to dst's dtype, up or down with probability by distance.

    E[dst] = src exactly, so updates far below half an ulp survive on average. The uniform for
    element i is the keyed rounding stream (:func:`zotune.rng.rounding_words`): the reference's, or
    ``words_fn``'s (a backend's ``words``), which with ``on_device`` (the backend's ``device_words``)
    fills an int32 tensor where ``src`` lies rather than a host array copied over.
    """
    nearest = src.to(dst.dtype)
    diff = src - nearest.float()
    toward = torch.where(diff > 0, torch.inf, -torch.inf).to(dst.dtype)
    neighbour = torch.nextafter(nearest, toward)
    gap = neighbour.float() - nearest.float()
    prob = torch.where(gap != 0, diff / gap, torch.zeros_like(diff))
    if words_fn is not None and on_device:  # the top 24 bits of each word, as the host path takes them
        words = torch.empty(src.numel(), dtype=torch.int32, device=src.device)
        words_fn(words, seed, key, start)
        u = ((words >> 8) & 0xFFFFFF).float() * 2.0**-24  # exact: 24-bit integers and a power of two
    else:
        if words_fn is None:
            words = rng.rounding_words(seed, key, start, src.numel())
        else:  # a backend's fast generator of the same words
            words = np.empty(src.numel(), dtype=np.uint32)
            words_fn(words, seed, key, start)
        u = torch.from_numpy((words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)).to(src.device)
    dst.copy_(torch.where(u < prob, neighbour, nearest))


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's tensor, global element offset of its first element) of a parameter.

    A plain tensor is its own shard at offset 0. A ``DTensor`` (FSDP2 ``fully_shard``, or
    ``distribute_tensor``) sharded by rows (``Shard(0)``, on any number of mesh dimensions) or
    replicated holds one contiguous range of the flattened global tensor: z is generated at those
    global indices, so every rank perturbs its shard exactly as the unsharded tensor would be.
    """
    placements = getattr(p, "placements", None)
    if placements is None or not hasattr(p, "to_local"):
        return p, 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in placements:
        if not (isinstance(placement, Replicate) or (type(placement) is Shard and placement.dim == 0)):
            raise ValueError(
                f"MeZO perturbs sharded parameters only when they are split by rows (Shard(0)) or "
                f"replicated; got placements {tuple(placements)} for a tensor of shape {tuple(p.shape)} "
                "(shard on dimension 0, e.g. fully_shard's default)"
            )
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    local = p.to_local()
    if tuple(local.shape) != tuple(local_shape):
        raise ValueError(f"the local shard has shape {tuple(local.shape)}, expected {tuple(local_shape)}")
    row = 1
    for size in p.shape[1:]:
        row *= size
    return local, (offset[0] * row if len(offset) else 0)


def float_work(part: torch.Tensor) -> torch.Tensor:
    """The float32 values a chunk is worked on in: the chunk itself when float32, else a float32 copy."""
    return part.float() if part.dtype != torch.float32 else part


def write_back(part, work, rounding_seed, key, start, be) -> None:
    """Store ``work`` (float32) into ``part`` (a chunk of a parameter, elements ``start ..`` of key ``key``): nothing
    to do when they are the same tensor, else rounded to nearest or, with ``rounding_seed``, stochastically."""
    if work is part:
        return
    if rounding_seed is None:
        part.copy_(work)
    else:
        stochastic_round_(part, work, rounding_seed, key, start, be.words, on_device=be.device_words)
