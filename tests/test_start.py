"""Where a run starts (train.init): auto is a probe for classification with label words and none otherwise, the
run records what it chose and the rows it wrote, and resume, eval and replay write those rows back bit for bit."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import stopped_during_step

import zotune.baselines.probe as probe_module
from zotune import start
from zotune.checkpoint import CheckpointError
from zotune.cli import main
from zotune.config import RunConfig, load_config
from zotune.train import prepare


def _args(model_dir, out, *extra):
    return [
        "train",
        "--model.name", str(model_dir),
        "--steps", "4",
        "--eval_every", "2",
        "--train", "32",
        "--validation", "8",
        "--test", "8",
        "--batch_size", "4",
        "--lr", "2e-3",
        "--progress", "false",
        "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _prepared(model_dir, tmp_path, custom: dict):
    config = RunConfig()
    config.model.name = str(model_dir)
    config.task.name, config.task.validation, config.task.custom = "custom", 0, custom
    return prepare(config, log=lambda s: None)


def test_auto_starts_a_classification_run_from_a_probe_and_records_what_it_chose(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(model_dir, out)) == 0  # train.init left at its default
    printed = capsys.readouterr().out
    assert "train.init auto: a linear probe first" in printed
    assert "initialised the output rows of the 2 label words from the probe" in printed
    # config.yaml holds what auto meant, so that a later rule cannot change how this run is rebuilt
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["init"] == "probe"
    rows, ids, cost = start.load_rows(out / start.STORED)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init"] == cost["init"] == "probe" and summary["init_forward_passes"] == cost["init_forward_passes"]
    assert len(ids) == 2 and rows["weight"].shape[0] == 2 and "bias" not in rows  # Llama has no output bias
    # the printed table names the start it compares with
    header = next(line for line in printed.splitlines() if "fine-tuned" in line)
    assert "linear probe" in header and "zero-shot" not in header


def test_a_new_run_replaces_a_start_left_by_an_attempt_that_never_saved_a_state(model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = {"weight": torch.zeros(2, 32)}
    start.save_rows(out / start.STORED, stale, [1, 2], {"init": "probe"})  # not this run's: no state.json beside it
    assert main(_args(model_dir, out, "--steps", "2")) == 0
    rows, ids, cost = start.load_rows(out / start.STORED)
    assert ids != [1, 2] and not rows["weight"].equal(stale["weight"]) and cost["init_forward_passes"] == 8


def test_none_is_the_papers_start_one_option_away(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(model_dir, out, "--train.init", "none")) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "fine-tuned" in line)
    assert "linear probe" not in printed and "zero-shot" in header
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["init"] == "none"
    assert not (out / start.STORED).exists() and "init" not in json.loads((out / "summary.json").read_text())


def test_auto_falls_back_to_none_where_a_probe_cannot_start(model_dir, tmp_path):
    said = []
    qa = _write(tmp_path / "qa.jsonl", [{"q": "one two", "a": "three"}] * 4)
    generation = _prepared(model_dir, tmp_path, dict(train=qa, template="{q}", target_field="a"))
    assert start.resolve("auto", generation, said.append) == "none"
    assert "no probe" in said[-1] and "generation" in said[-1]
    choice = [{"q": "It was", "c": ["great", "bad"], "a": i % 2} for i in range(6)]
    multiple = _prepared(
        model_dir,
        tmp_path,
        dict(train=_write(tmp_path / "mc.jsonl", choice), template="{q}", options_field="c", label_field="a"),
    )
    assert start.resolve("auto", multiple, said.append) == "none" and "multiple_choice" in said[-1]
    words = {"0": " terrible", "1": " great"}
    one_label = [{"text": "a good one", "label": 1}] * 4
    single = _prepared(
        model_dir,
        tmp_path,
        dict(
            train=_write(tmp_path / "pos.jsonl", one_label), template="{text}", label_field="label", label_words=words
        ),
    )
    assert start.resolve("auto", single, said.append) == "none" and "no example of label 0" in said[-1]
    both = [{"text": f"text {i}", "label": i % 2} for i in range(4)]
    classification = _prepared(
        model_dir,
        tmp_path,
        dict(train=_write(tmp_path / "two.jsonl", both), template="{text}", label_field="label", label_words=words),
    )
    assert start.resolve("auto", classification, said.append) == "probe" and "linear probe first" in said[-1]
    assert start.resolve("none", classification, said.append) == "none"  # an explicit choice is not second-guessed
    # the reasons a head cannot hold a probe, from the one function the fit itself checks
    shared = SimpleNamespace(
        loaded=classification.loaded,
        objective=SimpleNamespace(kind="classification", label_ids=[5, 5]),
        encoded=classification.encoded,
    )
    assert "share one label-word token" in probe_module.probe_init_unavailable(shared)
    headless = SimpleNamespace(
        loaded=SimpleNamespace(model=SimpleNamespace(get_output_embeddings=lambda: None)),
        objective=classification.objective,
        encoded=classification.encoded,
    )
    assert "no output embedding" in probe_module.probe_init_unavailable(headless)


def test_a_runs_own_config_without_init_means_the_start_it_was_written_with(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  steps: 3\n")  # a run from before train.init existed started from the model as loaded
    assert load_config(path).train.init == "auto"  # a user's file: today's default
    assert load_config(path, saved=True).train.init == "none"
    path.write_text("train:\n  init: probe\n")
    assert load_config(path, saved=True).train.init == "probe"


def test_resume_eval_and_replay_write_the_stored_start_back_without_refitting(model_dir, tmp_path, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(model_dir, full)) == 0
    assert stopped_during_step(monkeypatch, _args(model_dir, part), 2) == 130
    stored_cost = start.load_rows(part / start.STORED)[2]

    def refit(*args, **kwargs):
        raise AssertionError("the stored start was refitted")

    monkeypatch.setattr(probe_module, "init_head_from_probe", refit)
    capsys.readouterr()
    assert main(["train", "--resume", str(part)]) == 0
    assert "as the run's probe wrote them" in capsys.readouterr().out
    assert (part / "trajectory.zot").read_bytes() == (full / "trajectory.zot").read_bytes()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    assert a["test"] == b["test"]
    assert b["init_seconds"] == stored_cost["init_seconds"]  # the start's cost as it was paid, not the reload's

    assert main(["eval", "--run", str(full), "--split", "test"]) == 0  # the best checkpoint, on the stored start
    accuracy = float(capsys.readouterr().out.split("accuracy")[-1].split(",")[0])
    assert accuracy == pytest.approx(100 * a["test"]["accuracy"], abs=0.01)  # printed with two decimals
    out = tmp_path / "replayed"
    replay = ["replay", "--base", str(model_dir), "--trajectory", str(full / "trajectory.zot"), "--out", str(out)]
    assert main([*replay, "--step", "best"]) == 0
    from safetensors.torch import load_file

    from zotune.checkpoint import load_tensors

    best = load_tensors(full / "best" / "model.safetensors")
    replayed = load_file(str(next(out.glob("*.safetensors"))))
    assert "lm_head.weight" in best and all(replayed[n].equal(t) for n, t in best.items())  # the untied head too
    import zotune

    with pytest.raises(ValueError, match="started from a linear probe"):  # a dict has no output layer to write
        zotune.replay({"w": torch.zeros(2)}, full / "trajectory.zot")


def test_a_missing_or_damaged_start_is_a_one_line_error(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(model_dir, run, "--steps", "2")) == 0
    stored = run / start.STORED
    good = stored.read_bytes()
    rows, ids, cost = start.load_rows(stored)
    with pytest.raises(CheckpointError, match="this task's are"):
        start.load_rows(stored, [i + 1 for i in ids])
    for damaged in (good[: len(good) // 2], os.urandom(len(good)), b""):
        stored.write_bytes(damaged)
        capsys.readouterr()
        assert main(["eval", "--run", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(stored) in err[0]
    stored.unlink()  # the run's config.yaml says probe: every rebuild of it refuses rather than use another start
    out, trajectory = tmp_path / "replayed", str(run / "trajectory.zot")
    assert main(["replay", "--base", str(model_dir), "--trajectory", trajectory, "--out", str(out)]) == 2
    assert "init.safetensors is missing" in capsys.readouterr().err and not out.exists()
    for source in (["--run", str(run)], ["--trajectory", trajectory, "--model.name", str(model_dir)]):
        assert main(["eval", *source]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "init.safetensors is missing" in err[0]
    import zotune
    from zotune.config import ConfigError

    with pytest.raises(ConfigError, match="init.safetensors is missing"):
        zotune.replay(torch.nn.Linear(2, 2), trajectory)


def test_the_stored_start_round_trips_with_its_bias(tmp_path):
    path = tmp_path / start.STORED
    rows = {"weight": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), "bias": torch.tensor([1.0, 2, 3])}
    cost = {"init": "probe", "init_probe_C": 0.1, "init_forward_passes": 62.5, "init_seconds": 80.2}
    start.save_rows(path, rows, [7, 8, 9], cost)
    back, ids, cost_back = start.load_rows(path, [7, 8, 9])
    assert ids == [7, 8, 9] and cost_back == cost
    assert back["weight"].equal(rows["weight"]) and back["bias"].equal(rows["bias"])
    start.save_rows(path, {"weight": rows["weight"], "bias": torch.ones(2)}, [7, 8, 9], cost)
    with pytest.raises(CheckpointError, match="not a zotune run's start"):
        start.load_rows(path)
