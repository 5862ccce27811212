"""Zeroth-order optimizers. The classes keep bookkeeping; :mod:`.functional` does the tensor work."""

from zotune.optim.accumulate import accumulate
from zotune.optim.mezo import MeZO, NonFiniteLossError

__all__ = ["MeZO", "NonFiniteLossError", "accumulate"]
