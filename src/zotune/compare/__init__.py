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

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from zotune import checkpoint
from zotune.compare.grid import TASK_TITLES, CompareConfig, _cell_dir, cell_config, load_compare_config
from zotune.compare.methods import METHODS, Method, register
from zotune.compare.table import collect, format_table
from zotune.runtime import StopFlag, peak_memory_mb

__all__ = [
    "METHODS",
    "TASK_TITLES",
    "CompareConfig",
    "Method",
    "cell_config",
    "collect",
    "compare",
    "format_table",
    "load_compare_config",
    "register",
    "run_cell",
]


def run_cell(
    grid: CompareConfig,
    method: str,
    task: str,
    seed: int,
    cell_dir: Path,
    *,
    log: Callable[[str], None] = print,
    isolated: bool = False,
) -> dict:
    """Run one cell here and write its result.json (with the process's peak memory when ``isolated``)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = METHODS[method].run(cell_config(grid, method, task, seed), grid, cell_dir, log)
    result = {
        "method": method,
        "task": task,
        "seed": seed,
        **result,
        "cell_time_s": round(time.perf_counter() - started, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1) if isolated else None,
    }
    checkpoint.write_json(cell_dir / "result.json", result)
    return result


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
                        proc = subprocess.Popen(
                            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
                        )
                    running[proc] = (n, method, task, seed, cell_dir, time.perf_counter())
                    log(
                        f"{_cell_title(n, total, method, task, seed)}: started ({len(running)} running; "
                        f"output in {cell_dir / 'log.txt'})"
                    )
                time.sleep(0.2)
                stop.check()
                for proc in [p for p in running if p.poll() is not None]:
                    n, method, task, seed, cell_dir, started = running.pop(proc)
                    if _cell_exited(proc.returncode, cell_dir, method, task, seed, str(cell_dir / "log.txt"), log):
                        log(
                            f"{_cell_title(n, total, method, task, seed)}: done in "
                            f"{(time.perf_counter() - started) / 60:.1f} min"
                        )
        except KeyboardInterrupt:
            _stop_cells(list(running))
            raise
        finally:  # stopped or failed: each unfinished cell resumes when the grid is run again
            _end_cells(list(running))


def _record_failure(cell_dir: Path, method, task, seed, message: str, log) -> None:
    log(f"  failed: {message}")
    checkpoint.write_json(cell_dir / "failed.json", {"method": method, "task": task, "seed": seed, "error": message})


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
