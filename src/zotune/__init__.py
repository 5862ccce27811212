"""zotune: fine-tune language models with forward passes only (MeZO, arXiv 2305.17333)."""

from zotune import kernels, rng
from zotune.errors import UserError
from zotune.optim import (
    FZOO,
    GRZO,
    BatchedClosure,
    ForwardGradient,
    HiZOO,
    KerZOO,
    MeZO,
    MeZOAdam,
    MeZOMomentum,
    NonFiniteLossError,
    ZOMuon,
    accumulate,
    make_optimizer,
)
from zotune.trajectory import Trajectory, TrajectoryError, read_trajectory
from zotune.version import __version__

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
    "Trajectory",
    "TrajectoryError",
    "UserError",
    "ZOMuon",
    "__version__",
    "accumulate",
    "distributed",
    "get_task",
    "kernels",
    "list_tasks",
    "load_model",
    "make_optimizer",
    "read_trajectory",
    "replay",
    "rng",
]


def __getattr__(name):
    # The task and model layers import transformers; keep `import zotune` light for optimizer-only use.
    if name in ("get_task", "list_tasks"):
        from zotune import tasks

        return getattr(tasks, name)
    if name == "replay":  # with a run's start (zotune.start): in the loop's layer, which imports transformers
        from zotune.start import replay

        return replay
    if name == "distributed":
        import zotune.distributed as distributed

        return distributed
    if name == "load_model":
        from zotune.models import load_model

        return load_model
    raise AttributeError(f"module 'zotune' has no attribute {name!r}")
