"""Linear probing then MeZO (the paper's Appendix F.1) as a training recipe: `--train.init probe`."""

import json

import pytest

from zotune.cli import main
from zotune.config import ConfigError, load_config


def _args(model_dir, out, *extra):
    return [
        "train",
        "--model.name",
        str(model_dir),
        "--steps",
        "4",
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
        "--lr",
        "2e-3",
        "--progress",
        "false",
        "--train.init",
        "probe",
        "--output_dir",
        str(out),
        *extra,
    ]


def test_training_starts_from_the_probe_and_its_checkpoint_evaluates(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(model_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "initialised the output rows of the 2 label words from the probe" in printed
    summary = json.loads((out / "summary.json").read_text())
    from zotune.baselines.probe import ProbeConfig, linear_probe
    from zotune.train import prepare

    plain = load_config(out / "config.yaml")
    plain.train.init = "none"
    probe = linear_probe(
        prepare(plain, log=lambda m: None), ProbeConfig(standardize=False, progress=False), log=lambda m: None
    )
    # zero-shot here is the probe-initialised model: its accuracy is the (unstandardised) probe's
    assert summary["zero_shot"]["validation"]["accuracy"] == pytest.approx(probe["validation"]["accuracy"])
    # the probe's cost is recorded beside the optimizer's: its features of the 32 training examples are 8 batches of 4
    assert summary["init"] == "probe" and summary["init_forward_passes"] == 8 and summary["init_seconds"] >= 0
    assert summary["forward_passes"] == 4 * 2  # the steps' own (MeZO: two a step)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["init_forward_passes"] == 8 and "zero_shot_validation_accuracy" in first
    # the best checkpoint holds the untied head; eval prepares the model the same way and loads it
    assert main(["eval", "--run", str(out), "--progress", "false"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_bad_init_is_a_config_error():
    with pytest.raises(ConfigError, match="train.init must be one of auto, probe, none"):
        load_config(None, ["--train.init", "lp"])
