"""Parameter groups for weight decay, chosen by tensor rank (not by name), for every optimizer we build.

Matrices (rank >= 2: linear and embedding weights) decay; vectors and scalars (biases, normalisation
gains) do not. The rank says what a tensor is whatever the model calls it, where a name pattern such as
``"bias"`` or ``"LayerNorm.weight"`` misses the layers of the next architecture.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["decay_groups", "decays"]


def decays(param) -> bool:
    """Whether weight decay applies to ``param`` (a tensor or a ``(name, tensor)`` pair): rank >= 2."""
    tensor = param[1] if isinstance(param, tuple) else param
    return tensor.ndim >= 2


def decay_groups(params: Iterable, weight_decay: float | None = None) -> list[dict]:
    """Split ``params`` into a decayed group (matrices) and a group with ``weight_decay=0.0`` (the rest).

    Args:
        params: tensors or ``(name, tensor)`` pairs, returned as they come, in their order.
        weight_decay: the decayed group's ``"weight_decay"``; ``None`` leaves it out, so the group takes
            the optimizer's default.

    Returns:
        The non-empty groups of ``[decayed, not decayed]``, as ``torch.optim`` parameter-group dicts.

    Example::

        torch.optim.AdamW(decay_groups(model.parameters(), 0.01), lr=1e-4)
    """
    params = list(params)
    decay = [p for p in params if decays(p)]
    no_decay = [p for p in params if not decays(p)]
    groups = []
    if decay:
        groups.append({"params": decay} if weight_decay is None else {"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
