"""Estimators: where a step takes its losses, and how they become one coefficient per direction.

An estimator is the part of a zeroth-order step that says, for n directions u_0 .. u_{n-1}:

- :meth:`Estimator.sweeps`: the probe sweep before each loss evaluation, as ``(j, multiple of eps)``
  pairs (the parameters move by the sum of ``multiple * eps * u_j``);
- :meth:`Estimator.carry_after`: the perturbation the parameters hold after sweep k, which the
  update (or an interruption) removes;
- :meth:`Estimator.estimate`: the float32 coefficients c_j from the losses, in evaluation order. The
  update rule then moves along ``-lr/n sum_j c_j u_j`` (:mod:`zotune.optim.variants`), and the
  trajectory records the c_j, so replay needs only :meth:`sweeps` and :meth:`carry_after`.

The estimators are registered by name in :data:`ESTIMATORS` (``MeZO(estimator=...)``,
``--optimizer.estimator``); the optimizer and :func:`zotune.replay` take the same object from it, so
they cannot lay a step out differently. A skipped step's record stores the failed evaluation but not
n, so the first k sweeps must not depend on n (each estimator below appends per direction).
An estimator may also return extra scalars (:meth:`Estimator.extras`, recorded beside the step) for
an update rule that needs more than the coefficients (HiZOO's curvature), and may probe a direction at a
keyed multiple of eps (:meth:`Estimator.radius`, KerZOO's random scale r): the sweeps' multiples and
what a step carries are then scaled by r_j, which replay derives from the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from zotune import rng
from zotune.optim import functional

__all__ = ["ESTIMATORS", "FZOO", "GRZO", "Estimator", "HiZOO", "KerZOO", "OneSided", "TwoSided", "get", "register"]


class Estimator:
    """The interface (see the module docstring); subclasses set ``name`` and the flags."""

    name = ""
    fusable = False  # its first sweep is +eps u_0, so the previous update may apply it (fuse_next)
    min_n = 1  # the fewest directions it is defined for
    max_n: int | None = None  # the most (None: any)
    n_extras = 0  # scalars besides the coefficients that the update needs (recorded: trajectory "K" records)
    rule: str | None = None  # the update rule it needs (variants.RULES), if it needs one

    def sweeps(self, n: int) -> list[list[tuple[int, float]]]:
        raise NotImplementedError

    def carry_after(self, k: int) -> tuple[int, float] | None:
        raise NotImplementedError

    def estimate(self, losses: list[float], n: int, eps: float, radii: Sequence[float] = ()) -> list[float]:
        """The coefficients; ``radii`` are :meth:`radius` of the step's directions (used by KerZOO only)."""
        raise NotImplementedError

    def radius(self, seed) -> float:
        """The multiple of eps at which the direction with this seed is probed (1.0 but for KerZOO)."""
        return 1.0

    def extras(self, losses: list[float], n: int, eps: float) -> tuple[float, ...]:
        """The ``n_extras`` float32 scalars of a complete probe (none by default)."""
        return ()

    def where(self, phase: int, n: int) -> str:
        """Where evaluation ``phase`` (1-based) was taken, for messages."""
        raise NotImplementedError

    def passes(self, n: int) -> int:
        """Forward passes (loss evaluations) of one step with n directions."""
        return len(self.sweeps(n))


class TwoSided(Estimator):
    r"""The paper's SPSA (arXiv 2305.17333, Algorithm 1 and eq. (1) with n-SPSA, §2.2)::

        c_j = (L(theta + eps u_j) - L(theta - eps u_j)) / (2 eps)

    Sweeps ``[+u0], [-2 u0], [+u0 +u1], [-2 u1], ...``: 2n evaluations, L+_j then L-_j. The first
    sweep may be fused into the previous step's update (``fuse_next``).
    """

    name = "two-sided"
    fusable = True

    def sweeps(self, n):
        out: list[list[tuple[int, float]]] = []
        for j in range(n):
            out.append([(j - 1, 1.0), (j, 1.0)] if j else [(0, 1.0)])
            out.append([(j, -2.0)])
        return out

    def carry_after(self, k):
        return (k // 2, 1.0 if k % 2 == 0 else -1.0)

    def estimate(self, losses, n, eps, radii=()):
        return [functional.f32((losses[2 * j] - losses[2 * j + 1]) / (2 * eps)) for j in range(n)]

    def where(self, phase, n):
        j = (phase - 1) // 2
        return ("theta + eps*z" if phase % 2 else "theta - eps*z") + (f"_{j}" if n > 1 else "")


class OneSided(Estimator):
    r"""Forward differences with the unperturbed loss taken once (paper §2.2)::

        c_j = (L(theta + eps u_j) - L(theta)) / eps

    Sweeps ``[], [+u0], [-u0 +u1], ...``: n + 1 evaluations, L(theta) first.
    """

    name = "one-sided"

    def sweeps(self, n):
        out: list[list[tuple[int, float]]] = [[]]
        for j in range(n):
            out.append([(j - 1, -1.0), (j, 1.0)] if j else [(0, 1.0)])
        return out

    def carry_after(self, k):
        return None if k == 0 else (k - 1, 1.0)

    def estimate(self, losses, n, eps, radii=()):
        return [functional.f32((losses[j + 1] - losses[0]) / eps) for j in range(n)]

    def where(self, phase, n):
        return "theta" if phase == 1 else "theta + eps*z" + (f"_{phase - 2}" if n > 1 else "")


class FZOO(OneSided):
    r"""FZOO's normalized one-sided estimate (Dang et al., arXiv 2506.09034, Algorithm 1)::

        l_0 = L(theta),  l_i = L(theta + eps u_i),  sigma = std(l_1 .. l_N)   (sample std, N - 1)
        g = 1/(eps N) sum_i (l_i - l_0) u_i,        theta <- theta - lr g / sigma

    i.e. c_j = (l_j - l_0) / (eps sigma), the one-sided coefficients divided by the spread of the
    perturbed losses: a normalized-SGD step, larger where the losses are flat. The paper draws u_i
    Rademacher (``distribution="rademacher"``) with N = 8; :class:`zotune.FZOO` sets those defaults.
    The N + 1 evaluations run one after another on the same in-place weights, so memory stays that of
    inference; or, with ``batched=True`` (:mod:`zotune.optim.batched`), as the paper's one batched forward
    over N + 1 copies of the trainable weights, at N + 1 times their memory.

    The step's size per element is about ``lr / (eps sqrt(N))`` whatever the loss's scale, so its
    learning rate is not MeZO's: tune it on its own (``benchmarks/convergence.py``). sigma = 0 (all
    perturbed losses equal) gives no direction: the step is skipped, as for a non-finite loss.
    """

    name = "fzoo"
    min_n = 2

    def estimate(self, losses, n, eps, radii=()):
        perturbed = losses[1 : n + 1]
        mean = math.fsum(perturbed) / n
        sigma = math.sqrt(math.fsum((x - mean) ** 2 for x in perturbed) / (n - 1))
        if sigma == 0.0:
            return [math.nan] * n
        return [functional.f32((x - losses[0]) / (eps * sigma)) for x in perturbed]


class HiZOO(Estimator):
    r"""HiZOO's three evaluations (Zhao et al., arXiv 2402.15173, Algorithm 1)::

        l_0 = L(theta),  l+- = L(theta +- eps u),   u = s z  (s: the preconditioner, zotune.HiZOO)
        c = (l+ - l-) / (2 eps),   kappa = |l+ + l- - 2 l_0| / (2 eps^2)

    Sweeps ``[], [+u], [-2u]``; c is the coefficient, kappa the extra scalar the update rule uses to move
    its diagonal (:class:`zotune.optim.variants.HiZOORule`). One direction a step, as the paper.
    """

    name = "hizoo"
    max_n = 1
    n_extras = 1
    rule = "hizoo"

    def sweeps(self, n):
        return [[], [(0, 1.0)], [(0, -2.0)]]

    def carry_after(self, k):
        return None if k == 0 else (0, 1.0 if k == 1 else -1.0)

    def estimate(self, losses, n, eps, radii=()):
        return [functional.f32((losses[1] - losses[2]) / (2 * eps))]

    def extras(self, losses, n, eps):
        return (functional.f32(abs(losses[1] + losses[2] - 2 * losses[0]) / (2 * eps * eps)),)

    def where(self, phase, n):
        return ("theta", "theta + eps*u", "theta - eps*u")[phase - 1]


class KerZOO(TwoSided):
    r"""KerZOO's kernel-weighted two-sided estimate (Mi et al., arXiv 2505.18886)::

        r_j ~ U(-1, 1)   (keyed by the direction's seed: zotune.rng.radius)
        c_j = K(r_j) (L(theta + eps r_j u_j) - L(theta - eps r_j u_j)) / (2 eps)

    and the update moves along ``-lr/n sum_j c_j u_j`` as MeZO's. Expanding the difference in eps,
    c_j = K(r) r u'g + eps^2 K(r) r^3 D3(u)/6 + O(eps^4): a kernel with E[r K(r)] = 1 keeps the
    gradient term's mean (the step is on MeZO's scale, so are its rates) and E[r^3 K(r)] = 0 removes
    the eps^2 bias. ``kernel="cubic"`` (``kerzoo``) is that kernel, K(r) = 15 r (5 - 7 r^2) / 4;
    ``kernel="linear"`` (``kerzoo-linear``) is K(r) = 3 r, which keeps the mean and shrinks the bias to
    3/5 of MeZO's. The price is variance: E[(r K(r))^2] is 6.25 (cubic) and 1.8 (linear) against
    MeZO's 1, so a step's noise is 2.5x (1.34x) MeZO's at the same rate.

    Two sweeps of the direction and a restore, as MeZO; the scale r lives in the probes only, so
    ``fuse_next`` (which would apply the next step's +eps u before its r is drawn into the plan) is
    not offered. Memory: inference's. The update rule I followed is the method's published form as
    summarized by a third-party reading of the paper (the paper's own text was not available to me):
    the kernels' moment conditions are checked in tests/test_kerzoo.py.
    """

    fusable = False

    def __init__(self, name: str = "kerzoo", kernel: str = "cubic"):
        if kernel not in self.KERNELS:
            raise ValueError(f"unknown KerZOO kernel {kernel!r}; choose one of {', '.join(self.KERNELS)}")
        self.name, self.kernel = name, kernel

    KERNELS = {
        "cubic": lambda r: 3.75 * r * (5.0 - 7.0 * r * r),  # E[r K] = 1, E[r^3 K] = 0
        "linear": lambda r: 3.0 * r,  # E[r K] = 1
    }

    def radius(self, seed) -> float:
        return rng.radius(seed[0] if isinstance(seed, tuple) else seed)  # low-rank: the seed of U

    def estimate(self, losses, n, eps, radii=()):
        k = self.KERNELS[self.kernel]
        return [functional.f32(k(radii[j]) * (losses[2 * j] - losses[2 * j + 1]) / (2 * eps)) for j in range(n)]

    def where(self, phase, n):
        j = (phase - 1) // 2
        return ("theta + eps*r*z" if phase % 2 else "theta - eps*r*z") + (f"_{j}" if n > 1 else "")


class GRZO(Estimator):
    r"""GRZO's group-relative two-sided estimate (Tan et al., arXiv 2606.02857), one direction per example.

    Every row i of the batch has its own direction Delta_i (:mod:`zotune.optim.flipout`), applied by
    :class:`zotune.GRZO`'s forward hooks, not swept into the weights; two evaluations give each example q
    (a question: its rows are its options) its losses l+_q and l-_q at theta +- eps Delta, and::

        delta_q = (l+_q - l-_q) / 2,   a_q = delta_q / (std(delta) + 1e-8)     (sample std over the B examples)
        c_i = a_q(i) / (2 eps B)                                              for every row i of example q

    the coefficients of the update ``theta <- theta - lr sum_i c_i Delta_i`` (``variants.GRZORule``). The
    normalisation is the authors' released code's ("two_norm": no mean subtracted, two-sided differences
    have mean ~0; their README writes the update as U (.) (R^T diag(a) S) / (2 sigma B)). The coefficients
    come from per-example losses, so :meth:`estimate` (scalar losses) does not apply: :meth:`row_coefficients`.

    ``"grzo-raw"`` (``normalised=False``, the authors' ``--estimation_side two``) leaves out the division by the
    spread: ``c_i = delta_q(i) / (2 eps B)``, B two-sided MeZO estimates averaged, whose step shrinks with the loss
    differences as MeZO's does (the normalised step keeps its size).
    """

    rule = "grzo"

    def __init__(self, name: str = "grzo", normalised: bool = True):
        self.name, self.normalised = name, normalised

    def sweeps(self, n):
        return [[], []]  # both evaluations at the weights as they are: the hooks perturb each row

    def carry_after(self, k):
        return None

    def estimate(self, losses, n, eps, radii=()):
        raise TypeError("GRZO's coefficients come from per-example losses: use zotune.GRZO")

    def row_coefficients(self, plus, minus, rows: Sequence[int], eps: float) -> list[float]:
        """c_i for every row (float32), from the B examples' losses l+ and l- and each example's row count."""
        b = len(plus)
        delta = [(p - m) / 2.0 for p, m in zip(plus, minus, strict=True)]
        scale = 1.0
        if self.normalised:
            if b < 2:
                return [math.nan] * sum(rows)
            mean = math.fsum(delta) / b
            scale = math.sqrt(math.fsum((d - mean) ** 2 for d in delta) / (b - 1)) + 1e-8
        out = []
        for d, k in zip(delta, rows, strict=True):
            out += [functional.f32(d / scale / (2.0 * eps * b))] * k
        return out

    def where(self, phase, n):
        return ("theta + eps*Delta_i (each example's own)", "theta - eps*Delta_i")[phase - 1]


ESTIMATORS: dict[str, Estimator] = {}


def register(estimator: Estimator) -> Estimator:
    """Add an estimator to :data:`ESTIMATORS` (names are unique; a trajectory header records the name)."""
    if estimator.name in ESTIMATORS:
        raise ValueError(f"estimator {estimator.name!r} is already registered")
    ESTIMATORS[estimator.name] = estimator
    return estimator


for _e in (
    TwoSided(),
    OneSided(),
    FZOO(),
    HiZOO(),
    KerZOO(),
    KerZOO("kerzoo-linear", "linear"),
    GRZO(),
    GRZO("grzo-raw", normalised=False),
):
    register(_e)


def get(name: str) -> Estimator:
    """The registered estimator ``name``, or ValueError listing the known ones."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}") from None
