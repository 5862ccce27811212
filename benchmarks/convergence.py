"""Forward passes to accuracy: zeroth-order methods against a *tuned* MeZO on one budget (issue 20, part 3).

Every method, plain MeZO included, gets its learning rate (and eps, where its grid lists several)
chosen on validation with the same tuning budget of forward passes; then each runs at its chosen
rate on several seeds for the same budget of forward passes, validating every fixed number of
forward passes, so that the curves of methods with different costs per step line up. The table says,
per method and task, how many forward passes (and minutes) it took to reach the validation accuracy
tuned MeZO has at the end of its budget, its best validation and test accuracy at that equal budget,
and its peak memory against inference. A method that loses is reported as losing.

Phases (``--phase``; ``all`` runs the three in order). Each is resumable: a cell whose run wrote its
summary.json is skipped, one with a state.json (stopped by Ctrl-C, SIGTERM, ``--time-limit`` or a
crash) continues with ``zotune.train.run(None, resume=...)``, and a cell whose recorded config
(``cell.yaml``) differs from what this command would run is refused rather than mixed in. Under
``--out`` (default ``runs/convergence``):

- ``tune``: ``tune/<task>/<method>/<lr...>/``, one run per grid point of seed 0 at ``--tune-budget``
  forward passes, without a test split (test data plays no part in the choice); then ``chosen.json``:
  per task and method the grid point with the best validation after the start (ties: the better last
  validation, then the grid's order) and every point's scores. Where that best rate is at the grid's
  edge, the optimum may lie past it: one more rate is tuned past that edge, spaced as the grid is
  there, until the best is inside or ``--extend`` (default 2) rates were added on that side (the same
  rule for every method, so tuning budgets differ only by what the rule asks; the tuning table marks
  those rows). Final runs made at a rate that a new point displaced move to
  ``final/<task>/<method>/superseded/``.
- ``final``: ``final/<task>/<method>/seed<k>/``, each method at its chosen point for ``--budget``
  forward passes (``budget // passes per step`` steps), validated every ``--eval-passes`` forward
  passes (``eval_passes // passes per step`` steps), the best validation weights tested; and
  ``inference/<task>/result.json``, the peak memory of the same model doing only inference (the
  validation split and the loss of the longest training batch, no optimizer). A tuned rate whose
  final run diverges (train.divergence stops it) was chosen on too short a horizon: the method moves
  to its grid's next smaller rate and both seeds run again (the same rule for every method; the
  diverged runs are kept under ``final/<task>/<method>/diverged/`` and the table notes them). Its
  seeds still queued at the rate that diverged are not started: their runs would be set aside.
- ``table``: ``table.md`` (printed; ``--append FILE`` also appends it to FILE with the date, the
  machine and the command) and ``curves-<task>.png``: validation accuracy against forward passes,
  every method and seed.

Each run directory is an ordinary ``zotune train`` directory (``zotune plot DIR ...`` draws it
against steps or minutes; ``zotune eval --run DIR`` tests it again).

Forward passes are counted as loss evaluations of a training batch. Runs whose metrics.jsonl step
lines carry a cumulative ``forward_passes`` are read as written; older runs count ``step x passes per
step`` of the method's entry below (and a recorded count that disagrees with the entry is flagged in
the table). Validation passes are not counted (every method validates equally often per forward pass).

Setup. Model: SmolLM2-135M-Instruct (the embedded default; ``--model`` for another). Tasks:

- ``sst2``: the default run's (what ``zotune train`` runs without arguments): the bundled sample
  (1,000 train, 500 validation, the 872 GLUE dev sentences as test) and the paper's prompt
  ``<sentence> It was`` / " terrible", " great" (zero-shot 51.6 on test).
- ``copa`` (``--data-dir``, default ``../shared/data``; the paper-causal protocol: 267 train and 133
  validation from COPA's 400 training examples, its 100 validation examples as test). Chosen because
  it is the one bundled task besides SST-2 on which this model learns under MeZO: on the H100 grid
  (benchmarks/RESULTS.md, 2026-11-23) COPA was the only task whose MeZO training loss fell steadily
  (0.68 -> 0.55 over 3,000 steps; RTE, CB and WiC diverged or stayed flat at the same rate, BoolQ
  stayed flat), and its test accuracy rose above zero-shot (61 -> 63; FT 65, prefix 65). It is a
  different kind of task (multiple choice: each option's mean log-likelihood), so the comparison is
  not about one classification head only, and its short inputs cost about what SST-2's do per
  forward on a CPU (1.24 vs 1.16 s for a batch of 16), while RTE and BoolQ cost 3-4x. Its splits are
  small (one test example is 1 point): differences of a few points are within noise, which is why
  every final run has two seeds at least.

Methods (``--methods``): every entry of ``METHODS`` below, one per estimator, direction kind or rule of
issue 20: mezo (the control, always run), fzoo, hizoo, kerzoo, lozo, subzero, sparse-mezo, zo-muon,
sparse-fzoo (two of them composed), grzo (and its grzo-cosine, grzo-raw and sparse-grzo forms), one-sided-4, and
lp-mezo (a linear probe written into the head first, the paper's Appendix F.1; classification tasks only: its
forward passes count the probe's features of the training split).
The default runs mezo, sparse-mezo, fzoo and grzo (the control, the two ahead of it in the CPU final
runs, RESULTS.md 2026-12-06, and GRZO, the newest); one 10-minute GPU call holds about three methods on
both tasks, so the default takes two calls (``--resume``) and the others go in further ones
(``--methods mezo,hizoo,kerzoo,zo-muon --out ...``: mezo again, its rows being every other row's target).

Presets (options given on the command line win):

- ``--preset cpu``: 1,000 forward passes per final run, 200 per grid point, validation every 100,
  seeds 0 and 1, cells one at a time, each in its own process. At SmolLM2's speed on 2 cores (the
  default run, 400 forward passes, takes about 10 minutes: ~1.5 s a forward pass) a final cell takes
  about 25 min of training plus ~2 min of validation and test, a tuning cell about 5-6 min; with
  mezo and fzoo on both tasks (12 tuning, 8 final cells) about 5 hours. Run it in parts:
  ``--time-limit 120`` stops the running cell (its state saved) after two hours and prints the table
  so far, and ``--resume OUT`` continues with the options it was started with.
- ``--preset gpu``: the issue's full setting, sized for one 10-minute H100 call: 2,000 forward
  passes per final run (tuned MeZO's 1,000 steps), 400 per grid point, validation every 200,
  seeds 0 and 1, eight cells at a time on the one GPU (one small model leaves most of it idle: ten
  SmolLM2 MeZO processes stepped ~3x faster in all than one), stopping at 8.5 minutes (the cells save
  their state) and printing the table of what finished. About 10,400 forward passes per method on
  both tasks (3 x 400 tuning and 2 x 2,000 final per task), 41,600 for the four default methods: at
  the ~70 a second that parallel SmolLM2 MeZO cells made on an H100, about 10 minutes of training,
  plus process starts and validations, so the last cells stop at the limit with their state
  saved; the same command (``--resume OUT``) finishes them in a second call.

Peak memory is that of each cell's own process (RSS on a CPU, the CUDA allocator's peak on a GPU),
so it is reported only for cells run in processes of their own or on a GPU (where it is reset before
each cell); ``--no-isolate`` runs everything here, which tests use.

    python benchmarks/convergence.py --preset gpu --append benchmarks/RESULTS.md
    python benchmarks/convergence.py --preset cpu --out runs/conv-cpu --time-limit 120
    python benchmarks/convergence.py --resume runs/conv-cpu --time-limit 120
    python benchmarks/convergence.py --methods mezo,one-sided-4 --tasks sst2 --budget 400 --phase tune
    python benchmarks/convergence.py --phase table --resume runs/conv-cpu     # the table of what has finished
    python benchmarks/convergence.py --preset cpu --tasks sst2 -- --train.eval_batch_size 64

Words after ``--`` are run-config overrides for every cell (``--section.field value``, as ``zotune
train`` takes them); the method's settings, its grid point and the budget come after them.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from zotune import checkpoint
from zotune.config import ConfigError, RunConfig, load_config, parse_overrides
from zotune.errors import UserError
from zotune.runtime import StopFlag, peak_memory_mb
from zotune.tasks.sampling import PAPER_SIZES

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Method:
    """A row of the table: its run-config overrides, its cost per step, and the grid its rate is tuned on."""

    passes_per_step: int  # forward passes (loss evaluations) of one step: the budget arithmetic's unit
    overrides: dict  # RunConfig sections (model, task, optimizer, train)
    grid: dict  # optimizer field -> candidate values; every combination is tried (the same count for all)
    label: str = ""
    # forward passes over the training split before the first step (train.init probe: one, its features), counted in
    # training batches (train examples / batch size) and taken out of the budget: the run records what they were
    setup_epochs: float = 0.0
    tasks: tuple[str, ...] = ()  # the tasks it applies to (empty: every task)


# Adding a method is one entry. Every method's grid has three points, so the tuning budget is the
# same for all (3 x --tune-budget forward passes). MeZO's rates: the default run's 5e-5 was tuned
# for 200 steps and diverged after 1,000-2,000 on the H100; 2e-5 held for 4,000 (RESULTS.md).
# FZOO divides its step by eps times the spread of the losses, so its rate lives on another scale:
# the calibration ran eta 2e-3 and 5e-3, which are lr 2e-6 and 5e-6 in the library's form
# (lr = eta * eps, eps 1e-3; zotune compare's fzoo takes 2e-6). n-SPSA averages n directions, which
# allows a larger rate than MeZO's. The first CPU tuning (RESULTS.md, 2026-12-06: 1e-5..5e-5 for MeZO,
# HiZOO; 1e-6..5e-6 for FZOO) found every method's best rate at the top of its grid, so the grids now
# start at that top point and reach 4x higher (a divergence there is caught by train.divergence).
METHODS: dict[str, Method] = {
    "mezo": Method(
        2,
        {"optimizer": {"estimator": "two-sided", "n_perturbations": 1, "distribution": "gaussian"}},
        {"lr": [5e-5, 1e-4, 2e-4]},
        "MeZO (the paper's SPSA, n = 1)",
    ),
    # MeZO on the fast Gaussian (issue 19's gaussian-fast: 16-bit uniforms, |z| <= 4.71, variance 1 - 1e-4): the same
    # law to within its tails, so MeZO's grid; the row that says whether it trains as the paper's z does.
    "mezo-fast": Method(
        2,
        {"optimizer": {"estimator": "two-sided", "n_perturbations": 1, "distribution": "gaussian-fast"}},
        {"lr": [5e-5, 1e-4, 2e-4]},
        "MeZO on gaussian-fast z",
    ),
    "fzoo": Method(
        9,
        {"optimizer": {"estimator": "fzoo", "distribution": "rademacher", "n_perturbations": 8, "fuse_next": False}},
        {"lr": [5e-6, 1e-5, 2e-5]},
        "FZOO (N = 8 Rademacher, one-sided, std-normalised)",
    ),
    # HiZOO's s starts at 1, where its step is MeZO's: MeZO's rates. Its alpha times kappa is what moves s; kappa
    # measured 1e2-2e3 on SmolLM2 SST-2 at eps 1e-3, so alpha 1e-6 moves s by ~1e-4-2e-3 a step (the authors'
    # 1e-10 was for OPT-13B, whose kappa is larger, and would leave s at 1 here).
    "hizoo": Method(
        3,
        {"optimizer": {"estimator": "hizoo", "hizoo_alpha": 1e-6}},
        {"lr": [5e-5, 1e-4, 2e-4]},
        "HiZOO (diagonal preconditioner, alpha 1e-6)",
    ),
    # LOZO's directions U V^T / sqrt(r) have unit-variance entries, as MeZO's z: MeZO's rates.
    "lozo": Method(
        2,
        {"optimizer": {"distribution": "lowrank", "lowrank_rank": 2, "lowrank_every": 50}},
        {"lr": [5e-5, 1e-4, 2e-4]},
        "LOZO (rank-2 directions, V redrawn every 50 steps)",
    ),
    # SubZero's U Z V^T is scaled to entries of unit variance, as MeZO's z: MeZO's rates (as LOZO's).
    "subzero": Method(
        2,
        {"optimizer": {"distribution": "subzero", "lowrank_rank": 2, "lowrank_every": 50}},
        {"lr": [5e-5, 1e-4, 2e-4]},
        "SubZero (rank-2 U Z V^T, U and V redrawn every 50 steps)",
    ),
    # KerZOO's coefficient has MeZO's mean and 2.5x its standard deviation (cubic kernel): MeZO's rates and below.
    "kerzoo": Method(
        2,
        {"optimizer": {"estimator": "kerzoo"}},
        {"lr": [2e-5, 5e-5, 1e-4]},
        "KerZOO (r ~ U(-1, 1), cubic kernel)",
    ),
    # Sparse-MeZO moves a quarter of each matrix: its paper runs larger rates than MeZO's.
    "sparse-mezo": Method(
        2,
        {"optimizer": {"sparsity": 0.75}},
        {"lr": [1e-4, 2e-4, 5e-4]},
        "Sparse-MeZO (the 25% smallest magnitudes of each matrix)",
    ),
    # ZO-Muon's update has norm sqrt(r) per matrix whatever the losses: its rates are on their own scale (see
    # zotune.compare's zo-muon entry); eps 1e-2 for directions whose entries are ~sqrt(r / m) rather than 1.
    "zo-muon": Method(
        8,
        {"optimizer": {"variant": "muon", "lowrank_rank": 8, "n_perturbations": 4, "eps": 1e-2}},
        {"lr": [1e-1, 3e-1, 1.0]},  # 1e-2..1e-1 barely moved it (RESULTS.md, 2026-12-06): best at the top
        "ZO-Muon (4 two-sided queries, rank-8 subspaces, P redrawn every 50 steps)",
    ),
    # FZOO's estimator on Sparse-MeZO's masked directions (the two compose: Rademacher z, the SGD rule); the
    # normalized step moves each element about lr / (eps sqrt(N)) whatever the losses: FZOO's rates.
    "sparse-fzoo": Method(
        9,
        {
            "optimizer": {
                "estimator": "fzoo",
                "distribution": "rademacher",
                "n_perturbations": 8,
                "fuse_next": False,
                "sparsity": 0.75,
            }
        },
        {"lr": [5e-6, 1e-5, 2e-5]},
        "Sparse-FZOO (FZOO on the 25% smallest magnitudes of each matrix)",
    ),
    # GRZO's step moves each element about lr / (2 eps sqrt(B)) (B = 16 examples, advantages of unit spread), lr 125
    # here: 2e-6 is MeZO's tuned step (~1e-4 an element), 1e-5 about FZOO's. Its passes are dearer than MeZO's
    # (one more matmul per Linear layer, and U drawn in each): compare the minutes too.
    "grzo": Method(
        2,
        {"optimizer": {"estimator": "grzo"}},
        {"lr": [2e-6, 5e-6, 1e-5]},
        "GRZO (one direction per example, group-relative normalisation)",
    ),
    # GRZO's normalised step keeps its size as the loss flattens; at its tuned rate the first 1,000-pass run peaked at
    # 500 passes and drifted after (RESULTS.md, 2026-12-07). The same grid under a cosine decay to 0 over the run: an
    # ablation (the rate's schedule is then part of the method), not a replacement of the grzo row. A cosine's mean
    # rate is half its peak: GRZO's grid moved up one point.
    "grzo-cosine": Method(
        2,
        {"optimizer": {"estimator": "grzo", "schedule": "cosine"}},
        {"lr": [5e-6, 1e-5, 2e-5]},
        "GRZO, its rate decayed to 0 over the run (cosine)",
    ),
    # GRZO without the normalisation (the authors' "two"): B per-example MeZO estimates averaged, each element moving
    # about lr |g_i| / sqrt(B), so MeZO's grid (its step shrinks with the loss differences, where GRZO's keeps its size).
    "grzo-raw": Method(
        2,
        {"optimizer": {"estimator": "grzo-raw"}},
        {"lr": [5e-5, 1e-4, 2e-4]},
        "GRZO's per-example directions with raw loss differences (no normalisation)",
    ),
    # Sparse-GRZO (the GRZO authors' grzo_sparse): GRZO's U masked to Sparse-MeZO's quarter of smallest magnitudes. A
    # moved element steps as in GRZO (the coefficients are normalised whatever the mask): GRZO's grid around its tuned
    # rate (past an edge the tuning extends it; Sparse-MeZO took twice MeZO's rate, GRZO drifted at its own).
    "sparse-grzo": Method(
        2,
        {"optimizer": {"estimator": "grzo", "sparsity": 0.75}},
        {"lr": [5e-6, 1e-5, 2e-5]},
        "Sparse-GRZO (GRZO on the 25% smallest magnitudes of each matrix)",
    ),
    # Linear probing, then MeZO (the MeZO paper's Appendix F.1): the probe's solution (fitted on the features of the
    # training split, C chosen on validation) written into the label words' head rows, MeZO from there. The probe
    # alone had 84.2 validation and 82.6 test on SST-2 (MeZO's 1,000 passes: 70-75), and MeZO at its tuned 5e-5 then
    # lost ground (84.8 at 100 passes, 81.6 at 200: RESULTS.md, 2026-12-07): MeZO's grid and below. Classification
    # tasks with label words only (the probe writes their head rows): not COPA.
    "lp-mezo": Method(
        2,
        {"train": {"init": "probe"}},
        {"lr": [5e-6, 1e-5, 2e-5]},
        "linear probe, then MeZO (the paper's Appendix F.1)",
        setup_epochs=1.0,
        tasks=("sst2",),
    ),
    "one-sided-4": Method(
        5,
        {"optimizer": {"estimator": "one-sided", "n_perturbations": 4}},
        {"lr": [5e-5, 1e-4, 2e-4]},
        "one-sided n-SPSA, n = 4",
    ),
}
REFERENCE = "mezo"  # the method whose end-of-budget validation accuracy is the target

TASK_TITLES = {
    "sst2": "SST-2",
    "copa": "COPA",
    "rte": "RTE",
    "cb": "CB",
    "boolq": "BoolQ",
    "wic": "WiC",
    "wsc": "WSC",
    "multirc": "MultiRC",
    "record": "ReCoRD",
    "squad": "SQuAD",
    "drop": "DROP",
}
BUNDLED = {"sst2"}  # tasks whose default data ships with zotune (data_dir stays None: the default run's)

DEFAULTS = {
    "methods": ["mezo", "sparse-mezo", "fzoo", "grzo"],  # the control, the two ahead on CPU SST-2, and the newest
    "tasks": ["sst2", "copa"],
    "seeds": [0, 1],
    "budget": 2000,
    "tune_budget": 400,
    "eval_passes": 200,
    "jobs": 1,
    "time_limit": 0.0,
    "extend": 2,
    "model": "smollm2-135m-instruct",
    "out": "runs/convergence",
}
PRESETS = {
    "cpu": {"budget": 1000, "tune_budget": 200, "eval_passes": 100, "seeds": [0, 1], "jobs": 1},
    "gpu": {"budget": 2000, "tune_budget": 400, "eval_passes": 200, "seeds": [0, 1], "jobs": 8, "time_limit": 8.5},
}
CELL_STOP_GRACE_S = 60  # after a stop, how long running cells get to finish their step and save


class Stopped(Exception):
    """Cells were stopped (Ctrl-C, SIGTERM or --time-limit) with their state saved; the same command continues."""


# -- budget arithmetic --------------------------------------------------------------------------------


def steps_for(budget: int, passes_per_step: int) -> int:
    """The steps a method takes within ``budget`` forward passes (whole steps only: never over budget)."""
    steps = budget // passes_per_step
    if steps < 1:
        raise ConfigError(
            f"a budget of {budget} forward passes is less than one step of a method that takes {passes_per_step} a step"
        )
    return steps


def eval_every_for(eval_passes: int, passes_per_step: int) -> int:
    """Validate every this many steps: as close to every ``eval_passes`` forward passes as whole steps allow."""
    return max(1, eval_passes // passes_per_step)


# -- the plan and each cell's run config ---------------------------------------------------------------


@dataclass
class Plan:
    """What a benchmark runs: saved in OUT/plan.json, so that ``--resume OUT`` continues with it."""

    methods: list[str]
    tasks: list[str]
    seeds: list[int]
    budget: int
    tune_budget: int
    eval_passes: int
    model: str
    out: str
    data_dir: str | None = None
    jobs: int = 1
    isolate: bool = True
    time_limit: float = 0.0
    extend: int = 2  # points a grid may grow past each edge (beyond_edge); 0: the grid alone
    overrides: list[str] = field(default_factory=list)  # --section.field value words for every cell

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
        if REFERENCE not in self.methods:
            raise ConfigError(f"the methods must include {REFERENCE!r}: its tuned accuracy is every row's target")
        if not self.tasks or not self.seeds:
            raise ConfigError("at least one task and one seed are needed")
        from zotune.tasks import get_task

        for task in self.tasks:
            get_task(task)  # an unknown task is a one-line error that suggests the nearest
            if task not in BUNDLED and not self.data_dir:
                raise ConfigError(f"task {task} needs its data: give --data-dir (the folder of shared/data)")
            for m in self.methods:
                if METHODS[m].tasks and task not in METHODS[m].tasks:
                    raise ConfigError(f"method {m} applies to {', '.join(METHODS[m].tasks)} only, not {task}")
        sizes = {m: len(grid_points(m)) for m in self.methods}
        if len(set(sizes.values())) > 1:
            raise ConfigError(
                "every method needs the same tuning budget, so grids of the same size; got "
                + ", ".join(f"{m} {n} points" for m, n in sizes.items())
            )
        for name in ("budget", "tune_budget", "eval_passes", "jobs"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a whole number >= 1, got {getattr(self, name)!r}"
                )
        if not (isinstance(self.extend, int) and self.extend >= 0):
            raise ConfigError(f"--extend must be a whole number >= 0, got {self.extend!r}")
        for m in self.methods:
            steps_for(self.tune_budget, METHODS[m].passes_per_step)
            steps_for(self.budget, METHODS[m].passes_per_step)
        if self.jobs > 1 and not self.isolate:
            raise ConfigError("--jobs > 1 runs cells in processes of their own: drop --no-isolate")


def grid_points(method: str) -> list[dict]:
    """The method's grid as a list of optimizer settings, every combination, in the grid's order."""
    grid = METHODS[method].grid
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def point_name(point: dict) -> str:
    return "-".join(f"{key}{value:g}" for key, value in point.items())


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out.get(key, {}), value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else copy.deepcopy(value)
        )
    return out


def _dotted(sections: dict) -> dict:
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def cell_config(plan: Plan, task: str, method: str, point: dict, *, phase: str, seed: int, run_dir: Path) -> RunConfig:
    """One run's config: the default run's, the plan's overrides, the method's, its grid point, then the budget."""
    pps = METHODS[method].passes_per_step
    budget = plan.tune_budget if phase == "tune" else plan.budget
    sections = {
        "model": {"name": plan.model},
        "task": {"name": task, "data_dir": None if task in BUNDLED else plan.data_dir},
    }
    sections = _merge(sections, METHODS[method].overrides)
    sections = _merge(sections, {"optimizer": point})
    train = {
        "steps": steps_for(budget, pps),
        "eval_every": eval_every_for(plan.eval_passes, pps),
        "output_dir": str(run_dir),
        "progress": False,
        "zero_shot": False,
    }
    task_fields = {"seed": seed}
    if phase == "tune":  # validation only: the test split plays no part in the choice, and no weights are kept
        train.update(keep_start=False, save_best=False)
        task_fields["test"] = 0
    sections = _merge(sections, {"task": task_fields, "optimizer": {"seed": seed}, "train": train})
    # the plan's --key value words sit under the method's settings and the budget, above the defaults
    # every method from the model as loaded (zotune train's default, auto, would probe first), as the paper's MeZO;
    # lp-mezo's own settings say probe
    changes = {
        "train.init": "none",
        **_dotted({k: v for k, v in sections.items() if k == "model"}),
        **parse_overrides(plan.overrides),
    }
    changes.update(_dotted({k: v for k, v in sections.items() if k != "model"}))
    try:
        config = load_config(changes=changes)
    except UserError as err:
        raise ConfigError(f"method {method} on {task}: {err}") from None
    setup = setup_passes(method, config)
    if setup:  # the passes before the first step come out of the budget
        config.train.steps = steps_for(math.floor(budget - setup), pps)
    return config


def setup_passes(method: str, config: RunConfig) -> float:
    """Forward passes (training batches' worth) ``method`` spends before its first step under ``config``: at most
    (a task with fewer training examples than asked spends fewer; the run records what it spent)."""
    epochs = METHODS[method].setup_epochs
    if not epochs:
        return 0.0
    train = config.task.train
    if train is None:
        from zotune.tasks import get_task

        protocol = config.task.protocol or get_task(config.task.name).protocols[0]
        if protocol != "paper-causal":
            raise ConfigError(f"method {method} needs --task.train with protocol {protocol}")
        train = PAPER_SIZES[0]
    return epochs * train / config.train.batch_size


@dataclass
class Cell:
    kind: str  # "tune", "final" or "inference"
    task: str
    method: str | None
    seed: int
    point: dict
    dir: Path
    config: RunConfig

    @property
    def title(self) -> str:
        what = {
            "tune": f"tune {self.method} {point_name(self.point)}",
            "final": f"{self.method} seed {self.seed}",
            "inference": "inference memory",
        }[self.kind]
        return f"{TASK_TITLES.get(self.task, self.task)}: {what}"

    @property
    def done(self) -> bool:
        return (self.dir / ("result.json" if self.kind == "inference" else "run/summary.json")).is_file()


def tune_cells(plan: Plan, points: dict | None = None) -> list[Cell]:
    """The tuning cells: every method's grid on every task, or the ``(task, method) -> points`` given."""
    cells = []
    for task in plan.tasks:
        for method in plan.methods:
            for point in grid_points(method) if points is None else points[task, method]:
                d = Path(plan.out) / "tune" / task / method / point_name(point)
                cells.append(
                    Cell(
                        "tune",
                        task,
                        method,
                        0,
                        point,
                        d,
                        cell_config(plan, task, method, point, phase="tune", seed=0, run_dir=d / "run"),
                    )
                )
    return cells


def untuned(plan: Plan, chosen: dict) -> list[str]:
    return [f"{m} on {t}" for t in plan.tasks for m in plan.methods if m not in chosen.get(t, {})]


def final_cells(plan: Plan, chosen: dict) -> list[Cell]:
    """The final runs of every tuned method (and each task's inference cell); untuned ones wait for --phase tune."""
    cells = []
    for task in plan.tasks:
        d = Path(plan.out) / "inference" / task
        cells.append(
            Cell(
                "inference",
                task,
                None,
                0,
                {},
                d,
                cell_config(plan, task, REFERENCE, {}, phase="final", seed=0, run_dir=d),
            )
        )
        for method in plan.methods:
            if method not in chosen.get(task, {}):
                continue
            point = chosen[task][method]["point"]
            for seed in plan.seeds:
                d = Path(plan.out) / "final" / task / method / f"seed{seed}"
                cells.append(
                    Cell(
                        "final",
                        task,
                        method,
                        seed,
                        point,
                        d,
                        cell_config(plan, task, method, point, phase="final", seed=seed, run_dir=d / "run"),
                    )
                )
    return cells


# -- running cells -------------------------------------------------------------------------------------


def _check(cell: Cell) -> bool:
    """Whether the cell was started before (cell.yaml); one started with another config is refused."""
    path = cell.dir / "cell.yaml"
    if not path.is_file():
        return False
    wanted, recorded = cell.config.to_dict(), yaml.safe_load(path.read_text()) or {}
    # a field that a later zotune added, at its default, is the config the cell ran with
    defaults = RunConfig().to_dict()
    for section, values in wanted.items():
        for key, value in values.items():
            if key not in recorded.get(section, {}) and value == defaults.get(section, {}).get(key):
                recorded.setdefault(section, {})[key] = value
    if recorded != wanted:
        diff = [
            f"{s}.{k}: {recorded.get(s, {}).get(k)!r} -> {v!r}"
            for s, values in wanted.items()
            for k, v in values.items()
            if recorded.get(s, {}).get(k) != v
        ]
        raise ConfigError(
            f"{cell.dir} was run with another config ({'; '.join(diff[:3])}): "
            f"choose another --out, or remove that folder to run it again"
        )
    return True


def _claim(cell: Cell) -> None:
    """Record the cell's config in cell.yaml (see :func:`_check`)."""
    if not _check(cell):
        cell.dir.mkdir(parents=True, exist_ok=True)
        (cell.dir / "cell.yaml").write_text(yaml.safe_dump(cell.config.to_dict(), sort_keys=False))


def run_cell(cell_dir: Path, kind: str, *, isolated: bool, log: Callable[[str], None] = print) -> None:
    """Run (or continue) the cell in ``cell_dir`` here, from its cell.yaml; raises Stopped if interrupted.

    One process at a time: a second one (another command on the same OUT, or a restart begun before a
    stopped cell has saved its state) would resume from a state the first then overwrites, and both would
    write the same trajectory. ``cell_dir/lock`` holds the runner's PID; a lock whose process has gone is
    taken over.
    """
    lock = cell_dir / "lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = lock.read_text().strip()
            if owner.isdigit() and _alive(int(owner)):
                raise ConfigError(
                    f"{cell_dir} is being run by process {owner}: wait for it or stop it (or delete {lock} if that "
                    "process is not a benchmark: a PID can be reused)"
                ) from None
            lock.unlink(missing_ok=True)  # its runner has gone (killed, or the machine restarted)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        _run_locked_cell(cell_dir, kind, isolated=isolated, log=log)
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _run_locked_cell(cell_dir: Path, kind: str, *, isolated: bool, log: Callable[[str], None]) -> None:
    import torch

    config = load_config(cell_dir / "cell.yaml")
    on_gpu = torch.cuda.is_available() and config.model.device != "cpu"
    if on_gpu and not isolated:  # one process for every cell: each cell's peak from its own start
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    measured = isolated or on_gpu
    if kind == "inference":
        checkpoint.write_json(cell_dir / "result.json", {**_inference_peak(config, log), "memory_measured": measured})
        return
    from zotune.train import run

    run_dir = cell_dir / "run"
    if (run_dir / "summary.json").is_file():
        return
    resume = run_dir if (run_dir / "state.json").is_file() else None
    if resume is not None:
        log(f"{run_dir}: continuing from its state.json")
    result = run(None if resume else config, resume=resume, log=log)
    if result.interrupted:
        raise Stopped(f"{run_dir} stopped at step {result.summary.get('interrupted_at')}, its state saved")
    checkpoint.write_json(cell_dir / "cell.json", {"memory_measured": measured, "isolated": isolated})


def _inference_peak(config: RunConfig, log) -> dict:
    """The peak memory of inference alone on this task: the validation split, then the loss of the longest
    training batch (the widest forward a training step makes), no optimizer. Then, with the peak read, the model
    as loaded on the test split: the table's start row (the final cells test their best weights only)."""
    import torch

    from zotune.objectives import evaluate
    from zotune.train import prepare

    prepared = prepare(config, log=log)
    model, objective = prepared.loaded.model, prepared.objective
    batch = sorted(prepared.encoded["train"], key=lambda e: e.width)[-config.train.batch_size :]
    with torch.no_grad():
        validation = evaluate(objective, model, prepared.encoded["validation"], config.train.eval_batch_size)
        float(objective.loss(model, batch, config.train.forward_chunks))
    device = next(model.parameters()).device
    result = {"peak_memory_mb": round(peak_memory_mb(device), 1), "device": str(device), "validation": validation}
    if prepared.encoded["test"]:
        with torch.no_grad():
            result["test"] = evaluate(objective, model, prepared.encoded["test"], config.train.eval_batch_size)
    return result


def run_cells(cells: list[Cell], plan: Plan, deadline: float | None, log: Callable[[str], None]) -> list[str]:
    """Run the cells not done yet (after checking every one's config); returns the failures' messages."""
    todo = [c for c in cells if not c.done]
    for cell in todo:  # a changed config fails before anything runs
        _claim(cell)
    log(f"{len(cells) - len(todo)} of {len(cells)} cells done before; running {len(todo)}")
    if not plan.isolate:
        skipped: set = set()
        for n, cell in enumerate(todo, 1):
            if deadline is not None and time.monotonic() > deadline:
                raise Stopped(f"--time-limit reached before {len(todo) - n + 1} cells")
            if _group(cell) in skipped:
                continue
            log(f"[{n}/{len(todo)}] {cell.title}")
            run_cell(cell.dir, cell.kind, isolated=False, log=log)
            skipped |= _skip_after_divergence(cell, todo[n:], log)
        return []
    return _run_isolated(todo, plan.jobs, deadline, log)


def _group(cell: Cell) -> tuple:
    return (cell.kind, cell.task, cell.method)


def _skip_after_divergence(cell: Cell, rest: list[Cell], log) -> set:
    """The groups whose cells still queued are skipped: a final run that diverged moves its method's rate.

    :func:`step_down` moves a method to its next smaller rate when any seed's final run diverged and sets every
    seed's run at the old rate aside, so the other seeds' runs at that rate would be thrown away: skipping them
    saves a final run's time (35-40 minutes on the 2-core CPU) per seed. The while loop of :func:`phase_final`
    then runs all seeds at the smaller rate.
    """
    if cell.kind != "final" or _read_optional(cell.dir / "run" / "summary.json").get("stopped") != "diverged":
        return set()
    waiting = [c for c in rest if _group(c) == _group(cell)]
    if waiting:
        log(
            f"{cell.title} diverged: its rate moves down for every seed, so "
            f"{', '.join(c.title for c in waiting)} will not run at it"
        )
    return {_group(cell)}


def _run_isolated(todo: list[Cell], jobs: int, deadline: float | None, log) -> list[str]:
    """Each cell in a process of its own, ``jobs`` at a time, its output in its folder's log.txt."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    import zotune  # the cells import the zotune this process runs, wherever it is installed

    package = str(Path(zotune.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package, env.get("PYTHONPATH")]))
    pending, running, failures, stopped = list(enumerate(todo, 1)), {}, [], None
    with StopFlag((signal.SIGTERM,)) as stop:  # Ctrl-C reaches the cells itself (one process group)
        try:
            while pending or running:
                while pending and len(running) < jobs and stopped is None:
                    n, cell = pending.pop(0)
                    with open(cell.dir / "log.txt", "ab") as output:
                        proc = subprocess.Popen(
                            [sys.executable, __file__, "--cell", str(cell.dir), cell.kind],
                            stdout=output,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            env=env,
                        )
                    running[proc] = (n, cell, time.monotonic())
                    log(f"[{n}/{len(todo)}] {cell.title}: started (output in {cell.dir / 'log.txt'})")
                time.sleep(0.2)
                if stopped is None and (stop.requested or (deadline is not None and time.monotonic() > deadline)):
                    stopped = "SIGTERM" if stop.requested else "--time-limit"
                    log(f"{stopped}: stopping {len(running)} running cells (each saves its state)")
                    _signal_all(running, signal.SIGTERM)
                    _wait_all(running, CELL_STOP_GRACE_S)
                for proc in [p for p in running if p.poll() is not None]:
                    n, cell, started = running.pop(proc)
                    if proc.returncode == 0:
                        log(f"[{n}/{len(todo)}] {cell.title}: done in {(time.monotonic() - started) / 60:.1f} min")
                        skip = _skip_after_divergence(cell, [c for _, c in pending], log)
                        pending = [(m, c) for m, c in pending if _group(c) not in skip]
                    elif proc.returncode not in (130, -signal.SIGINT, -signal.SIGTERM):
                        failures.append(f"{cell.title}: exit code {proc.returncode} (see {cell.dir / 'log.txt'})")
                        log(f"  failed: {failures[-1]}")
                if stopped is not None:
                    pending.clear()
        except KeyboardInterrupt:
            _wait_all(running, CELL_STOP_GRACE_S)
            raise
        finally:
            for proc in running:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    if stopped is not None:
        raise Stopped(f"{stopped}: cells stopped with their state saved")
    return failures


def _signal_all(running: dict, signum: int) -> None:
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signum)


def _wait_all(running: dict, grace: float) -> None:
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _cell_main(cell_dir: str, kind: str) -> int:
    """The child process of an isolated cell."""
    try:
        run_cell(Path(cell_dir), kind, isolated=True)
    except UserError as err:
        print(f"convergence cell: error: {err}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt):
        return 130
    return 0


# -- reading runs --------------------------------------------------------------------------------------


@dataclass
class Point:
    """One validation of a run: where it was on the budget, and what it measured."""

    step: int
    passes: int  # forward passes of training up to this validation
    minutes: float | None  # the run's training time up to it (earlier validations included; None: not recorded)
    value: float  # the validation metric (a fraction)


@dataclass
class Curve:
    points: list[Point]
    summary: dict | None
    recorded_passes: bool  # whether metrics.jsonl carried forward_passes (else steps x passes per step)


def read_curve(run_dir: Path, passes_per_step: int) -> Curve:
    """A run's validations against forward passes, from its metrics.jsonl (and summary.json, if finished)."""
    summary_path = run_dir / "summary.json"
    summary = checkpoint.read_json(summary_path) if summary_path.is_file() else None
    rows = []
    text = (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").is_file() else ""
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written by a running cell
            continue
    metric = (summary or {}).get("metric") or next(
        (k[len("validation_") :] for r in rows for k in r if k.startswith("validation_")), "accuracy"
    )
    # what train.init spent before the first step (the probe's features), from the run's first line or its summary
    init = next((r for r in rows[:1] if "init_forward_passes" in r), None) or summary or {}
    setup, setup_minutes = init.get("init_forward_passes", 0), init.get("init_seconds", 0.0) / 60
    key, steps, recorded = f"validation_{metric}", {0: (setup, setup_minutes)}, False
    points = []
    for row in rows:
        step = row.get("step", 0)
        if "loss" in row:  # a step's line; forward_passes where the library records it
            recorded = recorded or "forward_passes" in row
            passes = setup + (row["forward_passes"] if "forward_passes" in row else step * passes_per_step)
            minutes = setup_minutes + row["elapsed"] / 60 if "elapsed" in row else None
            steps[step] = (passes, minutes)
        elif key in row or f"zero_shot_{key}" in row:  # the start is logged as zero_shot_validation_*
            passes, minutes = steps.get(step, (setup + step * passes_per_step, None))
            points.append(Point(step, passes, minutes, row[key] if key in row else row[f"zero_shot_{key}"]))
    return Curve(points, summary, recorded)


def trained_score(curve: Curve) -> tuple[float, float]:
    """What tuning ranks a grid point by: the best validation after the start, then the last one."""
    trained = [p.value for p in curve.points if p.step > 0 and math.isfinite(p.value)]
    return (max(trained), trained[-1]) if trained else (-math.inf, -math.inf)


def choose(curves: list[Curve]) -> int:
    """The index of the grid point with the best score (:func:`trained_score`); ties go to the earlier point."""
    scores = [trained_score(c) for c in curves]
    return max(range(len(curves)), key=lambda i: (scores[i], -i))


def reached_at(points: list[Point], target: float) -> Point | None:
    """The first validation (in forward passes) at or above ``target``; None if the run never got there."""
    for point in sorted(points, key=lambda p: p.passes):
        if point.value >= target:
            return point
    return None


# -- the phases ----------------------------------------------------------------------------------------


def beyond_edge(method: str, points: list[dict], best: int, extend: int) -> dict | None:
    """The next rate past the grid's edge when tuning's best rate is at that edge; None when it is inside.

    A best rate at the bottom (top) of the points run is not known to be the best: the optimum may lie
    beyond it, and a control tuned at its grid's edge is not a tuned control. So the rule, the same for
    every method: one more point past that edge, spaced as the grid is there (5e-6, 1e-5 -> 2.5e-6),
    until the best is inside or ``extend`` points were added on that side. Only a grid of rates alone
    extends (the grids here are); ``points`` are those run so far, the grid's first, ``best`` an index.
    """
    grid = grid_points(method)
    if extend < 1 or len(points) < 2 or any(set(p) != {"lr"} for p in points):
        return None
    rates = sorted(p["lr"] for p in points)
    lr = points[best]["lr"]
    low, high = min(p["lr"] for p in grid), max(p["lr"] for p in grid)
    if lr == rates[0]:
        new, added = rates[0] * rates[0] / rates[1], sum(r < low for r in rates)
    elif lr == rates[-1]:
        new, added = rates[-1] * rates[-1] / rates[-2], sum(r > high for r in rates)
    else:
        return None
    return {"lr": float(f"{new:.3g}")} if added < extend else None


def phase_tune(plan: Plan, deadline, log) -> tuple[dict, list[str]]:
    """Run each method's grid (and the points past its edge that :func:`beyond_edge` asks for); choose."""
    path = Path(plan.out) / "chosen.json"
    chosen = _read_optional(path)
    points = {(t, m): grid_points(m) for t in plan.tasks for m in plan.methods}
    while True:
        cells = tune_cells(plan, points)
        failures = run_cells(cells, plan, deadline, log)
        grew = False
        for (task, method), run in points.items():
            group = [c for c in cells if c.task == task and c.method == method]
            if not all(c.done for c in group):
                continue
            curves = [read_curve(c.dir / "run", METHODS[method].passes_per_step) for c in group]
            best = choose(curves)
            extra = beyond_edge(method, run, best, plan.extend)
            if extra is not None:
                run.append(extra)
                grew = True
                log(
                    f"{TASK_TITLES.get(task, task)}: {method}'s best rate, {point_name(group[best].point)}, is at "
                    f"its grid's edge: tuning {point_name(extra)} too"
                )
                continue
            entry = {
                "point": group[best].point,
                "tune_budget": plan.tune_budget,
                "grid": [
                    {
                        "point": c.point,
                        "best_trained": trained_score(k)[0],
                        "last": trained_score(k)[1],
                        "stopped": (k.summary or {}).get("stopped"),
                    }
                    for c, k in zip(group, curves)
                ],
            }
            tuned = chosen.setdefault(task, {})
            tuned[method] = retuned(plan, task, method, tuned.get(method), entry, log)
        checkpoint.write_json(path, chosen)
        if not grew or failures:
            return chosen, failures


def retuned(plan: Plan, task: str, method: str, old: dict | None, new: dict, log) -> dict:
    """The method's entry after tuning: the old one when tuning found nothing new (it keeps a step down).

    With new tuning results (a point past the grid's edge), rates that diverged in final runs before stay
    stepped down from (:func:`step_down`), and final runs made at a rate no longer chosen move to
    ``final/TASK/METHOD/superseded/POINT/``: every seed runs again at the new rate.
    """
    if old is None or old.get("grid") == new["grid"]:
        return old or new
    new["diverged_in_final"] = old.get("diverged_in_final", [])
    failed, tuned = [d["point"] for d in new["diverged_in_final"]], [g["point"] for g in new["grid"]]
    while new["point"] in failed and lower_point(tuned, new["point"]) is not None:
        new["point"] = lower_point(tuned, new["point"])
    folder = Path(plan.out) / "final" / task / method
    if new["point"] != old["point"] and any((folder / f"seed{s}").is_dir() for s in plan.seeds):
        aside = set_aside(folder, plan.seeds, folder / "superseded" / point_name(old["point"]))
        log(
            f"{TASK_TITLES.get(task, task)}: {method} now tuned to {point_name(new['point'])}, not "
            f"{point_name(old['point'])}: its final runs at that rate moved to {aside}"
        )
    return new


def set_aside(folder: Path, seeds: list[int], aside: Path) -> Path:
    """Move the final runs ``folder/seed<k>`` into ``aside`` (kept, never overwritten: a second move of the same
    rate goes to ``aside-2``, ...). Returns the folder they went to."""
    target, n = aside, 1
    while any((target / f"seed{s}").exists() for s in seeds):
        n += 1
        target = aside.with_name(f"{aside.name}-{n}")
    target.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        if (folder / f"seed{seed}").is_dir():
            (folder / f"seed{seed}").rename(target / f"seed{seed}")
    return target


def lower_point(points: list[dict], point: dict) -> dict | None:
    """Of ``points`` (those tuned), the one with the next smaller rate and every other field the same."""
    lower = [p for p in points if p["lr"] < point["lr"] and {**p, "lr": point["lr"]} == point]
    return max(lower, key=lambda p: p["lr"]) if lower else None


def step_down(plan: Plan, chosen: dict, log) -> bool:
    """Move every method whose tuned rate diverged in a final run to its grid's next smaller rate.

    Tuning ranks rates over ``tune_budget`` forward passes, a fifth of the final budget, and a short horizon
    favours large rates: a rate that held for 200 passes can diverge by 800 (tuned MeZO's 1e-4 on SST-2 did,
    RESULTS.md). A control that diverges makes an easy target, so the rule, the same for every method, is the
    practitioner's: the next smaller rate of the same grid, and both seeds run again with it. The diverged runs
    move to ``final/TASK/METHOD/diverged/POINT/`` (the table notes them); at the grid's bottom the method stays
    and its row says it diverged. Returns whether a method moved (its final cells are to run).
    """
    moved = False
    for task in plan.tasks:
        for method in plan.methods:
            entry = chosen.get(task, {}).get(method)
            if not entry:
                continue
            folder = Path(plan.out) / "final" / task / method
            summaries = {s: _read_optional(folder / f"seed{s}" / "run" / "summary.json") for s in plan.seeds}
            diverged = {s: v["steps"] for s, v in summaries.items() if v.get("stopped") == "diverged"}
            if not diverged:
                continue
            point = entry["point"]
            lower = lower_point([g["point"] for g in entry.get("grid", [])] or grid_points(method), point)
            if lower is None:
                continue
            aside = set_aside(folder, plan.seeds, folder / "diverged" / point_name(point))
            entry.setdefault("diverged_in_final", []).append(
                {"point": point, "steps": {str(s): n for s, n in diverged.items()}}
            )
            entry["point"] = lower
            moved = True
            log(
                f"{TASK_TITLES.get(task, task)}: {method} at {point_name(point)} diverged in its final run "
                f"(seed {', '.join(map(str, diverged))}); running it at {point_name(lower)} (the runs that "
                f"diverged are in {aside})"
            )
    return moved


def phase_final(plan: Plan, deadline, log) -> list[str]:
    path = Path(plan.out) / "chosen.json"
    chosen = _read_optional(path)
    missing = untuned(plan, chosen)
    if len(missing) == len(plan.tasks) * len(plan.methods):
        raise ConfigError("no method is tuned yet: run --phase tune first")
    if missing:
        log(f"not tuned yet, so not run: {', '.join(missing)} (run --phase tune)")
    failures, ran = [], False
    while True:
        moved = step_down(plan, chosen, log)  # a divergence in the runs before this command, or just now
        if moved:
            checkpoint.write_json(path, chosen)
        if ran and not moved:
            return failures
        failures, ran = run_cells(final_cells(plan, chosen), plan, deadline, log), True


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def _per_seed(values: list, fmt=_fmt) -> str:
    return " / ".join(fmt(v) for v in values)


def _pct(value):
    return None if value is None else 100 * value


def task_table(plan: Plan, task: str, chosen: dict) -> tuple[list[str], dict]:
    """The markdown of one task: the tuning, the final table and its notes; and the curves, for the plot."""
    title = TASK_TITLES.get(task, task)
    curves = {
        m: {
            s: read_curve(Path(plan.out) / "final" / task / m / f"seed{s}" / "run", METHODS[m].passes_per_step)
            for s in plan.seeds
        }
        for m in plan.methods
    }
    done = {m: {s: c for s, c in by_seed.items() if c.summary is not None} for m, by_seed in curves.items()}
    reference = done.get(REFERENCE, {})
    targets = {s: reference[s].points[-1].value if s in reference and reference[s].points else None for s in plan.seeds}
    inference = _read_optional(Path(plan.out) / "inference" / task / "result.json")
    lines = [
        f"### {title}: forward passes to tuned MeZO's validation accuracy at {plan.budget:,} forward passes",
        "",
        f"Target (tuned MeZO's last validation, seeds {_per_seed(plan.seeds, str)}): "
        f"{_per_seed([_pct(t) for t in targets.values()])}.",
        "",
        "| method | passes / step | tuned | steps | forward passes to the target (x budget) | minutes to it "
        "| best validation | test | test vs MeZO | peak memory (x inference) |",
        "| --- | ---: | --- | ---: | --- | --- | --- | --- | --- | --- |",
    ]
    notes, mezo_test = [], None
    lines.append(_start_row(plan, done, inference))
    for method in plan.methods:
        m = METHODS[method]
        runs = done[method]
        point = chosen.get(task, {}).get(method, {}).get("point")
        tuned = ", ".join(f"{k} {v:g}" for k, v in point.items()) if point else "–"
        if len(runs) < len(plan.seeds):
            missing = [str(s) for s in plan.seeds if s not in runs]
            notes.append(f"{method}: seeds {', '.join(missing)} not finished yet (left out of its row)")
        if not runs:
            lines.append(f"| {method} | {m.passes_per_step} | {tuned} | – | not run yet | | | | | |")
            continue
        seeds = sorted(runs)
        hits = {s: reached_at(runs[s].points, targets[s]) for s in seeds if targets.get(s) is not None}
        passes = [hits[s].passes if hits.get(s) else None for s in seeds]
        minutes = [hits[s].minutes if hits.get(s) else None for s in seeds]
        shown = _per_seed(
            [hits[s].passes if hits.get(s) else "no" if s in hits else "–" for s in seeds],
            lambda v: v if isinstance(v, str) else f"{v:,.10g}",  # a probe's passes may be fractional (62.5)
        )
        if all(p is not None for p in passes):
            mean = _mean(passes)
            shown_mean = f"{mean:,.0f}" if mean == round(mean) else f"{mean:,.1f}"  # 2.5, not 2 (round half even)
            reach = f"{shown_mean} ({mean / plan.budget:.2f}x): {shown}"
        elif any(s in hits and hits[s] is None for s in seeds):
            reach = f"not reached (seeds {', '.join(str(s) for s in seeds if s in hits and hits[s] is None)}): {shown}"
        else:
            reach = f"– (no target: tuned MeZO not finished): {shown}"
        reach_min = _per_seed(minutes, lambda v: "–" if v is None else f"{v:.1f}")
        metric = runs[seeds[0]].summary["metric"]
        best = [_pct((runs[s].summary.get("best_validation") or {}).get("metric")) for s in seeds]
        test = [_pct(runs[s].summary.get("test", {}).get(metric)) for s in seeds]
        if method == REFERENCE:
            mezo_test, versus = dict(zip(seeds, test)), "–"
        elif mezo_test:
            diffs = [t - mezo_test[s] for s, t in zip(seeds, test) if s in mezo_test and t is not None]
            delta = _mean(diffs)
            verdict = "wins" if delta and delta > 0 else "loses" if delta and delta < 0 else "ties"
            versus = (
                f"{delta:+.1f}, {verdict} (higher on {sum(d > 0 for d in diffs)}/{len(diffs)} seeds)"
                if delta is not None
                else "–"
            )
        else:
            versus = "–"
        lines.append(
            f"| {method} | {m.passes_per_step} | {tuned} | {runs[seeds[0]].summary['steps']} | {reach} | "
            f"{reach_min} | {_fmt(_mean(best))} ({_per_seed(best)}) | {_fmt(_mean(test))} "
            f"({_per_seed(test)}) | {versus} | {_memory(plan, task, method, runs, inference)} |"
        )
        for s in seeds:
            summary = runs[s].summary
            if summary.get("stopped") not in (None, "steps"):
                notes.append(f"{method} seed {s} stopped early: {summary['stopped']} at step {summary['steps']}")
            recorded = summary.get("forward_passes")
            if recorded is not None and recorded != summary["steps"] * m.passes_per_step:
                notes.append(
                    f"{method} seed {s} records {recorded} forward passes for {summary['steps']} steps, not "
                    f"{m.passes_per_step} a step: its entry's passes_per_step is wrong"
                )
        setups = sorted(
            {runs[s].summary["init_forward_passes"] for s in seeds if "init_forward_passes" in runs[s].summary}
        )
        if setups:
            notes.append(
                f"{method}: its forward passes and minutes include the {'/'.join(f'{x:g}' for x in setups)} training "
                f"batches' worth of features (and the seconds) its train.init ({runs[seeds[0]].summary.get('init')}) "
                "took before the first step, taken out of its budget"
            )
        for moved in chosen.get(task, {}).get(method, {}).get("diverged_in_final", []):
            at = ", ".join(f"seed {s} at step {n}" for s, n in moved["steps"].items())
            notes.append(
                f"{method}: {point_name(moved['point'])} diverged in its final run ({at}), so both seeds ran at the "
                f"grid's next smaller rate (the same rule for every method: tuning's {plan.tune_budget:,} passes "
                f"favour large rates)"
            )
        if method == REFERENCE:
            for s in seeds:
                start = _at_start(runs[s])
                if start is not None and targets.get(s) is not None and targets[s] <= start:
                    notes.append(
                        f"seed {s}: tuned MeZO ended no higher than it started ({_fmt(_pct(start))}), "
                        f"so the target is met at 0 forward passes"
                    )
        elif all(p is not None for p in passes) and min(passes) > 0 and max(passes) <= plan.budget / 4:
            notes.append(f"{method} reached the target within a quarter of the budget on every seed")
    counted = (
        "as recorded (forward_passes)"
        if any(c.recorded_passes for r in done.values() for c in r.values())
        else "as steps x passes per step (these runs do not record forward_passes)"
    )
    notes += [
        f"forward passes counted {counted}; minutes: the run's training time up to that validation "
        f"(validations included; {plan.jobs} cell(s) sharing the machine at a time)",
        f"best validation includes the start (step 0); test: the best validation weights; "
        f"per seed in parentheses ({_per_seed(plan.seeds, str)})",
        "the model as loaded: its validation on each seed's split, its test (the same split for every seed) from the "
        "inference cell, and that test against tuned MeZO's (positive: MeZO ended below its start on test)",
    ]
    return lines + [""] + [f"- {n}" for n in notes] + [""] + tuning_table(plan, task, chosen), curves


def _at_start(curve) -> float | None:
    """A run's validation at step 0 (its start), if it was taken."""
    return next((p.value for p in curve.points if p.step == 0), None)


def _start_row(plan: Plan, done: dict, inference: dict) -> str:
    """The model as loaded: its validation per seed (each seed draws its own validation split; read from the step-0
    point of MeZO's runs), its test (the inference cell's: the test split is every seed's), and its test against
    tuned MeZO's, so that a method that ends below where it started shows as such."""
    runs = done.get(REFERENCE, {})
    seeds = sorted(runs) or list(plan.seeds)
    start = [_pct(_at_start(runs[s])) if s in runs else None for s in seeds]
    metric = next((r.summary["metric"] for r in runs.values()), None)
    test = _pct((inference.get("test") or {}).get(metric)) if metric else None
    mezo = [_pct(runs[s].summary.get("test", {}).get(metric)) for s in seeds if s in runs]
    versus = _mean([test - t for t in mezo if t is not None]) if test is not None and mezo else None
    peak = inference.get("peak_memory_mb") if inference.get("memory_measured") else None
    return (
        f"| the model as loaded | – | – | 0 | – | – | {_fmt(_mean(start))} ({_per_seed(start)}) | {_fmt(test)} | "
        f"{'–' if versus is None else f'{versus:+.1f}'} | {'–' if peak is None else f'{peak:,.0f} MB (1.00x)'} |"
    )


def _read_optional(path: Path) -> dict:
    return checkpoint.read_json(path) if path.is_file() else {}


def _memory(plan: Plan, task: str, method: str, runs: dict, inference: dict | None) -> str:
    """The highest peak over seeds, against inference's and in parameter-sized buffers over it."""
    folder = Path(plan.out) / "final" / task / method
    measured = [s for s in runs if _read_optional(folder / f"seed{s}" / "cell.json").get("memory_measured")]
    if not measured:
        return "not measured (cells in one CPU process)"
    peak = max(runs[s].summary["peak_memory_mb"] for s in measured)
    if not inference or not inference.get("memory_measured"):
        return f"{peak:,.0f} MB"
    dtype = load_config(folder / f"seed{measured[0]}" / "cell.yaml").model.dtype
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    buffer_mb = runs[measured[0]].summary["trainable_parameters"] * width / 2**20
    over = (peak - inference["peak_memory_mb"]) / buffer_mb
    return f"{peak:,.0f} MB ({peak / inference['peak_memory_mb']:.2f}x, {over:+.2f} parameter buffers)"


def tuning_table(plan: Plan, task: str, chosen: dict) -> list[str]:
    lines = [
        f"Tuning on {TASK_TITLES.get(task, task)} (seed 0, validation; {plan.tune_budget:,} forward passes a "
        f"point, the same grid size for every method, and up to {plan.extend} more past an edge where the best was "
        f"at it):",
        "",
        "| method | grid point | best validation after the start | last validation | |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for method in plan.methods:
        entry = chosen.get(task, {}).get(method)
        if not entry:
            lines.append(f"| {method} | not tuned yet | | | |")
            continue
        grid = grid_points(method)
        for row in entry["grid"]:
            failed = any(row["point"] == d["point"] for d in entry.get("diverged_in_final", []))
            mark = "chosen" if row["point"] == entry["point"] else "diverged in the final run" if failed else ""
            if row["point"] not in grid:
                mark = ", ".join(filter(None, ["past the grid's edge", mark]))
            stopped = f" ({row['stopped']})" if row.get("stopped") not in (None, "steps") else ""
            lines.append(
                f"| {method} | {point_name(row['point'])}{stopped} | {_fmt(_pct(row['best_trained']))} | "
                f"{_fmt(_pct(row['last']))} | {mark} |"
            )
    return lines


def plot_task(plan: Plan, task: str, curves: dict, path: Path) -> Path:
    """Validation accuracy against forward passes: every method (a color) and seed (a line style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    styles = ["-", "--", ":", "-."]
    for i, method in enumerate(plan.methods):
        for j, seed in enumerate(plan.seeds):
            points = curves[method][seed].points
            if points:
                ax.plot(
                    [p.passes for p in points],
                    [100 * p.value for p in points],
                    color=f"C{i}",
                    linestyle=styles[j % len(styles)],
                    marker="o",
                    markersize=3,
                    linewidth=1.4,
                    label=f"{method}, seed {seed}",
                )
    ax.axvline(plan.budget / 4, color="gray", linestyle=":", linewidth=1.0)  # the target: a quarter
    ax.annotate(
        "1/4 of the budget",
        (plan.budget / 4, 0.02),
        xycoords=("data", "axes fraction"),
        xytext=(3, 0),
        textcoords="offset points",
        fontsize=7,
        color="gray",
    )
    ax.set_xlabel("forward passes")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{TASK_TITLES.get(task, task)}: methods at their tuned rates, {plan.budget:,} forward passes")
    if ax.lines:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def phase_table(plan: Plan, log) -> str:
    chosen = _read_optional(Path(plan.out) / "chosen.json")
    header = [
        f"Model {plan.model}; methods: "
        + "; ".join(
            f"{m} = {METHODS[m].label or m}, {METHODS[m].passes_per_step} forward passes a step" for m in plan.methods
        ),
        "",
        f"Budget {plan.budget:,} forward passes per run; tuning {plan.tune_budget:,} per grid point; "
        f"validation every {plan.eval_passes:,}; seeds {', '.join(map(str, plan.seeds))}.",
        "",
    ]
    sections = []
    for task in plan.tasks:
        lines, curves = task_table(plan, task, chosen)
        png = plot_task(plan, task, curves, Path(plan.out) / f"curves-{task}.png")
        sections.append("\n".join(lines + ["", f"Learning curves: `{png}`"]))
    table = "\n".join(header) + "\n" + "\n\n".join(sections)
    (Path(plan.out) / "table.md").write_text(table + "\n")
    log(table)
    return table


def machine() -> str:
    """The CPU (model and cores) and GPU of this machine, as RESULTS.md names them."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores; {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def append_results(path: Path, table: str, argv: list[str]) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/convergence.py", *argv])
    text = (
        f"\n## {when}: forward passes to tuned MeZO's accuracy (`benchmarks/convergence.py`)\n\n"
        f"- machine: {machine()}\n- command: `{command}`\n\n{table}\n"
    )
    with open(path, "a") as f:
        f.write(text)


# -- the command line ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Words after -- are run-config overrides for every cell (--section.field value).",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="sizes for a 2-core CPU or one 10-minute H100 call")
    p.add_argument("--phase", default="all", choices=["all", "tune", "final", "table"])
    p.add_argument("--out", help=f"output folder (default {DEFAULTS['out']})")
    p.add_argument("--resume", metavar="OUT", help="continue the benchmark in OUT with the options it was started with")
    p.add_argument(
        "--methods", help=f"comma-separated, of {', '.join(METHODS)} (default {','.join(DEFAULTS['methods'])})"
    )
    p.add_argument("--tasks", help=f"comma-separated registered tasks (default {','.join(DEFAULTS['tasks'])})")
    p.add_argument("--seeds", help="comma-separated seeds of the final runs (default 0,1)")
    p.add_argument("--budget", type=int, help="forward passes of each final run (default 2000)")
    p.add_argument("--tune-budget", type=int, help="forward passes of each tuning run (default 400)")
    p.add_argument("--eval-passes", type=int, help="validate every this many forward passes (default 200)")
    p.add_argument("--model", help=f"model name, .gguf file or folder (default {DEFAULTS['model']})")
    p.add_argument("--data-dir", help="folder of the task data (default ../shared/data); SST-2 uses the bundled sample")
    p.add_argument("--jobs", type=int, help="cells at once, each in its own process (default 1)")
    p.add_argument(
        "--extend",
        type=int,
        help="where tuning's best rate is at its grid's edge, tune this many more rates past it at most, "
        "one at a time (default 2; 0: the grid alone)",
    )
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each cell in a process of its own (default); --no-isolate: all in this one (tests; peak "
        "memory is then measured on a GPU only)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        help="minutes after which the running cells stop, their state saved, "
        "and the table is drawn (--no-isolate: no cell starts after it)",
    )
    p.add_argument(
        "--append",
        metavar="FILE",
        help="append the table to FILE (benchmarks/RESULTS.md) with the date, machine and command",
    )
    p.add_argument("--cell", nargs=2, metavar=("DIR", "KIND"), help=argparse.SUPPRESS)  # an isolated cell's process
    return p


def make_plan(args, overrides: list[str]) -> Plan:
    """The plan from --resume's plan.json (if any), then the preset, then the options given."""
    values = dict(DEFAULTS)
    values["data_dir"] = next(
        (str(d) for d in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data") if d.is_dir()), None
    )
    if args.resume:
        saved = Path(args.resume) / "plan.json"
        if not saved.is_file():
            raise ConfigError(f"{args.resume} holds no plan.json: not a benchmark folder")
        values.update(checkpoint.read_json(saved))
    values.update(PRESETS.get(args.preset, {}))
    given = {
        "out": args.out,
        "budget": args.budget,
        "tune_budget": args.tune_budget,
        "eval_passes": args.eval_passes,
        "model": args.model,
        "data_dir": args.data_dir,
        "jobs": args.jobs,
        "time_limit": args.time_limit,
        "extend": args.extend,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    for name in ("methods", "tasks"):
        if getattr(args, name):
            values[name] = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
    if args.seeds:
        try:
            values["seeds"] = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--seeds must be whole numbers, got {args.seeds!r}") from None
    if args.isolate is not None:
        values["isolate"] = args.isolate
    if overrides:
        values["overrides"] = overrides
    if args.resume and not args.out:
        values["out"] = args.resume
    names = {f for f in Plan.__dataclass_fields__}
    return Plan(**{k: v for k, v in values.items() if k in names})


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = _parser().parse_args(words)
    if args.cell:
        return _cell_main(*args.cell)
    try:
        plan = make_plan(args, overrides)
        parse_overrides(plan.overrides)  # a bad override fails before anything is written
        out = Path(plan.out)
        if args.phase != "table":  # cells this plan would change are refused before the plan is recorded
            for cell in tune_cells(plan) + final_cells(plan, _read_optional(out / "chosen.json")):
                _check(cell)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(out / "plan.json", asdict(plan))
        deadline = time.monotonic() + 60 * plan.time_limit if plan.time_limit > 0 else None
        failures: list[str] = []
        try:
            if args.phase in ("all", "tune"):
                failures += phase_tune(plan, deadline, log)[1]
            if args.phase in ("all", "final"):
                failures += phase_final(plan, deadline, log)
        except Stopped as stopped:
            log(f"{stopped}; continue with: python benchmarks/convergence.py --resume {plan.out}")
            if args.phase != "all":
                return 130
        table = phase_table(plan, log) if args.phase in ("all", "table") else None
        if table is not None and args.append:
            append_results(Path(args.append), table, argv)
            log(f"appended to {args.append}")
        for failure in failures:
            log(f"failed: {failure}")
        return 1 if failures else 0
    except UserError as err:
        print(f"convergence: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "convergence: interrupted; the cells saved their state: run the same command (or --resume OUT) to continue",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
