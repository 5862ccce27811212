"""Zeroth-order optimizers. The classes keep bookkeeping; :mod:`.functional` does the tensor work."""

from zotune.optim.accumulate import accumulate
from zotune.optim.factory import make_optimizer
from zotune.optim.forward_grad import ForwardGradient
from zotune.optim.mezo import MeZO, MeZOAdam, MeZOMomentum, NonFiniteLossError

__all__ = ["ForwardGradient", "MeZO", "MeZOAdam", "MeZOMomentum", "NonFiniteLossError", "accumulate", "make_optimizer"]
