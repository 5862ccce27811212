"""Kinds of direction: what a step's perturbations u_j are made of, registered by name (``distribution=``).

A kind says how direction j of step t is keyed (its seed, or the pair of seeds of its factors), which
stream the sweeps of :mod:`zotune.optim.functional` draw for it, and what it is: element-wise z (which
the stored moments, HiZOO's diagonal, Sparse-MeZO's masks and the layerwise factors need) or factors of
a matrix. :class:`zotune.optim.step.Directions` applies a kind to a run's tensors; the optimizer and
:func:`zotune.replay` take it from :data:`KINDS` by the name a trajectory header records.
"""

from __future__ import annotations

from zotune import rng

__all__ = ["KINDS", "LOWRANK_V_INDEX", "Kind", "LowRank", "Sphere", "SubZero", "Subspace", "get", "register"]

LOWRANK_V_INDEX = 1 << 31  # perturbation indices of the low-rank V factors (n-SPSA uses j < 100, probes < 2^31)


class Kind:
    """Element-wise z of the keyed stream ``name`` (``"gaussian"``, ``"rademacher"``, ``"gaussian-fast"``:
    :mod:`zotune.rng`)."""

    elementwise = True  # u is z (times scalars) element by element
    sphere = False  # the sweeps carry the factor sqrt(d) / ||x|| of the draw (Directions.factor)

    def __init__(self, name: str):
        self.name = name

    def stream(self, rank: int) -> str:
        """The distribution string the functional sweeps draw (a factor kind appends its rank)."""
        return self.name

    def seed(self, seed0: int, t: int, j: int, every: int):
        """Direction j of step t: its 64-bit seed (a factor kind: the pair of its factors' seeds)."""
        return rng.step_seed(seed0, t, j)


class Sphere(Kind):
    """z uniform on the sphere of radius sqrt(d): the Gaussian stream, rescaled by its norm over every tensor."""

    sphere = True

    def stream(self, rank):
        return "gaussian"


class LowRank(Kind):
    """LOZO's U V^T / sqrt(rank) on each matrix (arXiv 2410.07698): U drawn each step, V every ``every`` steps,
    each direction its own V; vectors move along the Gaussian z of U's seed."""

    elementwise = False
    shared_v = False

    def stream(self, rank):
        return f"{self.name}:{rank}"

    def seed(self, seed0, t, j, every):
        v = LOWRANK_V_INDEX + (0 if self.shared_v else j)
        return rng.step_seed(seed0, t, j), rng.step_seed(seed0, t // every, v)


class Subspace(LowRank):
    """ZO-Muon's P Psi on each matrix (arXiv 2602.17155): P orthonormal, one for all of a step's directions and
    redrawn every ``every`` steps, Psi Gaussian each direction; other tensors have no part in it."""

    shared_v = True


class SubZero(Subspace):
    """SubZero's U Z V^T on each matrix (arXiv 2410.08989): U and V orthonormal, one pair for all of a step's
    directions and redrawn every ``every`` steps, Z an r x r Gaussian each direction, scaled by sqrt(m n) / r so
    that its entries have MeZO's unit variance; vectors move along Gaussian z, as LOZO's."""


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add a kind to :data:`KINDS` (names are unique; a trajectory header records the name)."""
    if kind.name in KINDS:
        raise ValueError(f"direction kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


for _k in (
    Kind("gaussian"),
    Kind("rademacher"),
    Kind("gaussian-fast"),
    Sphere("sphere"),
    LowRank("lowrank"),
    Subspace("subspace"),
    SubZero("subzero"),
):
    register(_k)


def get(name: str) -> Kind:
    """The registered kind ``name``, or ValueError listing the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown distribution {name!r}; choose one of {', '.join(KINDS)}") from None
