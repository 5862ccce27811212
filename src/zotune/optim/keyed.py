"""What zotune's keyed optimizers share: the parameter table, the trajectory file and the step counter.

:class:`zotune.MeZO` (and its variants) and :class:`zotune.ForwardGradient` both draw step t's z from
``rng.step_seed(seed, t)`` and the parameter keys, and both write a trajectory that
:func:`zotune.replay` reads. The bookkeeping of that (the table of names, keys, shapes and dtypes;
the header; writing the hyper-parameters when they change; the counter and resuming the file at a
checkpoint's length) lives here once; each optimizer keeps its own step and its own state format.
"""

from __future__ import annotations

import math
import os

import torch

from zotune import kernels, rng
from zotune.trajectory import Hyper, TrajectoryWriter
from zotune.version import __version__

__all__ = ["KeyedOptimizer", "check_arguments", "param_table"]


def param_table(param_groups) -> list[dict]:
    """Name, key, shape and dtype of every parameter, in order (unnamed ones are keyed by position)."""
    named = ["param_names" in g for g in param_groups]
    if any(named) and not all(named):
        raise ValueError("give names for all parameter groups (named_parameters()) or for none")
    table, index = [], 0
    for g in param_groups:
        for i, p in enumerate(g["params"]):
            name = g["param_names"][i] if "param_names" in g else str(index)
            table.append(
                {
                    "name": name,
                    "key": rng.param_key(name),
                    "shape": list(p.shape),
                    "dtype": str(p.dtype).removeprefix("torch."),
                }
            )
            index += 1
    seen: dict[int, str] = {}
    for entry in table:
        if entry["key"] in seen:
            raise ValueError(
                f"parameters {seen[entry['key']]!r} and {entry['name']!r} have the same key: "
                "give every parameter a distinct name"
            )
        seen[entry["key"]] = entry["name"]
    return table


def check_arguments(*, lr, weight_decay, seed, on_nonfinite, backend) -> None:
    """The arguments every keyed optimizer takes, each bad one a ValueError naming it."""
    if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr} (must be a finite number >= 0)")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be a finite number >= 0)")
    if not (isinstance(seed, int) and 0 <= seed < 2**64):
        raise ValueError(f"Invalid seed: {seed!r} (must be an integer in [0, 2**64))")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (choose 'raise' or 'skip')")
    if backend is not None:
        kernels.get(backend)


class KeyedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose steps are keyed by (seed, step, parameter name) and recorded.

    Subclasses call :meth:`_setup` at the end of ``__init__``, add their own header keys in
    :meth:`_header_options`, write records with :meth:`_write`, and put :meth:`_keyed_state` into
    their ``state_dict`` and :meth:`_check_keyed_state` (before changing anything) and
    :meth:`_restore_keyed_state` into their ``load_state_dict``.
    """

    def _setup(self, seed: int, distribution: str, trajectory: str | os.PathLike | None) -> None:
        self.seed = seed
        self.distribution = distribution
        self.trajectory_path = None if trajectory is None else os.fspath(trajectory)
        self._step = 0
        self._writer: TrajectoryWriter | None = None
        self._resume_at: int | None = None  # bytes of the trajectory a loaded state continues
        self._written_hyper: Hyper | None = None
        self._table = self._param_table()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_writer", None) is not None:
            raise RuntimeError(
                f"cannot add parameters to a {type(self).__name__} optimizer that is writing a trajectory"
            )
        super().add_param_group(param_group)
        if hasattr(self, "_table"):
            self._table = self._param_table()

    def _param_table(self) -> list[dict]:
        return param_table(self.param_groups)

    def _all(self) -> tuple[list[torch.Tensor], list[int]]:
        """Every tensor of the optimizer, in table order, with its key."""
        return [p for g in self.param_groups for p in g["params"]], [e["key"] for e in self._table]

    @property
    def param_names(self) -> list[str]:
        """The names of the tensors this optimizer trains, in its table's order: those it was given, or fewer
        where it picks its own (GRZO trains the layers it hooks, not the embeddings)."""
        return [e["name"] for e in self._table]

    @property
    def step_count(self) -> int:
        """Steps taken so far (applied or skipped): the next step draws z from step_seed(seed, step_count)."""
        return self._step

    def fingerprint(self) -> dict:
        """What every copy of this run (every rank of a distributed one) must agree on, as plain values.

        Keys: ``"seed"``, ``"step"`` (:attr:`step_count`), ``"eps"`` (``None`` where the optimizer has
        none), ``"options"`` (distribution, fuse_next, stochastic_rounding), ``"variant"`` (the variant
        options, as the trajectory header records them; ``None`` where there are none), ``"lr and
        weight decay"`` of each group and ``"parameter set"`` (names, keys, shapes and dtypes, in
        order). Two optimizers with different fingerprints would apply different updates.
        :func:`zotune.distributed.check_consistent` compares it across ranks.
        """
        return {
            "seed": self.seed,
            "step": self.step_count,
            "eps": getattr(self, "eps", None),
            "options": {k: getattr(self, k, None) for k in ("distribution", "fuse_next", "stochastic_rounding")},
            "variant": None,
            "lr and weight decay": [[g.get("lr"), g.get("weight_decay")] for g in self.param_groups],
            "parameter set": self._table
            or [[list(p.shape), str(p.dtype)] for g in self.param_groups for p in g["params"]],
        }

    # -- the trajectory ------------------------------------------------------------------------
    def _header_options(self) -> dict:
        """The header keys of this optimizer (fuse_next, stochastic_rounding, named, variants ...)."""
        return {}

    def _header(self) -> dict:
        offsets = [0]
        for g in self.param_groups:
            offsets.append(offsets[-1] + len(g["params"]))
        return {
            "format": "zotune-trajectory",
            "zotune_version": __version__,
            "seed": self.seed,
            "distribution": self.distribution,
            "first_step": self._step,
            "params": [{**e, "key": f"{e['key']:016x}"} for e in self._table],
            "groups": [list(range(a, b)) for a, b in zip(offsets, offsets[1:])],
            **self._header_options(),
        }

    def _write(self, record, hyper: Hyper | None = None) -> None:
        """Append ``record`` (after ``hyper`` if it differs from the last one written); no file: nothing."""
        if self.trajectory_path is None:
            return
        if self._writer is None:
            self._writer = TrajectoryWriter(self.trajectory_path, self._header(), resume_at=self._resume_at)
        if hyper is not None and hyper != self._written_hyper:
            self._writer.append(hyper)
            self._written_hyper = hyper
        self._writer.append(record)

    # -- state ---------------------------------------------------------------------------------
    def _keyed_state(self) -> dict:
        return {
            "step": self._step,
            "seed": self.seed,
            "distribution": self.distribution,
            "params": self.param_names,
            "trajectory_bytes": None if self._writer is None else self._writer.tell(),
        }

    def _check_keyed_state(self, own: dict) -> None:
        """A state saved for these parameters with this distribution, or ValueError (nothing is changed)."""
        names = self.param_names
        if own["params"] != names:
            raise ValueError(
                "this optimizer state was saved for other parameters "
                f"({len(own['params'])} recorded, {len(names)} here, or different names)"
            )
        if own["distribution"] != self.distribution:
            raise ValueError(
                f"this optimizer state has distribution={own['distribution']!r}, the optimizer {self.distribution!r}"
            )

    def _restore_keyed_state(self, own: dict) -> None:
        """Restore the counter and seed; the trajectory reopens at the state's length on the next record."""
        self._step, self.seed = int(own["step"]), int(own["seed"])
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._resume_at = own["trajectory_bytes"]
