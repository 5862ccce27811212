"""zotune: fine-tune language models with forward passes only (MeZO, arXiv 2305.17333)."""

__version__ = "0.1.0"

from zotune import kernels, rng  # noqa: E402
from zotune.optim import MeZO, NonFiniteLossError  # noqa: E402
from zotune.trajectory import Trajectory, TrajectoryError, read_trajectory, replay  # noqa: E402

__all__ = [
    "MeZO",
    "NonFiniteLossError",
    "Trajectory",
    "TrajectoryError",
    "__version__",
    "kernels",
    "read_trajectory",
    "replay",
    "rng",
]
