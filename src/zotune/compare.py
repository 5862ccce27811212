"""``zotune compare``: methods x tasks x seeds in one command, summarised as the paper's Table 1.

A grid file (YAML) names the methods, the tasks and the seeds, the run configuration they share
(``run:``, the sections of ``zotune train``'s config) and per-method / per-task overrides::

    tasks: [sst2, rte, cb, boolq, copa, wic]
    methods: [zero-shot, icl, lp, mezo, mezo-lora, mezo-prefix, ft]
    seeds: [0]
    output_dir: runs/compare
    run:
      task: {data_dir: ../shared/data}
      train: {steps: 200}
    method_overrides:
      mezo-lora: {optimizer: {lr: 1e-3}}
    icl: {k: 32}
    ft: {epochs: 1}

Every cell (method, task, seed) runs in its own process (``isolate: true``), so the peak memory it
reports is its own, and writes ``<output_dir>/<task>/<method>/seed<k>/result.json`` atomically; a
grid that is stopped and started again skips the cells already done. At the end ``table.md`` holds
the test metric (mean over seeds, x100; +- the standard deviation with several seeds) with methods
as rows and tasks as columns, and each method's peak memory (its maximum over tasks); below it, each
cell's peak memory against the same task's zero-shot cell (inference).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zotune import checkpoint
from zotune.config import ConfigError, RunConfig, override_pairs, read_yaml, section_classes
from zotune.runtime import StopFlag, peak_memory_mb

__all__ = ["METHODS", "CompareConfig", "Method", "compare", "format_table", "load_compare_config", "run_cell"]


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
    out = {s: evaluate(prepared.objective, prepared.loaded.model, prepared.encoded[s], config.train.eval_batch_size)
           for s in ("validation", "test") if prepared.encoded[s]}
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
    return {"validation": best.get("metrics", {}), "test": summary["test"], "best_step": best.get("step"),
            "beat_start": summary.get("beat_start"),  # False: no step beat the start; its test is the start's
            "steps": summary["steps"], "wall_time_s": summary["wall_time_s"],
            "trajectory_bytes": summary["trajectory_bytes"], "trainable_parameters": summary["trainable_parameters"]}


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
register(Method("mezo-lora", "MeZO (LoRA)", _mezo,
                {"model": {"tuning": "lora"}, "optimizer": {"lr": 1e-3, "eps": 1e-2}}))
register(Method("mezo-prefix", "MeZO (prefix)", _mezo,
                {"model": {"tuning": "prefix"}, "optimizer": {"lr": 1e-2, "eps": 1e-1}}))
register(Method("lp-mezo", "LP-MeZO", _mezo, {"model": {"tuning": "full"}, "train": {"init": "probe"}}))
register(Method("ft", "FT", _ft, {"model": {"tuning": "full"}}))
register(Method("ft-lora", "FT (LoRA)", _ft, {"model": {"tuning": "lora"}}))
register(Method("ft-prefix", "FT (prefix)", _ft, {"model": {"tuning": "prefix"}}))


# -- the grid's configuration -------------------------------------------------------------------
TASK_TITLES = {"sst2": "SST-2", "sst5": "SST-5", "rte": "RTE", "cb": "CB", "boolq": "BoolQ", "wsc": "WSC",
               "wic": "WiC", "multirc": "MultiRC", "copa": "COPA", "record": "ReCoRD", "squad": "SQuAD",
               "drop": "DROP", "snli": "SNLI", "mnli": "MNLI", "trec": "TREC"}


@dataclass
class CompareConfig:
    """A comparison grid (see :mod:`zotune.compare`)."""

    tasks: list[str] = field(default_factory=lambda: ["sst2"])  # registered task names (columns)
    methods: list[str] = field(default_factory=lambda: ["zero-shot", "icl", "lp", "mezo", "mezo-lora",
                                                        "mezo-prefix", "ft"])  # rows, in order
    seeds: list[int] = field(default_factory=lambda: [0])  # each seed: data sample, batch order, perturbations
    output_dir: str = "runs/compare"
    isolate: bool = True  # each cell in its own process: its own peak memory, nothing leaks between cells
    jobs: int = 1  # cells run at once (isolated cells only), each process's output in its cell's log.txt: on a GPU
    # that one small model leaves mostly idle, several cells together finish sooner (ten SmolLM2 MeZO cells on an
    # H100 stepped ~3x faster in all than one alone)
    run: dict = field(default_factory=dict)  # RunConfig sections (model, task, optimizer, train) for every cell
    method_overrides: dict = field(default_factory=dict)  # method -> RunConfig sections, over `run`
    task_overrides: dict = field(default_factory=dict)  # task -> RunConfig sections, over the method's
    icl: dict = field(default_factory=dict)  # zotune.baselines.icl.ICLConfig fields
    lp: dict = field(default_factory=dict)  # zotune.baselines.probe.ProbeConfig fields
    ft: dict = field(default_factory=dict)  # zotune.baselines.finetune.FinetuneConfig fields

    def __post_init__(self):
        from zotune.tasks import get_task

        for name in self.methods:
            if name not in METHODS:
                raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        for name in self.tasks:
            if name != "custom":
                get_task(name)  # an unknown task raises TaskError with suggestions
        if not (isinstance(self.jobs, int) and self.jobs >= 1):
            raise ConfigError(f"jobs must be an integer >= 1, got {self.jobs!r}")
        if self.jobs > 1 and not self.isolate:
            raise ConfigError("jobs > 1 runs cells in processes of their own: it needs isolate: true")
        if not self.tasks or not self.methods or not self.seeds:
            raise ConfigError("a comparison needs at least one task, one method and one seed")
        # Overrides may name methods and tasks outside this run's selection (--tasks sst2 on a 6-task
        # grid keeps the other tasks' overrides), but not ones that do not exist.
        for name in self.method_overrides:
            if name not in METHODS:
                raise ConfigError(f"method_overrides names {name!r}, which is not a method; known: {', '.join(METHODS)}")
        for name in self.task_overrides:
            if name != "custom":
                get_task(name)
        _check_run_sections(self.run, "run")
        from zotune.baselines.finetune import FinetuneConfig
        from zotune.baselines.icl import ICLConfig
        from zotune.baselines.probe import ProbeConfig

        for key, cls in (("icl", ICLConfig), ("lp", ProbeConfig), ("ft", FinetuneConfig)):
            _section(cls, getattr(self, key), key)  # a bad baseline setting fails before any cell runs
        for key in ("method_overrides", "task_overrides"):
            for name, sections in getattr(self, key).items():
                _check_run_sections(sections, f"{key}.{name}")


def _check_run_sections(raw, where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of config sections, got {raw!r}")
    sections = section_classes()
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"{where}: unknown section {section!r} (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}.{section} must be a mapping, got {values!r}")
        names = {f.name for f in dataclasses.fields(sections[section])}
        for key in values:
            if key not in names:
                raise ConfigError(f"{where}: unknown key {section}.{key}")


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


def load_compare_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> CompareConfig:
    """The grid from a YAML file, then ``--key value`` overrides (``--tasks sst2,rte``, ``--run.train.steps 10``)."""
    raw: dict = {}
    where = f"{path}: " if path is not None and not overrides else ""  # every value from the file: name it
    if path is not None:
        raw = read_yaml(path, "grid file") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with keys such as tasks, methods, seeds, run")
    names = {f.name: f for f in dataclasses.fields(CompareConfig)}
    for key, _, value in override_pairs(list(overrides or [])):
        keys = key.split(".")  # --run.train.steps 10 sets one nested value
        node = raw
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part!r} is not a mapping")
        node[keys[-1]] = value
    hints = typing.get_type_hints(CompareConfig)
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            import difflib

            near = difflib.get_close_matches(str(key), list(names), n=1)  # YAML keys may be numbers
            raise ConfigError(f"{where}unknown grid key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
        if typing.get_origin(hints[key]) is list:
            value = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
            if not isinstance(value, list):
                value = [value]
            if key == "seeds":
                try:
                    value = [int(v) for v in value]
                except (TypeError, ValueError):
                    raise ConfigError(f"{where}seeds must be integers, got {value!r}") from None
            elif not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}{key} must be a list of names, got {value!r}")
        elif hints[key] is dict and not isinstance(value, dict):
            raise ConfigError(f"{where}{key} must be a mapping, got {value!r}")
        elif hints[key] is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # --output_dir 2024 is a folder name, not a number
        elif hints[key] in (str, bool) and not isinstance(value, hints[key]):
            raise ConfigError(f"{where}{key} must be a {'path' if hints[key] is str else 'boolean'}, got {value!r}")
        kwargs[key] = value
    try:
        return CompareConfig(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{where}{err}") from None


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def cell_config(grid: CompareConfig, method: str, task: str, seed: int) -> RunConfig:
    """The run configuration of one cell: run, then the method's defaults and overrides, then the task's."""
    from zotune.config import _build

    raw = _merge(grid.run, METHODS[method].defaults)
    raw = _merge(raw, grid.method_overrides.get(method, {}))
    raw = _merge(raw, grid.task_overrides.get(task, {}))
    raw = _merge(raw, {"task": {"name": task, "seed": seed}, "optimizer": {"seed": seed}})
    return _build(raw)


# -- running ------------------------------------------------------------------------------------
def run_cell(grid: CompareConfig, method: str, task: str, seed: int, cell_dir: Path, *,
             log: Callable[[str], None] = print, isolated: bool = False) -> dict:
    """Run one cell here and write its result.json (with the process's peak memory when ``isolated``)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = METHODS[method].run(cell_config(grid, method, task, seed), grid, cell_dir, log)
    result = {"method": method, "task": task, "seed": seed, **result,
              "cell_time_s": round(time.perf_counter() - started, 1),
              "peak_memory_mb": round(peak_memory_mb(), 1) if isolated else None}
    checkpoint.write_json(cell_dir / "result.json", result)
    return result


def _cell_dir(grid: CompareConfig, method: str, task: str, seed: int) -> Path:
    return Path(grid.output_dir) / task / method / f"seed{seed}"


def compare(grid: CompareConfig, *, log: Callable[[str], None] = print, run: bool = True) -> str:
    """Run every cell not yet done, then write and return the markdown table.

    ``run=False`` (``zotune compare --table-only``) runs nothing: the table of the cells finished so
    far, with the missing ones counted in a note.
    """
    out = Path(grid.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(m, t, s) for t in grid.tasks for m in grid.methods for s in grid.seeds]
    if not run:
        missing = [c for c in cells if not (_cell_dir(grid, *c) / "result.json").is_file()]
        table = format_table(grid, collect(grid))
        if missing:
            table += f"\n- not run yet: {len(missing)} of {len(cells)} cells (– in the table)"
        (out / "table.md").write_text(table + "\n")
        log(table)
        log(f"table written to {out / 'table.md'}")
        return table
    (out / "grid.yaml").write_text(yaml.safe_dump(dataclasses.asdict(grid), sort_keys=False))
    todo = [(n, c) for n, c in enumerate(cells, 1) if not (_cell_dir(grid, *c) / "result.json").is_file()]
    (_run_parallel if grid.jobs > 1 else _run_serial)(grid, todo, len(cells), log)
    table = format_table(grid, collect(grid))
    (out / "table.md").write_text(table + "\n")
    log(table)
    log(f"table written to {out / 'table.md'}")
    return table


def _cell_command(grid: CompareConfig, method: str, task: str, seed: int, cell_dir: Path) -> list[str]:
    """The command that runs one cell in a process of its own (its spec written to cell.json)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    spec = cell_dir / "cell.json"
    checkpoint.write_json(spec, {"grid": dataclasses.asdict(grid), "method": method, "task": task, "seed": seed})
    return [sys.executable, "-m", "zotune.compare", str(spec)]


CELL_STOP_GRACE_S = 60  # after Ctrl-C or SIGTERM, how long the running cells get to finish their step and save


def _cell_title(n: int, total: int, method: str, task: str, seed: int) -> str:
    return f"[{n}/{total}] {METHODS[method].label} on {TASK_TITLES.get(task, task)}, seed {seed}"


def _cell_exited(returncode: int, cell_dir: Path, method, task, seed, output: str, log) -> bool:
    """Whether a cell's process succeeded; a Ctrl-C in it stops the grid, another failure is recorded."""
    if returncode in (130, -2):
        raise KeyboardInterrupt
    if returncode != 0:
        _record_failure(cell_dir, method, task, seed, f"exit code {returncode} (see {output})", log)
    return returncode == 0


def _grid_stop() -> StopFlag:
    """Within the context, a SIGTERM to the grid (a scheduler's or ``kill``'s) stops it as Ctrl-C does.

    The handler only raises a flag, which the loops check between polls (``stop.check()``): raising from
    the handler could strike between starting a cell's process and tracking it, leaving it unwatched.
    Ctrl-C keeps Python's handler: it reaches the cells through the terminal's process group, while a
    SIGTERM reaches only this process, so :func:`_stop_cells` passes it on. A second SIGTERM while the
    cells save is ignored.
    """
    return StopFlag((signal.SIGTERM,))


def _stop_cells(procs) -> None:
    """The grid was stopped: ask each running cell to finish its step and save, and wait up to the grace
    period. A training cell takes SIGTERM as it takes Ctrl-C (a repeated one does not cut its save
    short); any other cell ends at once and starts again when the grid is run again."""
    deadline = time.monotonic() + CELL_STOP_GRACE_S
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _end_cells(procs) -> None:
    """No cell outlives the grid: kill and reap whatever still runs (SIGTERM only asks a training cell to
    stop after its step, so it cannot end one that overran the grace period)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _run_serial(grid: CompareConfig, todo: list, total: int, log) -> None:
    """Run the cells of ``todo`` one after the other (each in its own process when ``grid.isolate``)."""
    with _grid_stop() as stop:
        for n, (method, task, seed) in todo:
            cell_dir = _cell_dir(grid, method, task, seed)
            log(_cell_title(n, total, method, task, seed))
            if not grid.isolate:
                try:
                    run_cell(grid, method, task, seed, cell_dir, log=log)
                except (ValueError, RuntimeError) as err:  # a failed cell is reported, the grid goes on
                    _record_failure(cell_dir, method, task, seed, str(err), log)
                stop.check()
                continue
            stop.check()
            proc = subprocess.Popen(_cell_command(grid, method, task, seed, cell_dir))
            try:
                while proc.poll() is None:
                    try:
                        proc.wait(timeout=0.2)
                    except subprocess.TimeoutExpired:
                        stop.check()
            except KeyboardInterrupt:
                _stop_cells([proc])
                raise
            finally:
                _end_cells([proc])
            _cell_exited(proc.returncode, cell_dir, method, task, seed, "the log above", log)


def _run_parallel(grid: CompareConfig, todo: list, total: int, log) -> None:
    """Run the cells of ``todo`` ``grid.jobs`` at a time, each process's output in its cell's log.txt."""
    pending, running = list(todo), {}
    env = dict(os.environ)  # the cores shared out among the cells, unless the caller chose a thread count
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // grid.jobs)))
    with _grid_stop() as stop:
        try:
            while pending or running:
                while pending and len(running) < grid.jobs:
                    stop.check()
                    n, (method, task, seed) = pending.pop(0)
                    cell_dir = _cell_dir(grid, method, task, seed)
                    command = _cell_command(grid, method, task, seed, cell_dir)
                    with open(cell_dir / "log.txt", "ab") as output:
                        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env)
                    running[proc] = (n, method, task, seed, cell_dir, time.perf_counter())
                    log(f"{_cell_title(n, total, method, task, seed)}: started ({len(running)} running; "
                        f"output in {cell_dir / 'log.txt'})")
                time.sleep(0.2)
                stop.check()
                for proc in [p for p in running if p.poll() is not None]:
                    n, method, task, seed, cell_dir, started = running.pop(proc)
                    if _cell_exited(proc.returncode, cell_dir, method, task, seed, str(cell_dir / "log.txt"), log):
                        log(f"{_cell_title(n, total, method, task, seed)}: done in "
                            f"{(time.perf_counter() - started) / 60:.1f} min")
        except KeyboardInterrupt:
            _stop_cells(list(running))
            raise
        finally:  # stopped or failed: each unfinished cell resumes when the grid is run again
            _end_cells(list(running))


def _record_failure(cell_dir: Path, method, task, seed, message: str, log) -> None:
    log(f"  failed: {message}")
    checkpoint.write_json(cell_dir / "failed.json", {"method": method, "task": task, "seed": seed, "error": message})


def _cell_dirs(grid: CompareConfig):
    """Every cell's folder, in table order (tasks, then methods, then seeds)."""
    for task in grid.tasks:
        for method in grid.methods:
            for seed in grid.seeds:
                yield _cell_dir(grid, method, task, seed)


def collect(grid: CompareConfig) -> list[dict]:
    """The results of the grid's finished cells."""
    return [json.loads((d / "result.json").read_text()) for d in _cell_dirs(grid) if (d / "result.json").is_file()]


def _metric(result: dict) -> float | None:
    test = result.get("test") or {}
    for name in ("accuracy", "f1"):
        if name in test and test[name] is not None and math.isfinite(test[name]):
            return 100 * test[name]
    return None


def format_table(grid: CompareConfig, results: list[dict]) -> str:
    """Methods x tasks of the test metric (x100), mean (+- std over seeds), each method's peak memory, notes,
    and (for isolated cells) a table of each cell's peak memory against the same task's zero-shot."""
    by_cell: dict[tuple, list[float]] = {}
    memory: dict[str, float] = {}
    for r in results:
        value = _metric(r)
        if value is not None:
            by_cell.setdefault((r["method"], r["task"]), []).append(value)
        if r.get("peak_memory_mb") is not None:
            memory[r["method"]] = max(memory.get(r["method"], 0.0), r["peak_memory_mb"])
    head = ["Task"] + [TASK_TITLES.get(t, t) for t in grid.tasks] + ["peak memory"]
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    for method in grid.methods:
        row = [METHODS[method].label]
        for task in grid.tasks:
            values = by_cell.get((method, task), [])
            if not values:
                row.append("–")
            elif len(values) == 1:
                row.append(f"{values[0]:.1f}")
            else:
                row.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        row.append(f"{memory[method] / 1024:.2f} GB" if method in memory else "–")
        rows.append(row)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    notes = _notes(grid, results)
    return "\n".join(lines + ([""] + notes if notes else []) + _memory_table(grid, results))


def _memory_table(grid: CompareConfig, results: list[dict]) -> list[str]:
    """Each cell's peak memory (max over seeds), and its ratio to zero-shot on the same task.

    The main table's column is a method's maximum over tasks, which mixes tasks (long-input tasks
    peak higher for every method); "memory equal to inference" is a claim per task, so it is
    checked here against the same task's zero-shot cell.
    """
    peak: dict[tuple, float] = {}
    for r in results:
        if r.get("peak_memory_mb") is not None:
            key = (r["method"], r["task"])
            peak[key] = max(peak.get(key, 0.0), r["peak_memory_mb"])
    if not peak:
        return []
    head = ["Peak memory"] + [TASK_TITLES.get(t, t) for t in grid.tasks]
    rows = [head, ["---"] + ["---:"] * len(grid.tasks)]
    for method in grid.methods:
        if not any((method, task) in peak for task in grid.tasks):
            continue
        row = [METHODS[method].label]
        for task in grid.tasks:
            mb, base = peak.get((method, task)), peak.get(("zero-shot", task))
            if mb is None:
                row.append("–")
            elif base and method != "zero-shot":
                row.append(f"{mb / 1024:.2f} GB ({mb / base:.2f}×)")
            else:
                row.append(f"{mb / 1024:.2f} GB")
        rows.append(row)
    return ["", "Each cell's peak memory (its own process; × the same task's zero-shot, i.e. inference):", ""] + [
        "| " + " | ".join(r) + " |" for r in rows]


def _notes(grid: CompareConfig, results: list[dict]) -> list[str]:
    """One line per method: what was run (steps, demonstrations) and how long it took in all."""
    notes = []
    for method in grid.methods:
        mine = [r for r in results if r["method"] == method]
        if not mine:
            continue
        parts = []
        for key, what in (("steps", "steps"), ("demonstrations", "demonstrations")):
            per_task = {r["task"]: r[key] for r in mine if r.get(key) is not None}
            if per_task and len(set(per_task.values())) == 1:
                parts.append(f"{next(iter(per_task.values()))} {what}")
            elif per_task:
                parts.append(f"{what} " + ", ".join(f"{TASK_TITLES.get(t, t)} {v}" for t, v in per_task.items()))
        seconds = sum(r.get("cell_time_s") or 0.0 for r in mine)
        parts.append(f"{len(mine)} cells in {seconds / 60:.1f} min")
        kept = [f"{TASK_TITLES.get(r['task'], r['task'])} seed {r['seed']}" for r in mine if r.get("beat_start") is False]
        if kept:  # said plainly: these cells' scores are the starting weights', not trained ones
            parts.append(f"no step beat the starting weights on validation in {len(kept)} of {len(mine)} cells "
                         f"({', '.join(kept)}): their test is of the starting weights")
        notes.append(f"- {METHODS[method].label}: " + "; ".join(parts))
    failed = [f"{r['method']} on {r['task']} (seed {r['seed']})" for r in _failures(grid)]
    if failed:
        notes.append("- failed: " + ", ".join(failed) + " (see failed.json in their folders)")
    return notes


def _failures(grid: CompareConfig) -> list[dict]:
    """Cells that failed and have not succeeded since."""
    return [json.loads((d / "failed.json").read_text()) for d in _cell_dirs(grid)
            if (d / "failed.json").is_file() and not (d / "result.json").is_file()]


def _cell_main(spec_path: str) -> int:
    """The child process of an isolated cell."""
    from zotune.errors import UserError

    spec = json.loads(Path(spec_path).read_text())
    grid = CompareConfig(**spec["grid"])
    try:
        run_cell(grid, spec["method"], spec["task"], spec["seed"], Path(spec_path).parent, isolated=True)
    except UserError as err:
        print(f"zotune compare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_cell_main(sys.argv[1]))
