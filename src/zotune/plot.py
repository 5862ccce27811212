"""The learning-curve PNG of a run: training loss and validation metric against steps."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_run"]


def plot_run(metrics_path: str | Path, out_path: str | Path, metric: str = "accuracy") -> Path:
    """Draw ``metrics.jsonl`` into ``out_path`` (PNG); returns the path. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if r.get("loss") is not None]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    smooth, value = [], None
    for loss in losses:
        value = loss if value is None else 0.95 * value + 0.05 * loss
        smooth.append(value)
    key = f"validation_{metric}"
    val_steps = [r["step"] for r in rows if key in r]
    val = [100 * r[key] for r in rows if key in r]
    zero = next((r.get(f"zero_shot_validation_{metric}") for r in rows if f"zero_shot_validation_{metric}" in r), None)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss (per step)")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label="loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
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
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
