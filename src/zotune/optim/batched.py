r"""A closure that can evaluate a step's perturbed points in one batched forward (``MeZO(batched=True)``).

FZOO (arXiv 2506.09034, §3.2) takes its N + 1 losses in one forward pass over N + 1 copies of the
weights instead of N + 1 passes one after another: on a GPU, where a small batch leaves the device
idle, the points then run in parallel. :class:`BatchedClosure` wraps the usual loss closure; called
with no argument it is that closure (a sequential step), and :meth:`BatchedClosure.at` evaluates it at
a stack of weights with :func:`torch.func.vmap` over :func:`torch.func.functional_call`, so any
Hugging Face model (or module) runs unchanged: the closure sees the module's parameters replaced by
one copy per vmapped lane. Attention through ``scaled_dot_product_attention`` has no batching rule in
torch yet, so vmap loops over the lanes there (correct, slower); ``attn_implementation="eager"`` batches
everything.

Written on torch.func rather than by hand (a parallel copy of every layer, as the FZOO authors do) so
that no model code is touched. Memory: the copies of the trainable parameters (FZOO: N + 1 of them,
which :class:`zotune.optim.step.BatchedProbe` builds) and one batch's activations per copy, at once;
with LoRA, prefix or head tuning the copies are small. On the 2-core CPU where the benchmark runs, a
batched FZOO step was about 1.2x slower than the sequential one (the same FLOPs, and a loop in
attention), so it is for accelerators; ``benchmarks/batched.py`` measures both side by side. Full,
LoRA, prefix and head tuning run batched (tested through the training loop). Not yet with
:func:`zotune.distributed.all_reduce_closure` (its closure has no :meth:`BatchedClosure.at`: the step
says so) nor the Hugging Face Trainer integration.

Example::

    opt = zotune.FZOO(model.named_parameters(), lr=5e-6, batched=True)
    for batch in loader:
        opt.step(zotune.BatchedClosure(model, lambda: model(**batch).loss))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["BatchedClosure"]


class _Call(torch.nn.Module):
    """``functional_call`` runs a module's forward; this one's forward is the closure, over ``self.model``."""

    def __init__(self, model: torch.nn.Module, fn: Callable[[], torch.Tensor]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self):
        return self.fn()


class BatchedClosure:
    """``closure()`` as usual, and :meth:`at`: the closure at several weight sets in one vmapped forward.

    Args:
        model: the module whose parameters the optimizer trains (the closure must run through it).
        closure: the loss closure (no backward); it must return a tensor and must not read values out of
            the model's outputs into Python (``.item()``, ``float()``): vmap cannot run those.
    """

    def __init__(self, model: torch.nn.Module, closure: Callable[[], torch.Tensor]):
        self.model, self.closure = model, closure
        self._call = _Call(model, closure)
        self._names = {id(p): f"model.{name}" for name, p in model.named_parameters()}

    def __call__(self):
        return self.closure()

    def at(self, params: Sequence[torch.Tensor], stacks: Sequence[torch.Tensor]) -> torch.Tensor:
        """The losses with each of ``params`` replaced by lane k of its stack (``(points, *shape)``), for every k.

        ``params`` are the optimizer's tensors (parameters of ``model``); the rest of the model is shared.
        """
        values = {}
        for p, stack in zip(params, stacks, strict=True):
            name = self._names.get(id(p))
            if name is None:
                raise ValueError(
                    "BatchedClosure: the optimizer trains a tensor that is not a parameter of the model it was given"
                )
            values[name] = stack
        with warnings.catch_warnings():  # said once, in the module docstring, rather than at every step
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            out = torch.func.vmap(lambda v: torch.func.functional_call(self._call, v, ()), randomness="different")(
                values
            )
        if not (isinstance(out, torch.Tensor) and out.dim() == 1):
            raise ValueError("BatchedClosure: the closure must return a scalar loss tensor")
        return out
