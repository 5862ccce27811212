"""The comparison's table: the test metric of every finished cell, methods x tasks, with peak memory."""

from __future__ import annotations

import json
import math
import statistics

from zotune.compare.grid import TASK_TITLES, CompareConfig, _cell_dirs
from zotune.compare.methods import METHODS

__all__ = ["collect", "format_table"]


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
        "| " + " | ".join(r) + " |" for r in rows
    ]


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
        kept = [
            f"{TASK_TITLES.get(r['task'], r['task'])} seed {r['seed']}" for r in mine if r.get("beat_start") is False
        ]
        if kept:  # said plainly: these cells' scores are the starting weights', not trained ones
            parts.append(
                f"no step beat the starting weights on validation in {len(kept)} of {len(mine)} cells "
                f"({', '.join(kept)}): their test is of the starting weights"
            )
        notes.append(f"- {METHODS[method].label}: " + "; ".join(parts))
    failed = [f"{r['method']} on {r['task']} (seed {r['seed']})" for r in _failures(grid)]
    if failed:
        notes.append("- failed: " + ", ".join(failed) + " (see failed.json in their folders)")
    return notes


def _failures(grid: CompareConfig) -> list[dict]:
    """Cells that failed and have not succeeded since."""
    return [
        json.loads((d / "failed.json").read_text())
        for d in _cell_dirs(grid)
        if (d / "failed.json").is_file() and not (d / "result.json").is_file()
    ]
