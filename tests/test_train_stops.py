"""Runs that stop before their last step: out of time (`train.time_limit`), or a diverging loss
(`train.divergence`); both test the best weights."""

import json

import pytest

from zotune import read_trajectory
from zotune.cli import main
from zotune.config import ConfigError, TrainConfig


def test_a_run_out_of_time_stops_validates_and_tests(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--model.name",
        str(model_dir),
        "--steps",
        "50",
        "--eval_every",
        "20",
        "--train",
        "32",
        "--validation",
        "8",
        "--test",
        "8",
        "--batch_size",
        "4",
        "--progress",
        "false",
        "--output_dir",
        str(out),
        "--time_limit",
        "1e-9",
    ]  # spent by the first step
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["stopped"] == "time_limit"
    # the best of the start (step 0) and step 1, validated before stopping
    assert summary["best_validation"]["step"] in (0, 1) and 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert len(read_trajectory(out / "trajectory.zot").steps) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "validation_accuracy" in r] == [1]
    assert "time limit of 1e-09 min reached at step 1 of 50" in capsys.readouterr().out


def test_a_run_within_its_time_reaches_its_steps(model_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model.name",
                str(model_dir),
                "--steps",
                "3",
                "--eval_every",
                "3",
                "--train",
                "16",
                "--validation",
                "4",
                "--test",
                "4",
                "--batch_size",
                "4",
                "--progress",
                "false",
                "--output_dir",
                str(out),
                "--time_limit",
                "60",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stopped"] == "steps"


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_time_limit(bad):
    with pytest.raises(ConfigError, match="train.time_limit must be a finite number of minutes >= 0"):
        TrainConfig(time_limit=bad)


def _exploding_after(monkeypatch, calls_before: int):
    """Objective.loss as before for ``calls_before`` calls (two per MeZO step), then 1000 times larger."""
    from zotune.objectives import Objective

    original, calls = Objective.loss, []

    def loss(self, model, batch, chunks=0):
        calls.append(1)
        value = original(self, model, batch, chunks)
        return value * 1000 if len(calls) > calls_before else value

    monkeypatch.setattr(Objective, "loss", loss)


def _diverging_run(model_dir, out, *extra):
    return [
        "train",
        "--model.name",
        str(model_dir),
        "--steps",
        "60",
        "--eval_every",
        "10",
        "--train",
        "32",
        "--validation",
        "8",
        "--test",
        "8",
        "--batch_size",
        "4",
        "--progress",
        "false",
        "--zero_shot",
        "false",
        "--output_dir",
        str(out),
        *extra,
    ]


def test_a_diverging_loss_stops_the_run_and_the_best_weights_are_tested(model_dir, tmp_path, monkeypatch, capsys):
    _exploding_after(monkeypatch, 2 * 30)  # steps 1-30 as usual, then a loss 1000x larger
    out = tmp_path / "run"
    assert main(_diverging_run(model_dir, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "diverged" and summary["steps"] == 31  # the first large loss passes 10x
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "validation_accuracy" in r] == [10, 20, 30]  # the diverged step is not validated
    assert summary["best_validation"]["step"] in (0, 10, 20, 30) and "accuracy" in summary["test"]  # 0: the start
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == summary["best_validation"]["step"]
    printed = capsys.readouterr().out
    assert "the training loss diverged: its running mean" in printed and "at step 31 is over 10x" in printed


def test_the_divergence_guard_can_be_turned_off(model_dir, tmp_path, monkeypatch):
    _exploding_after(monkeypatch, 2 * 30)
    out = tmp_path / "run"
    assert main(_diverging_run(model_dir, out, "--steps", "40", "--divergence", "0")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "steps" and summary["steps"] == 40


@pytest.mark.parametrize("bad", [-1.0, 0.5, 1.0, float("inf"), float("nan")])
def test_bad_divergence(bad):
    with pytest.raises(ConfigError, match="train.divergence must be 0 .off. or a finite factor > 1"):
        TrainConfig(divergence=bad)


def test_a_run_stopped_by_its_time_limit_resumes_with_a_new_one(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = [
        "--steps",
        "4",
        "--eval_every",
        "2",
        "--train",
        "16",
        "--validation",
        "4",
        "--test",
        "4",
        "--batch_size",
        "4",
        "--progress",
        "false",
        "--output_dir",
        str(out),
    ]
    assert main(["train", "--model.name", str(model_dir), *common, "--time_limit", "1e-9"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--batch_size", "8"]) == 2
    assert (
        "it may change only train.steps, train.time_limit, train.divergence, train.progress, train.snapshot, "
        "optimizer.lr, not train.batch_size"
    ) in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--time_limit", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped"] == "steps"
    assert len(read_trajectory(out / "trajectory.zot").steps) == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "test_accuracy" in r] == [4]  # the first stop's test row is gone
    assert "time_limit: 0" in (out / "config.yaml").read_text()


def test_resuming_on_another_kind_of_device_warns(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model.name",
                str(model_dir),
                "--steps",
                "2",
                "--eval_every",
                "2",
                "--train",
                "8",
                "--validation",
                "4",
                "--test",
                "4",
                "--batch_size",
                "4",
                "--progress",
                "false",
                "--output_dir",
                str(out),
                "--time_limit",
                "1e-9",
            ]
        )
        == 0
    )
    state = json.loads((out / "state.json").read_text())
    here = state["loop"]["device"]
    elsewhere = "cpu" if here.startswith("cuda") else "cuda:0"
    state["loop"]["device"] = elsewhere
    (out / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--time_limit", "0"]) == 0
    assert f"warning: this run trained on {elsewhere} and resumes on {here}" in capsys.readouterr().out
    assert json.loads((out / "state.json").read_text())["loop"]["device"] == here


def test_a_finished_run_continues_with_more_steps_as_if_it_had_them_from_the_start(model_dir, tmp_path, capsys):
    common = [
        "--eval_every",
        "2",
        "--train",
        "16",
        "--validation",
        "4",
        "--test",
        "4",
        "--batch_size",
        "4",
        "--progress",
        "false",
        "--save_best",
        "false",
    ]
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert main(["train", "--model.name", str(model_dir), *common, "--steps", "6", "--output_dir", str(once)]) == 0
    assert main(["train", "--model.name", str(model_dir), *common, "--steps", "4", "--output_dir", str(twice)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(twice), "--steps", "3"]) == 2
    assert "train.steps 3 is fewer than the 4 this run has already taken" in capsys.readouterr().err
    assert main(["train", "--resume", str(twice), "--steps", "6"]) == 0
    assert read_trajectory(twice / "trajectory.zot").records == read_trajectory(once / "trajectory.zot").records
    a, b = (json.loads((d / "summary.json").read_text()) for d in (once, twice))
    assert b["steps"] == 6 and b["test"] == a["test"]

    decaying = tmp_path / "decaying"
    assert (
        main(
            [
                "train",
                "--model.name",
                str(model_dir),
                *common,
                "--steps",
                "2",
                "--schedule",
                "linear",
                "--output_dir",
                str(decaying),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["train", "--resume", str(decaying), "--steps", "4"]) == 2
    assert "optimizer.schedule linear spreads its learning rates over train.steps (2)" in capsys.readouterr().err


def test_a_resume_at_a_new_learning_rate_replays_exactly(model_dir, tmp_path, capsys):
    import torch

    from zotune import replay
    from zotune.models import ModelConfig, load_model
    from zotune.train import run

    out = tmp_path / "run"
    common = [
        "--eval_every",
        "2",
        "--train",
        "16",
        "--validation",
        "4",
        "--test",
        "4",
        "--batch_size",
        "4",
        "--progress",
        "false",
        "--save_best",
        "false",
    ]
    assert (
        main(
            ["train", "--model.name", str(model_dir), *common, "--steps", "3", "--lr", "1e-3", "--output_dir", str(out)]
        )
        == 0
    )
    trained = load_model(ModelConfig(name=str(model_dir)), log=lambda s: None)
    result = run(resume=out, loaded=trained, log=print, changes={"steps": 5, "optimizer.lr": 2e-4})
    assert "optimizer.lr 0.001 -> 0.0002 from step 3" in capsys.readouterr().out
    assert result.summary["steps"] == 5 and result.summary["lr_changes"] == [{"step": 3, "from": 1e-3, "to": 2e-4}]
    steps = read_trajectory(out / "trajectory.zot").steps
    assert [s.step for s in steps] == [0, 1, 2, 3, 4]
    assert [round(s.lrs[0], 9) for s in steps] == [1e-3, 1e-3, 1e-3, 2e-4, 2e-4]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["lr"], 9) for r in rows if "lr" in r] == [1e-3, 1e-3, 1e-3, 2e-4, 2e-4]
    # the base model plus the trajectory is the resumed run's weights, bit for bit
    base = load_model(ModelConfig(name=str(model_dir)), log=lambda s: None).model
    replay(base, out / "trajectory.zot")
    for (name, a), (_, b) in zip(base.named_parameters(), trained.model.named_parameters()):
        assert torch.equal(a, b), name
    assert main(["train", "--resume", str(out), "--steps", "6", "--optimizer.lr", "1e-4"]) == 0  # changes again
    assert json.loads((out / "summary.json").read_text())["lr_changes"][-1] == {"step": 5, "from": 2e-4, "to": 1e-4}


def test_a_decaying_schedule_refuses_a_new_learning_rate_on_resume(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model.name",
                str(model_dir),
                "--steps",
                "2",
                "--eval_every",
                "2",
                "--train",
                "8",
                "--validation",
                "4",
                "--test",
                "4",
                "--batch_size",
                "4",
                "--progress",
                "false",
                "--schedule",
                "cosine",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--optimizer.lr", "1e-6"]) == 2
    assert "a resume cannot change optimizer.lr (start a new run)" in capsys.readouterr().err


def test_a_resume_after_a_crash_that_tore_metrics_jsonl_drops_the_torn_lines(model_dir, tmp_path):
    """A kill during a write leaves half a line; a crash of the machine can leave NUL bytes where the end was."""
    out = tmp_path / "run"
    common = ["--steps", "4", "--eval_every", "2", "--train", "16", "--validation", "4", "--test", "4"]
    common += ["--batch_size", "4", "--progress", "false", "--output_dir", str(out)]
    assert main(["train", "--model.name", str(model_dir), *common, "--time_limit", "1e-9"]) == 0
    metrics = out / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_bytes(whole.encode() + b"\x00" * 300 + b"\n" + b'{"step": 2, "loss": 0.6')  # torn, no newline
    assert main(["train", "--resume", str(out), "--time_limit", "0"]) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line is JSON again
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


# every estimator, direction kind and rule the convergence benchmark compares, as its rows set them
METHOD_FLAGS = {
    "gaussian-fast": ["--optimizer.distribution", "gaussian-fast"],
    "fzoo": ["--optimizer.estimator", "fzoo", "--optimizer.distribution", "rademacher", "--optimizer.n_perturbations",
             "4", "--optimizer.fuse_next", "false"],
    "hizoo": ["--optimizer.estimator", "hizoo"],
    "lozo": ["--optimizer.distribution", "lowrank"],
    "subzero": ["--optimizer.distribution", "subzero"],
    "kerzoo": ["--optimizer.estimator", "kerzoo"],
    "sparse-mezo": ["--optimizer.sparsity", "0.75"],
    "zo-muon": ["--optimizer.variant", "muon", "--optimizer.n_perturbations", "2"],
    "grzo": ["--optimizer.estimator", "grzo"],
    "sparse-grzo": ["--optimizer.estimator", "grzo", "--optimizer.sparsity", "0.75"],
    "one-sided-4": ["--optimizer.estimator", "one-sided", "--optimizer.n_perturbations", "4"],
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_a_run_of_every_method_stopped_and_resumed_is_the_uninterrupted_run(model_dir, tmp_path, method):
    """Resume for each method: a run stopped after 2 steps and resumed to 4 writes the uninterrupted run's
    trajectory, record for record. (The resume check once compared the run's tensors with every trainable one of
    the model, and GRZO, which trains its hooked layers but not the embeddings, could never resume.)"""
    args = ["--model.name", str(model_dir), "--train", "16", "--validation", "4", "--test", "4", "--batch_size", "4"]
    args += ["--progress", "false", "--save_best", "false", "--eval_every", "2", *METHOD_FLAGS[method]]
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert main(["train", *args, "--steps", "4", "--output_dir", str(once)]) == 0
    assert main(["train", *args, "--steps", "2", "--output_dir", str(twice)]) == 0
    assert main(["train", "--resume", str(twice), "--steps", "4"]) == 0
    assert read_trajectory(twice / "trajectory.zot").records == read_trajectory(once / "trajectory.zot").records
    if method.endswith("grzo"):  # fewer tensors than the model trains: the case the old check refused
        recorded = json.loads((twice / "state.json").read_text())["optimizer"]["mezo"]["params"]
        assert not any("embed" in name for name in recorded)


def test_a_run_that_trained_other_tensors_than_its_config_selects_now_is_a_one_line_error(model_dir, tmp_path, capsys):
    """A version that selected the trainable tensors otherwise (the probe's untie, before 2026-12-07) wrote the
    run: resuming it is refused before anything changes, not a traceback from the optimizer's state."""
    out = tmp_path / "run"
    args = ["--train", "16", "--validation", "4", "--test", "4", "--batch_size", "4", "--progress", "false"]
    assert main(["train", "--model.name", str(model_dir), *args, "--steps", "2", "--output_dir", str(out)]) == 0
    state = json.loads((out / "state.json").read_text())
    state["optimizer"]["mezo"]["params"].append("lm_head.weight.copy")  # as such a version recorded it
    (out / "state.json").write_text(json.dumps(state))
    before = (out / "trajectory.zot").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lm_head.weight.copy: trained by the run, not here" in err
    assert (out / "trajectory.zot").read_bytes() == before
