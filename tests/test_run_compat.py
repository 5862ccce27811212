"""Run folders written by an earlier release still resume, replay and evaluate.

tests/data/run-0.1.0 is a run of zotune 0.1.0 (commit 10a4d03) on the tests' tiny Llama (``model_dir``):
8 steps of SST-2 at lr 2e-3, validated every 2, stopped by Ctrl-C after step 4, with no weights saved
for resume (``train.snapshot: false``), so resuming it replays its trajectory onto the base model.
"""

import json
import shutil
from pathlib import Path

import yaml

from zotune import checkpoint, read_trajectory
from zotune.cli import main

STORED = Path(__file__).parent / "data" / "run-0.1.0"


def _stored_run(tmp_path, model_dir) -> Path:
    run = tmp_path / "old"
    shutil.copytree(STORED, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name"], config["train"]["output_dir"] = str(model_dir), str(run)  # where they are here
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


def test_a_run_of_release_0_1_0_resumes_to_the_run_this_version_makes(model_dir, tmp_path, capsys):
    old = _stored_run(tmp_path, model_dir)
    assert main(["train", "--resume", str(old)]) == 0
    assert "resuming at step 4: rebuilding the weights from the trajectory" in capsys.readouterr().out
    new = tmp_path / "new"
    assert main(["train", "--model.name", str(model_dir), "--steps", "8", "--eval_every", "2", "--train", "24",
                 "--validation", "8", "--test", "8", "--batch_size", "4", "--lr", "2e-3", "--progress", "false",
                 "--output_dir", str(new)]) == 0
    a, b = read_trajectory(old / "trajectory.zot"), read_trajectory(new / "trajectory.zot")
    assert a.header == b.header and a.records == b.records  # the same steps, bit for bit
    summary = json.loads((old / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["stopped"] == "steps"
    # the old run's best so far (step 2) stays a candidate; its start never became one (0.1.0 had no keep_start),
    # and the summary says whether a step beat it
    best = summary["best_validation"]
    assert best["step"] in (2, 4, 6, 8)
    assert summary["beat_start"] is (best["metric"] > summary["zero_shot"]["validation"]["accuracy"])


def test_a_run_of_release_0_1_0_evaluates_and_replays(model_dir, tmp_path):
    old = _stored_run(tmp_path, model_dir)
    assert main(["eval", "--run", str(old)]) == 0  # its best checkpoint (step 2) on the test split
    out = tmp_path / "replayed"
    assert main(["replay", "--base", str(model_dir), "--trajectory", str(old / "trajectory.zot"),
                 "--out", str(out), "--step", "best"]) == 0
    best = checkpoint.load_tensors(old / "best" / "model.safetensors")
    from safetensors.torch import load_file

    replayed = load_file(str(next(out.glob("*.safetensors"))))
    assert best and all(replayed[n].equal(t) for n, t in best.items())
