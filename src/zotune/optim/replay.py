"""Replay: rebuild fine-tuned weights from the base weights and a trajectory, with no data and no forward pass.

Replay executes each recorded step with the optimizer's own description of it
(:mod:`zotune.optim.step`): the same probe sweeps laid out by the same estimator, the same undo of a
skipped step, and the update built by the same function from the recorded coefficients. Only the loss
evaluations differ: replay takes their outcome from the record. So a trajectory replays bit for bit on
the backend it was trained on, and every format-1 file (tests/data) still does.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from zotune.optim import estimators, variants
from zotune.optim.scales import make_scales
from zotune.optim.step import Directions, LayerProbes, Probe, StepPlan, recorded, update_of
from zotune.trajectory import (
    Extras,
    Flush,
    Hyper,
    LayerProbe,
    LayerScales,
    Skip,
    Step,
    Trajectory,
    TrajectoryError,
    read_trajectory,
)

__all__ = ["replay", "walk"]


def _resolve_params(target, header: dict) -> list[torch.Tensor]:
    """The tensors that the header's parameter table names, checked before anything is modified."""
    table = header["params"]
    if isinstance(target, torch.nn.Module):
        if not header.get("named", True):
            raise TrajectoryError(
                "this trajectory was recorded with unnamed parameters (keys are list positions): "
                "pass the same list of tensors to replay, not a module"
            )
        target = dict(target.named_parameters())
    if isinstance(target, Mapping):
        missing = [e["name"] for e in table if e["name"] not in target]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise TrajectoryError(
                f"the model has no parameter named {shown} ({len(missing)} of {len(table)} recorded "
                "parameters missing): this trajectory belongs to another model"
            )
        tensors = [target[e["name"]] for e in table]
    else:
        tensors = list(target)
        if len(tensors) != len(table):
            raise TrajectoryError(f"the trajectory records {len(table)} parameters, {len(tensors)} were given")
    for entry, p in zip(table, tensors):
        if list(p.shape) != entry["shape"] or str(p.dtype).removeprefix("torch.") != entry["dtype"]:
            raise TrajectoryError(
                f"parameter {entry['name']!r} is {str(p.dtype).removeprefix('torch.')} {list(p.shape)} in the "
                f"model but {entry['dtype']} {entry['shape']} in the trajectory: it belongs to another model"
            )
    return tensors


@torch.no_grad()
def replay(
    target, trajectory, *, exact: bool = True, finish: bool = True, backend: str | None = None, steps: int | None = None
):
    """Rebuild fine-tuned weights from the base weights and a trajectory, with no data and no forward pass.

    Args:
        target: the base model (an ``nn.Module``, matched by parameter name), a ``{name: tensor}``
            mapping, or the list of tensors the optimizer was given (for unnamed runs). Modified in place.
        trajectory: a path or a :class:`Trajectory`.
        exact: repeat the optimizer's sweeps one for one (perturb, restore, update), which reproduces
            training bit for bit on the same backend; ``False`` applies each update in a single sweep
            (three times faster, equal up to float rounding).
        finish: remove a perturbation that training had fused in for the next step (``fuse_next``),
            leaving the trained weights. ``False`` leaves it, to resume training from
            ``optimizer.state_dict(flush=False)`` bit for bit.
        backend: as in :func:`zotune.optim.functional.sweep_`.
        steps: replay only the first ``steps`` steps (default: all): the weights the run held after that
            many, e.g. those it validated as its best (``best/best.json``'s ``step``).

    Returns:
        ``target``.

    Example::

        model = AutoModelForCausalLM.from_pretrained(base)
        zotune.replay(model, "run/trajectory.zot")
    """
    traj = trajectory if isinstance(trajectory, Trajectory) else read_trajectory(trajectory)
    header = traj.header
    if header.get("first_step", 0) != 0:
        raise TrajectoryError(
            f"this trajectory starts at step {header['first_step']}, not at the base model: "
            "it was started on a resumed run whose earlier steps were not recorded"
        )
    if steps is not None:
        if not 0 <= steps <= traj.n_steps:
            raise TrajectoryError(f"cannot replay {steps} steps: this trajectory holds {traj.n_steps}")
    tensors = _resolve_params(target, header)
    walk(traj, tensors, exact=exact, finish=finish, backend=backend, until=steps)
    return target


def walk(
    traj: Trajectory,
    tensors,
    *,
    exact: bool = True,
    finish: bool = True,
    update: bool = True,
    rule=None,
    backend: str | None = None,
    until: int | None = None,
):
    """Apply a parsed trajectory's records to ``tensors`` (the header's parameter table, in order).

    The engine of :func:`replay`. With ``update=False`` no tensor is modified: only ``rule`` (an
    update rule of :mod:`zotune.optim.variants`, e.g. stored-state Adam) accumulates its moments,
    which is how a resumed optimizer rebuilds them. ``until``: stop before the first record of step
    ``until`` (steps count from 0), i.e. after ``until`` steps. Returns the rule.
    """
    walker = _Walker(traj.header, tensors, exact=exact, update=update, rule=rule, backend=backend)
    for n, record in enumerate(traj.records):
        if until is not None and getattr(record, "step", -1) >= until:
            break  # a Flush of step `until` is what `finish` does below
        walker.apply(n, record)
    if walker.pending is not None and finish:  # clean weights: remove the perturbation fused in for the next step
        walker.sweep(walker.pending, [(0, -1.0)], None)
    return walker.rule


class _Walker:
    """Replay's state between records: eps and weight decays, the pending fused perturbation, the scales."""

    def __init__(self, header: dict, tensors, *, exact: bool, update: bool, rule, backend):
        keys = [int(e["key"], 16) for e in header["params"]]
        self.groups = [list(g) for g in header["groups"]]
        if [i for g in self.groups for i in g] != list(range(len(keys))):
            raise TrajectoryError("corrupted trajectory: its groups do not list the parameter table in order")
        self.tensors, self.keys = list(tensors), keys
        lowrank = header.get("lowrank", {})
        self.directions = Directions(
            self.tensors,
            keys,
            int(header["seed"]),
            header["distribution"],
            backend,
            lowrank_rank=int(lowrank.get("rank", 2)),
            lowrank_every=int(lowrank.get("every", 50)),
            sparsity=float(header.get("sparsity", 0.0)),
        )
        self.backend, self.update = backend, update
        name = header.get("estimator", "two-sided")
        self.forward = name == "forward-gradient"  # plain updates: no perturbation was ever applied
        self.estimator = estimators.get("two-sided" if self.forward else name)
        self.exact = exact and not self.forward
        self.fused = header["fuse_next"] and self.exact
        # a batched run evaluated copies: its weights never held a perturbation, so no probe sweep is repeated
        self.batched = bool(header.get("batched", False))
        if self.batched and header["fuse_next"]:
            raise TrajectoryError("corrupted trajectory: a batched run cannot have fused perturbations")
        self.sr = header["stochastic_rounding"]
        self.scales = make_scales(header.get("layerwise", "none"))
        self.layers = [list(g) for g in header.get("layer_groups", [])]
        self.rule = rule if rule is not None else variants.make_rule(header.get("variant"))
        self.eps = self.wds = self.pending = self.scales_of = self.extras_of = None
        elementwise = getattr(self.rule, "elementwise", None)  # a preconditioned rule (HiZOO): u = s z
        self.directions.elementwise = None if elementwise is None else elementwise(self.tensors)

    def sweep(self, t: int, pairs, scales) -> None:
        if self.update:
            self.directions.sweep(t, pairs, self.eps, scales)

    def apply(self, n: int, record) -> None:
        if isinstance(record, Hyper):
            self.eps, self.wds = record.eps, record.weight_decays
        elif isinstance(record, LayerScales):
            self.scales_of = record
        elif isinstance(record, Extras):
            self.extras_of = record
        elif self.eps is None:
            raise TrajectoryError(f"corrupted trajectory: record {n} comes before any hyper-parameter record")
        elif isinstance(record, LayerProbe):
            if self.exact and self.update:
                self._layer_probe(record)
        elif isinstance(record, Flush):
            if not self.exact:
                return  # single-sweep updates never fused a perturbation in: nothing to remove
            if self.pending != record.step:
                raise TrajectoryError(f"corrupted trajectory: record {n} flushes step {record.step}, none pending")
            self.sweep(record.step, [(0, -1.0)], None)
            self.pending = None
        else:
            if self.pending is not None and self.pending != record.step:
                raise TrajectoryError(
                    f"corrupted trajectory: record {n} is step {record.step} but step {self.pending} is pending"
                )
            self._step(n, record)

    def _layer_probe(self, record: LayerProbe) -> None:
        """Repeat a per-layer probe pass's sweeps (they leave float rounding behind, so exact replay needs them)."""
        if not self.layers:
            raise TrajectoryError(
                "corrupted trajectory: a layer-probe record in a file whose header has no layer_groups"
            )
        probes = LayerProbes(self.directions, self.layers, record.step, record.probes, self.eps)
        if record.applied > len(probes.plan):
            raise TrajectoryError(
                f"corrupted trajectory: step {record.step} records {record.applied} probe sweeps of {len(probes.plan)}"
            )
        probes.run(recorded(None), until=record.applied)
        probes.undo()

    def _plan(self, n: int, record, count: int) -> StepPlan:
        t, scales = record.step, None
        if self.scales.name != "none":  # layerwise: the step's factors come from its "L" record
            if self.scales_of is None or self.scales_of.step != t:
                raise TrajectoryError(f"corrupted trajectory: record {n} (step {t}) has no layer-scale record")
            scales = list(self.scales_of.scales)
        probe_scales = None if scales is None else self.scales.probe_scales(scales)  # grad-norm: along z / c_l
        return StepPlan(t, count, self.estimator, self.eps, self.pending is not None, scales, probe_scales)

    def _step(self, n: int, record) -> None:
        if isinstance(record, Skip):
            if self.exact and not self.batched:
                plan = self._plan(n, record, max(record.phase, self.estimator.min_n))  # n >= phase: long enough
                if self.update:
                    probe = Probe(plan, self.directions)
                    probe.run(recorded(record.phase), until=record.phase)
                    probe.undo()
            elif self.pending is not None and not self.forward:
                self.sweep(record.step, [(0, -1.0)], None)
            self.pending = None
            return
        grads = [record.projected_grad] if isinstance(record, Step) else list(record.projected_grads)
        plan = self._plan(n, record, len(grads))
        carry = None
        if self.exact and not self.batched:
            probe = Probe(plan, self.directions)
            if self.update:
                probe.run(recorded(None))
            carry = probe.carried(len(plan.sweeps) - 1)
        elif self.pending is not None:
            self.sweep(record.step, [(0, -1.0)], None)
        extras = ()
        if self.estimator.n_extras:
            if self.extras_of is None or self.extras_of.step != record.step:
                raise TrajectoryError(f"corrupted trajectory: record {n} (step {record.step}) has no extras record")
            extras = self.extras_of.values
        u = update_of(plan, self.directions, grads, carry, fuse_next=self.fused, extras=extras)
        groups = [
            variants.Group([self.tensors[i] for i in g], [self.keys[i] for i in g], g, lr, wd)
            for g, lr, wd in zip(self.groups, record.lrs, self.wds)
        ]
        self.rule.apply(
            groups,
            u,
            distribution=self.directions.zdist,
            rounding_seed=u.seeds[0] if self.sr else None,
            backend=self.backend,
            update=self.update,
        )
        self.pending = record.step + 1 if self.fused else None
