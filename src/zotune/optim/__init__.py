"""Zeroth-order optimizers. The classes keep bookkeeping; :mod:`.functional` does the tensor work.

Start with :mod:`.algorithm`: MeZO (the paper's Algorithm 1) in one page, the oracle the optimizers are
tested against.
"""

from zotune.optim.accumulate import accumulate
from zotune.optim.batched import BatchedClosure
from zotune.optim.factory import make_optimizer
from zotune.optim.forward_grad import ForwardGradient
from zotune.optim.grzo import GRZO
from zotune.optim.mezo import FZOO, HiZOO, KerZOO, MeZO, MeZOAdam, MeZOMomentum, NonFiniteLossError, ZOMuon

__all__ = [
    "BatchedClosure",
    "FZOO",
    "ForwardGradient",
    "GRZO",
    "HiZOO",
    "KerZOO",
    "MeZO",
    "MeZOAdam",
    "MeZOMomentum",
    "NonFiniteLossError",
    "ZOMuon",
    "accumulate",
    "make_optimizer",
]
