"""Learning-curve PNGs: one run's training loss and validation metric against steps (``curves.png``),
and several runs side by side (``zotune plot``)."""

from __future__ import annotations

import json
from pathlib import Path

from zotune.errors import UserError

__all__ = ["PlotError", "plot_run", "plot_runs", "redraw_run"]


class PlotError(UserError):
    """A run directory that cannot be plotted (no metrics.jsonl, or a line of it that is not JSON)."""


def plot_run(metrics_path: str | Path, out_path: str | Path, metric: str = "accuracy") -> Path:
    """Draw ``metrics.jsonl`` into ``out_path`` (PNG); returns the path. Needs matplotlib."""
    return _save(_draw_run(_rows(metrics_path), metric), out_path)


def _save(fig, out_path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def lr_changes(rows: list[dict], most: int = 8) -> list[tuple[int, float]]:
    """(step, new lr) where a piecewise-constant learning rate changed (``--resume ... --lr``): the last
    step at the old rate, as the resume logged it. None listed for a decaying schedule (more than ``most``)."""
    changes, last = [], None
    for r in rows:
        lr = r.get("lr")
        if lr is None:
            continue
        if last is not None and lr != last[1]:
            changes.append((last[0], lr))
            if len(changes) > most:
                return []
        last = (r["step"], lr)
    return changes


def _draw_run(rows: list[dict], metric: str):
    """The figure of :func:`plot_run`: loss per step and smoothed, validation metric, lr changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows if r.get("loss") is not None]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    smooth = _smooth(losses)
    key = f"validation_{metric}"
    val_steps = [r["step"] for r in rows if key in r]
    val = [100 * r[key] for r in rows if key in r]
    zero = next((r.get(f"zero_shot_validation_{metric}") for r in rows if f"zero_shot_validation_{metric}" in r), None)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss (per step)")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label="loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    for step, lr in lr_changes(rows):
        ax.axvline(step, color="gray", linestyle=":", linewidth=1.0)
        ax.annotate(
            f"lr {lr:g}",
            (step, 0.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, 4),
            textcoords="offset points",
            fontsize=7,
            color="gray",
        )
    ax2 = ax.twinx()
    if zero is not None:
        val_steps, val = [0, *val_steps], [100 * zero, *val]
    ax2.plot(val_steps, val, color="tab:orange", marker="o", linewidth=1.8, label=f"validation {metric}")
    ax2.set_ylabel(f"validation {metric} (%)", color="tab:orange")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="best", fontsize=8)
    ax.set_title("zotune: MeZO fine-tuning")
    fig.tight_layout()
    return fig


def _rows(metrics_path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line still being written (no newline yet: a run that is training)
    is left out; any other line that is not JSON is a PlotError naming it."""
    text = Path(metrics_path).read_text()
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines) and not text.endswith("\n"):
                break
            raise PlotError(f"{metrics_path}: line {n} is not JSON ({err.msg})") from None
    return rows


def _smooth(values: list[float]) -> list[float]:
    """An exponential moving average (0.95), the curve a reader follows through MeZO's noisy losses."""
    out, value = [], None
    for v in values:
        value = v if value is None else 0.95 * value + 0.05 * v
        out.append(value)
    return out


def _run_metric(run_dir: Path, rows: list[dict]) -> str | None:
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("metric")
    return next((k[len("validation_") :] for r in rows for k in r if k.startswith("validation_")), None)


def _load(run_dir: Path) -> tuple[list[dict], str | None]:
    """A run directory's metrics rows and metric name, or a PlotError saying why not."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} is not a zotune run directory (no metrics.jsonl)")
    rows = _rows(path)
    return rows, _run_metric(run_dir, rows)


def redraw_run(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Draw a run's ``curves.png`` again (or into ``out_path``), e.g. for a run still training."""
    run_dir = Path(run_dir)
    _, metric = _load(run_dir)
    return plot_run(run_dir / "metrics.jsonl", out_path or run_dir / "curves.png", metric or "accuracy")


X_AXES = ("step", "minutes", "passes")  # what plot_runs can put on the x axis


def plot_runs(run_dirs, out_path: str | Path, x: str = "step", labels=None) -> Path:
    """Several runs' learning curves in one PNG: the smoothed training loss (left) and the validation
    metric (right) of each, against steps, wall-clock minutes or training forward passes (``x``: ``step``,
    ``minutes`` or ``passes``: the unit to compare estimators that take different passes a step by; runs
    written before the count was recorded have no points on that axis).

    ``run_dirs``: directories written by ``zotune train`` (finished, interrupted or still running);
    ``labels``: one per run (default: the directory names). Needs matplotlib. Returns ``out_path``.
    """
    if x not in X_AXES:
        raise PlotError(f"x must be {', '.join(X_AXES)}, got {x!r}")
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise PlotError("no run directory to plot")
    labels = list(labels) if labels is not None else [d.name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise PlotError(f"{len(labels)} labels for {len(run_dirs)} runs")
    return _save(_draw_runs([_load(d) for d in run_dirs], labels, x), out_path)


def _draw_runs(runs: list[tuple[list[dict], str | None]], labels: list[str], x: str):
    """The figure of :func:`plot_runs`: per run, its smoothed loss (left axes) and validation metric (right)."""
    metrics = {m for _, m in runs if m is not None}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    for (rows, metric), label in zip(runs, labels):
        train = [r for r in rows if r.get("loss") is not None]
        # where a step lies on the x axis (minutes, passes: what its training row recorded)
        minutes = {r["step"]: r["elapsed"] / 60 for r in train if "elapsed" in r}
        passes = {r["step"]: r["forward_passes"] for r in train if r.get("forward_passes") is not None}
        at = {"step": lambda step: step, "minutes": minutes.get, "passes": passes.get}[x]
        train = [r for r in train if at(r["step"]) is not None]
        (line,) = left.plot(
            [at(r["step"]) for r in train], _smooth([r["loss"] for r in train]), linewidth=1.6, label=label
        )
        key = f"validation_{metric}"
        val = [r for r in rows if key in r and at(r["step"]) is not None]
        vx = [at(r["step"]) for r in val]
        zero = next((r[f"zero_shot_{key}"] for r in rows if f"zero_shot_{key}" in r), None)
        vy = [100 * r[key] for r in val]
        if zero is not None:
            vx, vy = [0, *vx], [100 * zero, *vy]
        right.plot(vx, vy, marker="o", markersize=3, linewidth=1.4, color=line.get_color(), label=label)
    xlabel = {"step": "step", "minutes": "wall-clock minutes", "passes": "training forward passes"}[x]
    left.set_xlabel(xlabel)
    left.set_ylabel("training loss (smoothed)")
    right.set_xlabel(xlabel)
    right.set_ylabel(f"validation {metrics.pop() if len(metrics) == 1 else 'metric'} (%)")
    left.legend(loc="best", fontsize=8)
    fig.suptitle("zotune: MeZO runs")
    fig.tight_layout()
    return fig
