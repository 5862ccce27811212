"""The methods of a comparison grid: each a row of the table, registered by name (:data:`METHODS`)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from zotune.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from zotune.compare.grid import CompareConfig

__all__ = ["METHODS", "Method", "register"]


@dataclass(frozen=True)
class Method:
    """A row of the table: how to run one cell, and the run-config defaults it brings."""

    name: str
    label: str  # the row's title in the table, as the paper's
    run: Callable[..., dict]  # (RunConfig, CompareConfig, cell directory, log) -> {"validation", "test", ...}
    defaults: dict = field(default_factory=dict)  # RunConfig-shaped overrides applied before the grid's


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to :data:`METHODS` (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


# -- the methods --------------------------------------------------------------------------------
def _zero_shot(config: RunConfig, grid: CompareConfig, cell_dir: Path, log) -> dict:
    from zotune.objectives import evaluate
    from zotune.train import prepare

    prepared = prepare(config, log=log)
    started = time.perf_counter()
    out = {
        s: evaluate(prepared.objective, prepared.loaded.model, prepared.encoded[s], config.train.eval_batch_size)
        for s in ("validation", "test")
        if prepared.encoded[s]
    }
    return {**out, "wall_time_s": round(time.perf_counter() - started, 1)}


def _icl(config: RunConfig, grid: CompareConfig, cell_dir: Path, log) -> dict:
    from zotune.baselines.icl import ICLConfig, in_context
    from zotune.train import prepare

    icl = _section(ICLConfig, {**grid.icl, "seed": config.task.seed}, "icl")
    return in_context(prepare(config, log=log), icl, log=log, progress=config.train.progress)


def _lp(config: RunConfig, grid: CompareConfig, cell_dir: Path, log) -> dict:
    from zotune.baselines.probe import ProbeConfig, linear_probe
    from zotune.train import prepare

    return linear_probe(prepare(config, log=log), _section(ProbeConfig, grid.lp, "lp"), log=log)


def _mezo(config: RunConfig, grid: CompareConfig, cell_dir: Path, log) -> dict:
    from zotune.train import run

    config.train.output_dir = str(cell_dir / "run")
    config.train.zero_shot = False  # the zero-shot row is its own method (keep_start still validates the start)
    done = cell_dir / "run" / "summary.json"  # written last, whole: a cell stopped before its result.json
    if done.is_file():
        log(f"{done.parent} finished before: its summary.json is the result")
        summary = json.loads(done.read_text())
    else:
        resume = cell_dir / "run" if (cell_dir / "run" / "state.json").is_file() else None
        result = run(None if resume else config, resume=resume, log=log)
        if result.interrupted:
            raise KeyboardInterrupt
        summary = result.summary
    best = summary.get("best_validation") or {}
    return {
        "validation": best.get("metrics", {}),
        "test": summary["test"],
        "best_step": best.get("step"),
        "beat_start": summary.get("beat_start"),  # False: no step beat the start; its test is the start's
        "steps": summary["steps"],
        "wall_time_s": summary["wall_time_s"],
        "trajectory_bytes": summary["trajectory_bytes"],
        "trainable_parameters": summary["trainable_parameters"],
    }


def _ft(config: RunConfig, grid: CompareConfig, cell_dir: Path, log) -> dict:
    from zotune.baselines.finetune import FinetuneConfig, finetune
    from zotune.train import prepare

    ft = _section(FinetuneConfig, {"seed": config.task.seed, "progress": config.train.progress, **grid.ft}, "ft")
    return finetune(prepare(config, log=log), ft, eval_batch_size=config.train.eval_batch_size, log=log)


# The paper's hyper-parameters for OPT-13B (Table 15): MeZO lr 1e-6/1e-7 eps 1e-3; LoRA lr 1e-4/5e-5
# eps 1e-2; prefix lr 1e-2/1e-3 eps 1e-1. SmolLM2-135M wants a larger full-parameter lr (the default
# run's 5e-5); the LoRA and prefix values below were chosen the same way, on SST-2 validation.
register(Method("zero-shot", "Zero-shot", _zero_shot))
register(Method("icl", "ICL", _icl))
register(Method("lp", "LP", _lp))
register(Method("mezo", "MeZO", _mezo, {"model": {"tuning": "full"}}))
register(
    Method("mezo-lora", "MeZO (LoRA)", _mezo, {"model": {"tuning": "lora"}, "optimizer": {"lr": 1e-3, "eps": 1e-2}})
)
register(
    Method(
        "mezo-prefix", "MeZO (prefix)", _mezo, {"model": {"tuning": "prefix"}, "optimizer": {"lr": 1e-2, "eps": 1e-1}}
    )
)
register(Method("lp-mezo", "LP-MeZO", _mezo, {"model": {"tuning": "full"}, "train": {"init": "probe"}}))
# FZOO (arXiv 2506.09034) as its paper runs it: N = 8 Rademacher directions, one-sided. Its step is about
# lr / (eps sqrt(N)) per element: 2e-6 at eps 1e-3 is the rate of the calibration run on the default
# SST-2 setup (eta 2e-3 in the eps-free form); benchmarks/convergence.py tunes it against a tuned MeZO.
register(
    Method(
        "fzoo",
        "FZOO",
        _mezo,
        {
            "model": {"tuning": "full"},
            "optimizer": {
                "estimator": "fzoo",
                "distribution": "rademacher",
                "n_perturbations": 8,
                "fuse_next": False,
                "lr": 2e-6,
            },
        },
    )
)
# HiZOO (arXiv 2402.15173): its s starts at 1, where its step is MeZO's, so MeZO's rate and the config's alpha
# (chosen from the kappa measured on SmolLM2). One float32 tensor per parameter beyond inference.
register(Method("hizoo", "HiZOO", _mezo, {"model": {"tuning": "full"}, "optimizer": {"estimator": "hizoo"}}))
# LOZO (arXiv 2410.07698): low-rank directions U V^T / sqrt(r) on the matrices (rank 2, V redrawn every 50 steps);
# its entries have unit variance, as z's, so MeZO's rate.
register(Method("lozo", "LOZO", _mezo, {"model": {"tuning": "full"}, "optimizer": {"distribution": "lowrank"}}))
# SubZero (arXiv 2410.08989): U Z V^T with orthonormal U, V (rank 2, redrawn every 50 steps), scaled to unit-variance
# entries as MeZO's z: MeZO's rate.
register(Method("subzero", "SubZero", _mezo, {"model": {"tuning": "full"}, "optimizer": {"distribution": "subzero"}}))
# KerZOO (arXiv 2505.18886): MeZO's step in the mean, with 2.5x its noise (the cubic kernel's E[(r K)^2] = 6.25):
# MeZO's rate divided by 2.5. benchmarks/convergence.py tunes it.
register(
    Method("kerzoo", "KerZOO", _mezo, {"model": {"tuning": "full"}, "optimizer": {"estimator": "kerzoo", "lr": 2e-5}})
)
# Sparse-MeZO (arXiv 2402.15751): a quarter of each matrix (its smallest magnitudes) perturbed and updated. The
# paper finds the sparse step tolerates larger rates than MeZO's; on SmolLM2-135M SST-2 tuning chose 1e-4 (2e-4 fell
# back after 100 passes, 5e-4 diverged) and it held for 1,000 forward passes (benchmarks/RESULTS.md, 2026-12-06).
register(
    Method(
        "sparse-mezo",
        "Sparse-MeZO",
        _mezo,
        {"model": {"tuning": "full"}, "optimizer": {"sparsity": 0.75, "lr": 1e-4}},
    )
)
# ZO-Muon (arXiv 2602.17155): 4 two-sided queries in rank-8 subspaces (P redrawn every 50 steps). Its update has
# norm sqrt(r) per matrix whatever the losses, so its rate is on another scale: about 0.005 lr per element on a
# 576 x 576 matrix, so 3e-2 moves it about as far as MeZO's default does; eps 1e-2 because u = P Psi has entries
# of about sqrt(r / m) (0.12 at m = 576) where MeZO's z has 1. benchmarks/convergence.py tunes it.
register(
    Method(
        "zo-muon",
        "ZO-Muon",
        _mezo,
        {
            "model": {"tuning": "full"},
            "optimizer": {"variant": "muon", "lowrank_rank": 8, "n_perturbations": 4, "lr": 3e-2, "eps": 1e-2},
        },
    )
)
# GRZO (arXiv 2606.02857): one direction per example (Flipout-style, by forward hooks on the Linear layers), the
# per-example differences normalised by their spread. Each element moves about lr / (2 eps sqrt(B)) a step (125 lr
# at eps 1e-3, batch 16). On SmolLM2-135M SST-2 tuning chose 1e-5 from 2e-6..2e-5 (the best of every method at 100
# forward passes); over 1,000 passes it peaked at 500 and then drifted (benchmarks/RESULTS.md, 2026-12-06/07).
register(Method("grzo", "GRZO", _mezo, {"model": {"tuning": "full"}, "optimizer": {"estimator": "grzo", "lr": 1e-5}}))
# GRZO's raw form (estimator grzo-raw, the authors' "two" ablation): per-example MeZO estimates averaged, a step on
# MeZO's scale (about sqrt(B) larger rates for the same movement); untuned: benchmarks/convergence.py tunes it.
register(
    Method(
        "grzo-raw",
        "GRZO (raw)",
        _mezo,
        {"model": {"tuning": "full"}, "optimizer": {"estimator": "grzo-raw", "lr": 1e-4}},
    )
)
# Sparse-GRZO (the GRZO authors' grzo_sparse): GRZO's U masked to Sparse-MeZO's quarter of smallest magnitudes;
# a moved element steps as in GRZO, so GRZO's rate until benchmarks/convergence.py's sparse-grzo is tuned.
register(
    Method(
        "sparse-grzo",
        "Sparse-GRZO",
        _mezo,
        {"model": {"tuning": "full"}, "optimizer": {"estimator": "grzo", "sparsity": 0.75, "lr": 1e-5}},
    )
)
register(Method("ft", "FT", _ft, {"model": {"tuning": "full"}}))
register(Method("ft-lora", "FT (LoRA)", _ft, {"model": {"tuning": "lora"}}))
register(Method("ft-prefix", "FT (prefix)", _ft, {"model": {"tuning": "prefix"}}))


def _section(cls, values: dict, where: str):
    """A baseline's config dataclass from a dict, with unknown keys and bad values as ConfigErrors."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
