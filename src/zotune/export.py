"""Rebuild a run's weights from the base model and its trajectory, and save them as a model folder.

This is ``zotune replay``: the trajectory (seed + one scalar per step) replayed onto the base model,
prepared as the run prepared it (its config.yaml beside the trajectory: tuning mode, dtype, device; and the
start its train.init wrote, init.safetensors beside it, when it started from a linear probe), then saved where a Hugging Face ``from_pretrained`` loads it: LoRA merged into the weights, or the
base model with the trained prefixes in ``prefix.safetensors``. The folder appears whole or not at
all (written as ``OUT.partial``, then renamed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zotune import checkpoint
from zotune.baselines.probe import write_head_rows
from zotune.checkpoint import CheckpointError, read_json
from zotune.config import ConfigError, load_config
from zotune.models import ModelConfig, load_model
from zotune.optim.replay import replay
from zotune.start import load_rows, stored_start
from zotune.trajectory import Trajectory, read_trajectory
from zotune.tuning import merge_lora, tune_loaded

__all__ = ["Exported", "export", "resolve_step"]


@dataclass
class Exported:
    out: Path
    steps: int  # steps replayed
    tuning: str  # the run's tuning mode: what the folder holds ("lora": merged; "prefix": prefix.safetensors)


def resolve_step(step: str | int | None, run_dir: Path, trajectory: Trajectory) -> int | None:
    """A count of steps, or ``"best"`` (the run's best validation step, from best/best.json); None: all."""
    if step is None:
        return None
    if step == "best":
        path = run_dir / "best" / "best.json"
        if not path.is_file():
            raise ConfigError(f"--step best: {path} is missing (a run validated at least once writes it)")
        best = read_json(path)
        n = best.get("step") if isinstance(best, dict) else None
        if not isinstance(n, int) or isinstance(n, bool):
            raise CheckpointError(f"{path}: not a best.json written by zotune train (no step number in it)")
    else:
        try:
            n = int(step)
        except ValueError:
            raise ConfigError(f"--step must be a number of steps or 'best', got {step!r}") from None
    if not 0 <= n <= trajectory.n_steps:
        raise ConfigError(f"--step {step}: the trajectory holds {trajectory.n_steps} steps")
    return n


def trained_on(run_dir: Path, log: Callable[[str], None]) -> str | None:
    """The device the run beside a trajectory trained on (its summary.json), if this machine has it."""
    path = run_dir / "summary.json"
    summary = read_json(path) if path.is_file() else {}
    device = summary.get("device") if isinstance(summary, dict) else None
    if not isinstance(summary, dict) or not isinstance(device, (str, type(None))):
        raise CheckpointError(f"{path}: not a summary.json written by zotune train (give --device to replay anyway)")
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        log(
            f"the run trained on {device}; this machine has no CUDA GPU: replaying on the CPU, whose z may differ "
            f"from the GPU's in the last bits"
        )
        return "cpu"
    return device


def export(
    base: str,
    trajectory: str | Path,
    out: str | Path,
    *,
    step: str | int | None = None,
    config: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    log: Callable[[str], None] = print,
) -> Exported:
    """Replay ``trajectory`` (its first ``step`` steps, or ``"best"``) onto ``base`` and save the model to ``out``.

    ``config`` defaults to the config.yaml beside the trajectory (how the run prepared its model);
    ``device`` to the one the run trained on, where this machine has it.
    """
    out, trajectory_path = Path(out), Path(trajectory)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new --out directory")
    run_dir = trajectory_path.parent
    loaded_trajectory = read_trajectory(trajectory_path)  # a bad file fails before the model is loaded
    steps = resolve_step(step, run_dir, loaded_trajectory)
    config_path = Path(config) if config else run_dir / "config.yaml"
    run_config = load_config(config_path, saved=not config) if config or config_path.is_file() else None
    model_config = run_config.model if run_config else ModelConfig()
    # the run's start (train.init probe in the run's own config.yaml, whatever --config says): the label words' rows
    # it wrote before step 1; a missing or damaged file fails before the model is loaded
    stored = stored_start(run_dir)
    rows, label_ids, _ = load_rows(stored) if stored else (None, None, None)
    device = device or trained_on(run_dir, log) or model_config.device
    model_config = dataclasses.replace(model_config, name=base, dtype=dtype or model_config.dtype, device=device)
    loaded = tune_loaded(load_model(model_config, log=log), model_config, log=log)
    if rows is not None:
        write_head_rows(loaded.model, label_ids, rows["weight"], rows.get("bias"), log)
    replay(loaded.model, loaded_trajectory, steps=steps)
    partial = out.with_name(out.name + ".partial")
    model = merge_lora(loaded.model) if model_config.tuning == "lora" else loaded.model
    if model_config.tuning == "prefix":
        model.model.save_pretrained(partial)
        checkpoint.save_tensors(
            partial / "prefix.safetensors",
            dict(model.prefix.named_parameters()),
            {"prefix_tokens": str(model_config.prefix_tokens)},
        )
    else:
        model.save_pretrained(partial)
    loaded.tokenizer.save_pretrained(partial)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return Exported(out, loaded_trajectory.n_steps if steps is None else steps, model_config.tuning)
