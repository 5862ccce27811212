"""Run folders written by an earlier release still resume, replay and evaluate.

tests/data/run-0.1.0 is a run of zotune 0.1.0 (commit 10a4d03) on the tests' tiny Llama (``model_dir``):
8 steps of SST-2 at lr 2e-3, validated every 2, stopped by Ctrl-C after step 4, with no weights saved
for resume (``train.snapshot: false``), so resuming it replays its trajectory onto the base model.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from zotune import checkpoint, read_trajectory
from zotune.cli import main
from zotune.trajectory import Step

STORED = Path(__file__).parent / "data" / "run-0.1.0"


def _stored_run(tmp_path, model_dir) -> Path:
    run = tmp_path / "old"
    shutil.copytree(STORED, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name"], config["train"]["output_dir"] = str(model_dir), str(run)  # where they are here
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


def _assert_same_steps(old, new):
    """The same records, with the projected gradients equal up to the rounding of the machine that wrote them.

    The stored run's first steps were computed on another machine, and CPUs round float32 matmuls differently
    (AVX2 and AVX-512 kernels sum in different orders), so its losses can differ here in the last bit. g = (L+ - L-)
    / (2 eps) scales that by 1 / (2 eps) = 500: a loss near 1 in float32 (ulp 1.2e-7) can move g by about 1e-4 (seen:
    3e-5 at step 1 on an AVX-512 machine). 1e-3 is ten times that, and a hundred times below the smallest |g| in the
    run (0.25), so a wrong seed, step or direction still fails. On one machine a resume is bit for bit: the
    interrupted-run tests in test_train.py and test_train_stops.py compare exactly.
    """
    assert [type(r) for r in old] == [type(r) for r in new]
    for r, s in zip(old, new, strict=True):
        if isinstance(r, Step):
            assert (r.step, r.lrs) == (s.step, s.lrs)
            assert r.projected_grad == pytest.approx(s.projected_grad, abs=1e-3)
        else:
            assert r == s


def test_a_run_of_release_0_1_0_resumes_to_the_run_this_version_makes(model_dir, tmp_path, capsys):
    old = _stored_run(tmp_path, model_dir)
    assert main(["train", "--resume", str(old)]) == 0
    assert "resuming at step 4: rebuilding the weights from the trajectory" in capsys.readouterr().out
    new = tmp_path / "new"
    assert (
        main(
            [
                "train",
                "--model.name",
                str(model_dir),
                "--steps",
                "8",
                "--eval_every",
                "2",
                "--train",
                "24",
                "--validation",
                "8",
                "--test",
                "8",
                "--batch_size",
                "4",
                "--lr",
                "2e-3",
                "--progress",
                "false",
                "--train.init",
                "none",  # as the old run's config.yaml says (0.1.0 started from the model as loaded)
                "--output_dir",
                str(new),
            ]
        )
        == 0
    )
    a, b = read_trajectory(old / "trajectory.zot"), read_trajectory(new / "trajectory.zot")
    assert a.header == b.header
    _assert_same_steps(a.records, b.records)
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
    assert (
        main(
            [
                "replay",
                "--base",
                str(model_dir),
                "--trajectory",
                str(old / "trajectory.zot"),
                "--out",
                str(out),
                "--step",
                "best",
            ]
        )
        == 0
    )
    best = checkpoint.load_tensors(old / "best" / "model.safetensors")
    from safetensors.torch import load_file

    replayed = load_file(str(next(out.glob("*.safetensors"))))
    assert best and all(replayed[n].equal(t) for n, t in best.items())


def test_a_state_of_the_wrong_shape_or_a_newer_version_is_a_one_line_error(model_dir, tmp_path, capsys):
    old = _stored_run(tmp_path, model_dir)
    saved = json.loads((old / "state.json").read_text())
    for loop, message in [
        ({**saved["loop"], "step": "four"}, "not a zotune run state"),
        ({**saved["loop"], "surprise": 1}, "not a zotune run state"),
        ({**saved["loop"], "version": 99}, "written by a newer zotune (run state version 99)"),
    ]:
        (old / "state.json").write_text(json.dumps({**saved, "loop": loop}))
        assert main(["train", "--resume", str(old)]) == 2
        err = capsys.readouterr().err
        assert f"{old / 'state.json'}: {message}" in err and err.count("\n") == 1
    (old / "state.json").write_text(json.dumps({"loop": saved["loop"]}))
    assert main(["train", "--resume", str(old)]) == 2
    assert "not a zotune run state (no optimizer or scheduler state)" in capsys.readouterr().err
    assert read_trajectory(old / "trajectory.zot").records == read_trajectory(STORED / "trajectory.zot").records


def test_the_run_state_round_trips_and_reads_version_1():
    from zotune.train import RUN_STATE_VERSION, RunState

    state = RunState(
        step=3,
        best={"step": 2, "metric": 0.5, "metrics": {"accuracy": 0.5}},
        start_losses=[0.7],
        lr_changes=[{"step": 1, "from": 1e-3, "to": 1e-4}],
    )
    assert RunState.from_dict(json.loads(json.dumps(state.to_dict())), Path("s")) == state
    v1 = json.loads((STORED / "state.json").read_text())["loop"]
    assert "version" not in v1
    old = RunState.from_dict(v1, Path("s"))
    assert old.step == 4 and old.version == RUN_STATE_VERSION and old.start_losses is None  # referenced at step 20


def test_export_is_the_library_behind_zotune_replay(model_dir, tmp_path):
    from zotune.config import ConfigError
    from zotune.export import export

    old = _stored_run(tmp_path, model_dir)
    done = export(str(model_dir), old / "trajectory.zot", tmp_path / "two", step=2, log=lambda m: None)
    assert (done.steps, done.tuning) == (2, "full") and (done.out / "config.json").is_file()
    best = checkpoint.load_tensors(old / "best" / "model.safetensors")  # the run's best checkpoint is step 2
    from safetensors.torch import load_file

    saved = load_file(str(next(done.out.glob("*.safetensors"))))
    assert all(saved[n].equal(t) for n, t in best.items())
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export(str(model_dir), old / "trajectory.zot", done.out)


def test_a_bf16_run_from_before_the_rounding_option_resumes_rounding_to_nearest(model_dir, tmp_path, capsys):
    """optimizer.stochastic_rounding (null: on for bf16/fp16 weights) is newer than some runs: a bf16 run whose
    config.yaml lacks it resumes with the rounding its optimizer state and trajectory record (to nearest), and
    replays onto the same weights."""
    run = tmp_path / "bf16"
    args = ["train", "--model.name", str(model_dir), "--model.dtype", "bfloat16", "--train", "16", "--validation"]
    args += ["8", "--test", "8", "--batch_size", "4", "--lr", "2e-3", "--eval_every", "2", "--progress", "false"]
    assert main([*args, "--steps", "2", "--optimizer.stochastic_rounding", "false", "--output_dir", str(run)]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["optimizer"]["stochastic_rounding"]  # as a run saved before the option existed
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0
    assert read_trajectory(run / "trajectory.zot").header["stochastic_rounding"] is False
    state = json.loads((run / "state.json").read_text())
    assert state["optimizer"]["mezo"]["stochastic_rounding"] is False and state["loop"]["step"] == 4
    # a new bf16 run rounds stochastically
    new = tmp_path / "new"
    assert main([*args, "--steps", "2", "--output_dir", str(new)]) == 0
    assert read_trajectory(new / "trajectory.zot").header["stochastic_rounding"] is True
