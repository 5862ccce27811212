import pytest

from zotune.config import ConfigError, RunConfig, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task:\n  name: rte\noptimizer:\n  lr: 1.0e-7\ntrain:\n  steps: 50\n")
    config = load_config(path, ["--lr", "2e-6", "--train.batch_size=4", "--trainable", "*q_proj*,*v_proj*"])
    assert config.task.name == "rte" and config.train.steps == 50
    assert config.optimizer.lr == 2e-6 and config.train.batch_size == 4
    assert config.model.trainable == ["*q_proj*", "*v_proj*"]
    assert load_config() == RunConfig()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--lrr", "1"], "unknown config key 'lrr'; did you mean 'lr'?"),
        (["--name", "x"], "unknown config key 'name'; did you mean 'task.name'?"),
        (["--steps", "many"], "train.steps must be int, got 'many'"),
        (["--steps", "0"], "train.steps must be >= 1, got 0"),
        (["--forward_chunks", "-1"], "train.forward_chunks must be >= 0 (0: chosen per batch), got -1"),
        (["--fuse_next", "maybe"], "optimizer.fuse_next must be bool, got 'maybe'"),
        (["--schedule", "step"], "optimizer.schedule must be one of constant, linear, cosine, got 'step'"),
        (["--eps", "0"], "optimizer.eps must be a finite number > 0, got 0.0"),
        (["--dtype", "float8"], "model dtype must be one of float32, bfloat16, float16, got 'float8'"),
        (["--lr"], "--lr needs a value"),
        (["lr", "1"], "expected --key value, got 'lr'"),
    ],
)
def test_bad_overrides_are_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    bad.write_text("optimiser:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optimiser'; did you mean 'optimizer'"):
        load_config(bad)
    bad.write_text("train:\n  step: 10\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.step'; did you mean 'train.steps'"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_example_configs_load():
    from pathlib import Path

    from zotune.tasks.custom import CustomTaskConfig

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        if path.name.startswith("grid"):  # a `zotune compare` grid, not a run config
            from zotune.compare import load_compare_config

            load_compare_config(path)
            continue
        config = load_config(path)
        if config.task.name == "custom":
            CustomTaskConfig.from_dict(config.task.custom)


def test_typed_changes_apply_after_the_command_line_and_unknown_keys_are_refused():
    from zotune.config import parse_overrides

    # values as YAML reads them ("1e-6" stays text: the config's field types convert it)
    assert parse_overrides(["--steps", "3", "--task.name=rte"]) == {"train.steps": 3, "task.name": "rte"}
    config = load_config(overrides=["--lr", "1e-6", "--steps", "3"], changes={"lr": 1e-5, "train.batch_size": 4})
    assert (config.optimizer.lr, config.train.steps, config.train.batch_size) == (1e-5, 3, 4)
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config(changes={"train.stepz": 2})


def test_the_readmes_config_block_shows_the_defaults():
    """Every value in the README's YAML block under `zotune train` is the default it claims to be (the block is
    what users read as the defaults; the default run's train.steps changed once already)."""
    import re
    from pathlib import Path

    import yaml

    from zotune.config import RunConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(model:.*?)```", readme, re.S)
    assert block, "the README's config block (starting 'model:') is gone"
    defaults = RunConfig().to_dict()
    shown = yaml.safe_load(block.group(1))
    for section, values in shown.items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"README shows {section}.{key}: {value!r}"
