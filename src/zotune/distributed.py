"""MeZO on ``torch.distributed``: data parallel with scalars only, and sharded parameters.

MeZO's update is determined by the step's seed and one scalar, so ranks need to agree on almost
nothing:

- **Data parallel.** Every rank holds the whole model and the same optimizer (same seed). Each
  computes the two losses on its shard of the batch; :func:`all_reduce_closure` averages each loss
  over the ranks with a one- or two-element ``all_reduce``; every rank then applies the identical
  update from the shared seed. A step communicates two all-reduces of 8 or 16 bytes, whatever the
  size of the model.
- **GRZO** (:class:`zotune.GRZO` with ``data_parallel=True``) needs every example's loss, not their mean:
  each rank runs its own examples, perturbed along the directions of their rows' places in the whole
  batch (ranks in order), and :func:`gather_lists` gathers the per-example losses (B floats a pass), so
  every rank computes the same coefficients and update as one process on the whole batch would.
- **Sharded parameters.** With FSDP2 (``fully_shard``) or row-sharded ``DTensor`` parameters each
  rank perturbs and updates only its local shard, generating z at the shard's global element
  offsets (:func:`zotune.optim.functional.local_shard`): no z is ever communicated, and the result
  equals unsharded training. The forward pass does its own gathers, as it would for inference.

Ranks that start with a different seed, step, hyper-parameters, parameter table or (optionally)
parameter values would diverge silently; :func:`check_consistent` detects that at start with one
small ``all_gather`` and raises on every rank.

Example (``torchrun --nproc_per_node 2 train.py``)::

    dist.init_process_group("gloo")            # "nccl" on GPUs
    opt = zotune.MeZO(model.named_parameters(), lr=1e-6, seed=0)
    zotune.distributed.check_consistent(opt)
    for batch in loader:                        # each rank loads its own shard of every batch
        opt.step(zotune.distributed.all_reduce_closure(lambda: model(**batch).loss))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["CommStats", "all_reduce_closure", "check_consistent", "comm_stats", "gather_lists", "rank", "world_size"]


@dataclass
class CommStats:
    """Collective traffic issued by this module on this rank: calls and payload bytes."""

    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.calls = 0
        self.bytes = 0


_STATS = CommStats()


def comm_stats() -> CommStats:
    """The running count of the collectives :func:`all_reduce_closure` and :func:`gather_lists` issued (``.reset()``
    zeroes it)."""
    return _STATS


def world_size(group=None) -> int:
    """The number of ranks in ``group`` (1 outside an initialised process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 outside an initialised process group)."""
    return dist.get_rank(group) if world_size(group) > 1 else 0


def _device(group) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo and the rest take CPU tensors.
    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_closure(
    closure: Callable[[], torch.Tensor | float], group=None, weight: float | Callable[[], float] | None = None
) -> Callable[[], torch.Tensor]:
    r"""A closure that returns the loss averaged over the ranks of ``group``.

    .. math:: L = \frac{\sum_r w_r L_r}{\sum_r w_r}

    with :math:`L_r` this rank's ``closure()`` and :math:`w_r` its weight (1 by default: a plain
    mean, exact when every rank's shard has the same size and the loss is a mean over its shard).
    Pass ``weight`` (a number, or a callable evaluated with the closure) — e.g. the number of
    examples or target tokens on this rank — when shards differ in size.

    Every rank calls the optimizer with the same seed and gets the same averaged losses, hence the
    same projected gradient and the same update: parameters stay identical on all ranks without
    being communicated. A non-finite loss on any rank makes the average non-finite on every rank,
    so all ranks skip (or raise) together. Communication: one ``all_reduce`` of 8 bytes per call
    (16 with a weight), i.e. 16 or 32 bytes per MeZO step.

    Outside an initialised process group (or with one rank) the closure is returned unchanged.
    """
    if world_size(group) == 1:
        return closure

    def reduced() -> torch.Tensor:
        loss = closure()
        value = float(loss)
        if weight is None:
            payload = torch.tensor([value], dtype=torch.float64, device=_device(group))
        else:
            w = float(weight() if callable(weight) else weight)
            payload = torch.tensor([value * w, w], dtype=torch.float64, device=_device(group))
        _STATS.calls += 1
        _STATS.bytes += payload.numel() * payload.element_size()
        dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
        total = payload.tolist()
        mean = total[0] / world_size(group) if weight is None else total[0] / total[1]
        out_device = loss.device if isinstance(loss, torch.Tensor) else "cpu"
        return torch.tensor(mean, dtype=torch.float64, device=out_device)

    return reduced


def gather_lists(
    values, group=None, *, lengths: list[int] | None = None, dtype: torch.dtype = torch.float64
) -> list[list]:
    """Every rank's list of numbers, in rank order: ``[rank 0's values, rank 1's, ...]`` on every rank.

    Lists may differ in length across ranks: one ``all_gather`` of the lengths (skipped when ``lengths``, every
    rank's length, is known), then one of the values padded to the longest. ``dtype`` carries them (float64 keeps
    Python floats exact; int64 for counts). Outside an initialised process group: ``[list(values)]``.
    """
    values = list(values)
    world = world_size(group)
    if world == 1:
        return [values]
    device = _device(group)
    if lengths is None:
        mine = torch.tensor([len(values)], dtype=torch.int64, device=device)
        seen = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(seen, mine, group=group)
        _STATS.calls += 1
        _STATS.bytes += 8
        lengths = [int(t) for t in seen]
    if len(lengths) != world or lengths[rank(group)] != len(values):
        raise ValueError(f"gather_lists: this rank has {len(values)} values, and lengths says {lengths}")
    width = max(lengths)
    padded = torch.zeros(max(width, 1), dtype=dtype, device=device)
    padded[: len(values)] = torch.tensor(values, dtype=dtype)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    _STATS.calls += 1
    _STATS.bytes += padded.numel() * padded.element_size()
    return [t[:n].cpu().tolist() for t, n in zip(gathered, lengths)]


def _digest(value) -> int:
    data = json.dumps(value, sort_keys=True, default=str).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")  # fits int64


def _values_checksum(optimizer) -> list[float] | None:
    # Local shards of sharded parameters differ by design: only whole (replicated) tensors are compared.
    sums = [0.0, 0.0]
    for group in optimizer.param_groups:
        for p in group["params"]:
            if hasattr(p, "placements"):
                continue
            x = p.detach().double()
            sums[0] += float(x.sum())
            sums[1] += float(x.abs().sum())
    return sums


def _fingerprint(optimizer, check_values: bool) -> dict:
    if hasattr(optimizer, "fingerprint"):  # zotune's optimizers: KeyedOptimizer.fingerprint
        facts = optimizer.fingerprint()
    else:  # another torch optimizer: the same facts, as far as it has them
        facts = {
            "seed": getattr(optimizer, "seed", None),
            "step": getattr(optimizer, "step_count", None),
            "eps": getattr(optimizer, "eps", None),
            "options": {k: getattr(optimizer, k, None) for k in ("distribution", "fuse_next", "stochastic_rounding")},
            "variant": None,
            "lr and weight decay": [[g.get("lr"), g.get("weight_decay")] for g in optimizer.param_groups],
            "parameter set": [[list(p.shape), str(p.dtype)] for g in optimizer.param_groups for p in g["params"]],
        }
    if check_values:
        facts["parameter values"] = _values_checksum(optimizer)
    return facts


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else f"{text[:60]}... (digest {_digest(value):014x})"


def check_consistent(optimizer, group=None, *, check_values: bool = True) -> None:
    """Raise ``RuntimeError`` on every rank unless all ranks agree on the optimizer's run.

    Compared: seed, step count, eps, options (distribution, fuse_next, stochastic rounding), the variant
    (estimator, n perturbations, layerwise scaling, momentum / Adam settings), each
    group's lr and weight decay, the parameter table (names, global shapes, dtypes) and, with
    ``check_values``, a float64 checksum of the parameter values (not of sharded ``DTensor``
    shards, which differ by design). A disagreement would otherwise make the ranks apply different
    updates and diverge silently. Cost: one ``all_gather`` of a few int64 digests per rank (and,
    only on a mismatch, one ``all_gather_object`` to name the differing values). Call it once
    after building (or resuming) the optimizer, on every rank; a no-op without a process group.
    """
    world = world_size(group)
    if world == 1:
        return
    facts = _fingerprint(optimizer, check_values)
    names = list(facts)
    mine = torch.tensor([_digest(facts[k]) for k in names], dtype=torch.int64, device=_device(group))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    differing = [k for i, k in enumerate(names) if not bool((table[:, i] == table[0, i]).all())]
    if not differing:
        return
    everyone: list = [None] * world
    dist.all_gather_object(everyone, {k: facts[k] for k in differing}, group=group)
    lines = []
    for k in differing:
        values = ", ".join(f"rank {r}: {_short(f[k])}" for r, f in enumerate(everyone))
        lines.append(f"  {k}: {values}")
    raise RuntimeError(
        "the ranks disagree on the MeZO run and would diverge silently:\n"
        + "\n".join(lines)
        + "\nbuild the optimizer identically on every rank (same seed, parameters, hyper-parameters and "
        "initial weights; load the same checkpoint when resuming)"
    )
