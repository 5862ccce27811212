"""`zotune plot`: learning curves of one run or several, from metrics.jsonl; bad directories named."""

import json

import pytest

from zotune import plot
from zotune.cli import main


def _run(path, losses, validations, zero_shot=None, metric="accuracy"):
    """A run directory as zotune train writes it: one row per step, one per validation."""
    path.mkdir(parents=True)
    rows = [] if zero_shot is None else [{"step": 0, f"zero_shot_validation_{metric}": zero_shot}]
    for step, loss in enumerate(losses, 1):
        rows.append({"step": step, "loss": loss, "lr": 1e-3, "elapsed": 30.0 * step})
        if step in validations:
            rows.append({"step": step, f"validation_{metric}": validations[step]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"metric": metric}))
    return path


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_are_drawn_side_by_side_against_steps_or_minutes(tmp_path):
    a = _run(tmp_path / "lr1e-5", [1.0, 0.5, 0.5, 0.25], {2: 0.6, 4: 0.7}, zero_shot=0.5)
    b = _run(tmp_path / "lr2e-5", [0.9, 0.8], {2: 0.55})
    runs = [plot._load(a), plot._load(b)]
    fig = plot._draw_runs(runs, ["a", "b"], "step")
    left, right = fig.axes
    (la, lb), (va, vb) = left.get_lines(), right.get_lines()
    assert list(la.get_xdata()) == [1, 2, 3, 4] and la.get_ydata()[0] == 1.0
    assert la.get_ydata()[1] == pytest.approx(0.95 * 1.0 + 0.05 * 0.5)  # smoothed
    assert list(va.get_xdata()) == [0, 2, 4] and list(va.get_ydata()) == pytest.approx([50, 60, 70])  # zero-shot at 0
    assert list(vb.get_xdata()) == [2] and la.get_color() == va.get_color() != lb.get_color() == vb.get_color()
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["a", "b"]
    assert right.get_ylabel() == "validation accuracy (%)"
    fig = plot._draw_runs(runs, ["a", "b"], "minutes")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0.5, 1.0, 1.5, 2.0]
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [0, 1.0, 2.0]
    assert fig.axes[0].get_xlabel() == "wall-clock minutes"

    # against forward passes: those its step rows recorded (two a step here; b recorded none)
    for run, per_step in ((a, 2), (b, None)):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            if "loss" in r and per_step:
                r["forward_passes"] = per_step * r["step"]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot._draw_runs([plot._load(a), plot._load(b)], ["a", "b"], "passes")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [2, 4, 6, 8]
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [0, 4, 8]
    assert list(fig.axes[0].get_lines()[1].get_xdata()) == [] and fig.axes[0].get_xlabel() == "training forward passes"

    out = tmp_path / "figs" / "both.png"
    assert main(["plot", str(a), str(b), "--out", str(out), "--x", "minutes", "--labels", "1e-5,2e-5"]) == 0
    assert _is_png(out)
    # One run alone: its own curves.png, drawn again (e.g. while it trains)
    assert main(["plot", str(a)]) == 0 and _is_png(a / "curves.png")


def test_bad_plot_input_is_one_line(tmp_path, capsys):
    a = _run(tmp_path / "a", [1.0, 0.5], {2: 0.6})
    for args, message in [
        ([str(tmp_path / "missing")], "missing is not a zotune run directory (no metrics.jsonl)"),
        ([str(a), str(a), "--labels", "x"], "1 labels for 2 runs"),
    ]:
        assert main(["plot", *args, "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err
    (a / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    assert main(["plot", str(a)]) == 2
    assert "metrics.jsonl: line 2 is not JSON" in capsys.readouterr().err
    # a last line still being written by a training run is left out
    (a / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert plot._rows(a / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    with pytest.raises(plot.PlotError, match="x must be step, minutes, passes"):
        plot.plot_runs([a], tmp_path / "y.png", x="tokens")


def test_a_changed_learning_rate_is_marked_and_a_schedule_is_not(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "lr": 2e-5 if s <= 4 else 1e-5} for s in range(1, 9)]
    assert plot.lr_changes(rows) == [(4, 1e-5)]
    fig = plot._draw_run(rows + [{"step": 8, "validation_accuracy": 0.5}], "accuracy")
    marks = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert [list(m.get_xdata()) for m in marks] == [[4, 4]]
    assert [t.get_text() for t in fig.axes[0].texts] == ["lr 1e-05"]
    decaying = [{"step": s, "loss": 1.0, "lr": 1e-3 / s} for s in range(1, 40)]
    assert plot.lr_changes(decaying) == []
