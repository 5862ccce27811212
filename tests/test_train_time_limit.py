"""`train.time_limit`: a run that runs out of time validates, stops and tests the best weights."""

import json

import pytest

from zotune import read_trajectory
from zotune.cli import main
from zotune.config import ConfigError, TrainConfig


def test_a_run_out_of_time_stops_validates_and_tests(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model.name", str(model_dir), "--steps", "50", "--eval_every", "20", "--train", "32",
            "--validation", "8", "--test", "8", "--batch_size", "4", "--progress", "false", "--output_dir", str(out),
            "--time_limit", "1e-9"]  # spent by the first step
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["stopped"] == "time_limit"
    assert summary["best_validation"]["step"] == 1 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert len(read_trajectory(out / "trajectory.zot").steps) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "validation_accuracy" in r] == [1]
    assert "time limit of 1e-09 min reached at step 1 of 50" in capsys.readouterr().out


def test_a_run_within_its_time_reaches_its_steps(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model.name", str(model_dir), "--steps", "3", "--eval_every", "3", "--train", "16",
                 "--validation", "4", "--test", "4", "--batch_size", "4", "--progress", "false",
                 "--output_dir", str(out), "--time_limit", "60"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stopped"] == "steps"


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_time_limit(bad):
    with pytest.raises(ConfigError, match="train.time_limit must be a finite number of minutes >= 0"):
        TrainConfig(time_limit=bad)
