"""Layerwise scales: the per-tensor factors of a step's directions (paper Appendix B), registered by name.

A step may perturb tensor l along ``p_l u_l`` and update along ``s_l u_l`` (:class:`zotune.optim.step.StepPlan`).
Each entry of :data:`SCALES` decides them for step t, keeps what it needs between steps, says what the
trajectory header and the optimizer state hold of it, and tells replay the probes' factors from the
recorded s_l ("L" records). :class:`zotune.MeZO` (``layerwise=``) and :func:`zotune.replay` both take
the object from here.
"""

from __future__ import annotations

import warnings

from zotune.optim import variants
from zotune.optim.step import LayerProbes
from zotune.trajectory import LayerProbe

__all__ = ["SCALES", "GradNorm", "NoScales", "ParamNorm", "Scales", "make_scales"]


class Scales:
    """No per-tensor factor (plain MeZO): the interface, and ``"none"``."""

    name = "none"

    def header(self, names) -> dict:
        """The trajectory header's keys for this choice (none for plain MeZO, so its files are unchanged)."""
        return {} if self.name == "none" else {"layerwise": self.name}

    def state(self) -> dict:
        """What the optimizer state keeps of it (JSON)."""
        return {}

    def load(self, state: dict) -> None:
        pass

    def for_step(self, opt, t: int, closure, eps: float) -> tuple[list[float] | None, list[float] | None]:
        """(s_l of the update, p_l of the probes where they differ; None: no factor) for step t of ``opt``."""
        return None, None

    def probe_scales(self, scales: list[float]) -> list[float] | None:
        """Replay: the probes' factors p_l from the recorded s_l (None: the same as s_l)."""
        return None


NoScales = Scales


class ParamNorm(Scales):
    """``s_l = ||theta_l|| / sqrt(d_l)`` at the start of the step, for the probes and the update alike."""

    name = "param-norm"

    def for_step(self, opt, t, closure, eps):
        return variants.layer_scales(opt._all()[0]), None


class GradNorm(Scales):
    """The authors' Appendix B variant: per-layer probes estimate c_l ~ ||grad_l L|| (every ``every`` steps; 0:
    once), then layer l is probed along ``z / c_l`` and updated along ``c_l z``
    (:func:`zotune.optim.variants.grad_norm_scales`)."""

    name = "grad-norm"

    def __init__(self, every: int = 0, probes: int = 1):
        self.every, self.probes = every, probes
        self.norms: list[float] | None = None  # c_l per tensor, once estimated
        self.step: int | None = None  # the step whose probes estimated them

    def header(self, names):
        return {
            **super().header(names),
            "layer_groups": variants.layer_groups(names),
            "grad_norm_every": self.every,
            "grad_norm_probes": self.probes,
        }

    def state(self):
        return {"layer_norms": self.norms, "norms_step": self.step}

    def load(self, state):
        self.norms, self.step = state.get("layer_norms"), state.get("norms_step")

    def for_step(self, opt, t, closure, eps):
        if self.norms is None or (self.every and t - self.step >= self.every):
            self._estimate(opt, t, closure, eps)
        return self.norms, variants.inverse_scales(self.norms)

    def probe_scales(self, scales):
        return variants.inverse_scales(scales)

    def _estimate(self, opt, t: int, closure, eps: float) -> None:
        """The per-layer probe pass: c_l = sqrt(mean g_l^2), g_l from layer l perturbed alone by +-eps z."""
        layers = variants.layer_groups([e["name"] for e in opt._table])
        probes = LayerProbes(opt._directions(), layers, t, self.probes, eps)
        try:
            squares = probes.run(opt._evaluator(closure))
        except BaseException:
            probes.undo()
            raise
        finally:
            opt._in_step = False
            opt._record(LayerProbe(t, self.probes, probes.applied))
        missing = sum(1 for q in squares if not q)
        if missing:
            warnings.warn(
                f"step {t}: {missing} of {len(layers)} layers had no finite probe loss; their gradient "
                "norms were filled in from the others",
                RuntimeWarning,
                stacklevel=5,
            )
        mean_sq = [sum(q) / len(q) if q else None for q in squares]  # as written before: the bits of c_l
        self.norms = variants.grad_norm_scales(mean_sq, layers, [p.numel() for p in opt._all()[0]])
        self.step = t


SCALES: dict[str, type[Scales]] = {"none": NoScales, "param-norm": ParamNorm, "grad-norm": GradNorm}


def make_scales(name: str, *, every: int = 0, probes: int = 1) -> Scales:
    """The registered choice ``name`` (``every`` and ``probes`` go to the gradient-norm one)."""
    cls = SCALES.get(name)
    if cls is None:
        raise ValueError(f"unknown layerwise scaling {name!r}; choose one of {', '.join(SCALES)}")
    return cls(every, probes) if cls is GradNorm else cls()
