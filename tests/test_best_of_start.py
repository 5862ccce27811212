"""The starting weights are a candidate for the best checkpoint (train.keep_start), and a learning rate
too high for the model is caught against the starting loss within a few steps (train.divergence)."""

import json

from safetensors.torch import load_file

from zotune.cli import main


def _run(model_dir, out, *extra):
    return [
        "train",
        "--model.name",
        str(model_dir),
        "--steps",
        "6",
        "--eval_every",
        "2",
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
        "--train.init",
        "none",  # the start is the model as loaded, compared below with the saved best weights
        "--output_dir",
        str(out),
        *extra,
    ]


def _starting_weights(model_dir):
    from safetensors.torch import load_file as load

    return load(str(next(model_dir.glob("*.safetensors"))))


def test_when_no_step_beats_the_start_the_starting_weights_are_kept_and_tested(
    model_dir, tmp_path, monkeypatch, capsys
):
    # validation order: zero-shot validation, zero-shot test (a real one), then steps 2, 4, 6
    from zotune import objectives

    real, calls = objectives.evaluate, []

    def evaluate(objective, model, examples, batch_size, progress=None):
        result = real(objective, model, examples, batch_size, progress=progress)
        calls.append(result)
        fake = {0: 0.75, 2: 0.5, 3: 0.75, 4: 0.25}  # call index -> validation accuracy (1: the zero-shot test)
        return {**result, "accuracy": fake[len(calls) - 1]} if len(calls) - 1 in fake else result

    monkeypatch.setattr(objectives, "evaluate", evaluate)
    out = tmp_path / "run"
    assert main(_run(model_dir, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_validation"]["step"] == 0 and summary["best_validation"]["metric"] == 0.75
    assert summary["beat_start"] is False  # step 4 tied the start: a tie does not beat it
    assert summary["test"] == summary["zero_shot"]["test"]  # the starting weights' test
    assert len(calls) == 5  # zero-shot validation and test, three validations, and no second test of the start
    best = load_file(str(out / "best" / "model.safetensors"))
    start = _starting_weights(model_dir)
    assert best and all(k in start and start[k].equal(v) for k, v in best.items())
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 0
    printed = capsys.readouterr().out
    assert "no step beat the starting weights on validation accuracy" in printed
    assert "the test above is of the starting weights" in printed


def test_a_step_that_beats_the_start_is_kept(model_dir, tmp_path, monkeypatch):
    from zotune import objectives

    real, calls = objectives.evaluate, []

    def evaluate(objective, model, examples, batch_size, progress=None):
        calls.append(1)
        result = real(objective, model, examples, batch_size, progress=progress)
        fake = {0: 0.5, 2: 0.625, 3: 0.75, 4: 0.5}
        return {**result, "accuracy": fake[len(calls) - 1]} if len(calls) - 1 in fake else result

    monkeypatch.setattr(objectives, "evaluate", evaluate)
    out = tmp_path / "run"
    assert main(_run(model_dir, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_validation"]["step"] == 4 and summary["beat_start"] is True
    assert len(calls) == 6  # the trained weights are tested


def test_without_zero_shot_the_start_is_still_validated_and_a_candidate(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # lr 0: no step changes the weights, so none can beat the start
    assert main(_run(model_dir, out, "--zero_shot", "false", "--lr", "0")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["zero_shot"]) == {"validation"}
    assert summary["best_validation"]["step"] == 0 and summary["beat_start"] is False
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "zero_shot_validation_accuracy" in rows[0]
    assert "validating the starting weights" in capsys.readouterr().out


def test_keep_start_off_tests_trained_weights_and_says_so(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run(model_dir, out, "--keep_start", "false", "--lr", "0")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_validation"]["step"] == 2  # the first validation: lr 0 gives every one the same score
    assert summary["beat_start"] is False
    assert (
        "the test above is of trained weights (the start was not kept as a candidate: keep_start)"
        in capsys.readouterr().out
    )


def test_without_validation_of_the_start_beat_start_is_unknown(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_run(model_dir, out, "--keep_start", "false", "--zero_shot", "false")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_shot"] == {} and summary["beat_start"] is None


def _growing_after(monkeypatch, steps_before: int, factor: float):
    """Objective.loss as before for ``steps_before`` steps (two calls each), then ``factor`` times larger each step."""
    from zotune.objectives import Objective

    original, calls = Objective.loss, []

    def loss(self, model, batch, chunks=0):
        calls.append(1)
        step = (len(calls) - 1) // 2 + 1
        return original(self, model, batch, chunks) * factor ** max(0, step - steps_before)

    monkeypatch.setattr(Objective, "loss", loss)


def test_a_loss_growing_from_the_start_stops_within_a_few_steps_and_names_a_rate(
    model_dir, tmp_path, monkeypatch, capsys
):
    # the loss triples every step from step 3 on: 9x at step 5, 27x at 6 (its running mean passes 10x soon
    # after); a guard referenced to step 20 would only have stopped at step 21
    _growing_after(monkeypatch, 2, 3.0)
    out = tmp_path / "run"
    assert main(_run(model_dir, out, "--steps", "40", "--eval_every", "10", "--lr", "5e-5")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "diverged" and 5 <= summary["steps"] <= 9
    assert summary["best_validation"]["step"] == 0  # the only validation was the start's
    guard = summary["divergence"]
    assert guard["lr"] == 5e-5 and guard["try_lr"] == 5e-6 and guard["running_loss"] > 10 * guard["starting_loss"]
    assert not (out / "state.json").exists()  # stopped before its first validation: the summary is the record
    printed = capsys.readouterr().out
    assert "is over 10x the starting loss" in printed and "the median of steps 1-5" in printed
    assert "optimizer.lr 5e-05 is too high for this model and task: try --optimizer.lr 5e-6" in printed


def test_a_steady_loss_does_not_trip_the_guard(model_dir, tmp_path, monkeypatch):
    _growing_after(monkeypatch, 2, 1.0)  # factor 1: the loss as it is
    out = tmp_path / "run"
    assert main(_run(model_dir, out, "--steps", "12", "--eval_every", "12")) == 0
    assert json.loads((out / "summary.json").read_text())["stopped"] == "steps"
