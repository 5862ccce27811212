"""Where a run starts: ``train.init``, the weights before MeZO's first step.

- ``none``: the pretrained model as loaded (the paper's MeZO, from zero-shot).
- ``probe``: a linear probe fitted on the training split's features, written into the label words' output rows
  (the paper's Appendix F.1, "linear probing then MeZO"; :func:`zotune.baselines.probe.init_head_from_probe`).
- ``auto`` (the default): ``probe`` where it applies (a classification task with one distinct label-word token per
  label, every label in the training split, a model with an output embedding), ``none`` otherwise; the choice and
  its reason are logged and the run's config.yaml records the resolved value, so a later zotune version's rule
  cannot change how an existing run is rebuilt.

A run stores what its start wrote (the label words' rows, a few kB) in ``init.safetensors`` beside its trajectory:
a resume, ``zotune eval --run`` / ``--trajectory``, ``zotune replay`` and :func:`replay` (``zotune.replay``) write
the same rows back instead of refitting, so the run is rebuilt bit for bit without its data or scikit-learn (a trajectory holds steps only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from zotune.config import INITS, ConfigError, load_config

__all__ = ["INITS", "STORED", "initialise", "load_rows", "replay", "resolve", "save_rows", "stored_start"]

STORED = "init.safetensors"  # the run folder's record of what train.init wrote


def resolve(init: str, prepared, log: Callable[[str], None] = print) -> str:
    """``init`` with ``auto`` replaced by what it means for this model and task (``probe`` or ``none``), logged."""
    if init != "auto":
        return init
    from zotune.baselines.probe import probe_init_unavailable

    why = probe_init_unavailable(prepared)
    if why is None:
        log(
            "train.init auto: a linear probe first (classification with label words; --train.init none: from zero-shot)"
        )
        return "probe"
    log(f"train.init auto: no probe, training starts from the model as loaded ({why})")
    return "none"


def initialise(
    prepared, init: str, *, batch_size: int, stored: str | Path | None = None, log: Callable[[str], None] = print
) -> tuple[dict, dict]:
    """Set ``prepared``'s model to the start ``init`` (resolved: ``probe`` or ``none``) names.

    With ``stored`` (a run's init.safetensors) present, its rows are written back as they were (no fit); otherwise a
    probe is fitted. Returns (what the start cost, for the run's metrics and summary: ``init``,
    ``init_probe_C``, ``init_forward_passes`` in training batches of ``batch_size``, ``init_seconds``; the rows
    to store, ``{}`` when nothing was written).
    """
    if init == "none":
        return {}, {}
    if init != "probe":
        raise ValueError(f"train.init must be resolved to probe or none here, got {init!r}")
    from zotune.baselines.probe import ProbeConfig, head_rows, init_head_from_probe, write_head_rows

    objective, model = prepared.objective, prepared.loaded.model
    if stored is not None and Path(stored).is_file():
        rows, _, cost = load_rows(stored, objective.label_ids)
        write_head_rows(model, objective.label_ids, rows["weight"], rows.get("bias"), log)
        log(f"the label words' output rows as the run's probe wrote them ({stored})")
        return cost, rows
    started = time.perf_counter()
    # deterministic (same data, same fit); a run stores the rows it wrote so that nothing later depends on that
    probe = init_head_from_probe(prepared, ProbeConfig(progress=False), log=log)
    cost = {
        "init": "probe",
        "init_probe_C": probe["C"],
        # the features of the training split are what fitted the probe: forward passes of training batches' worth,
        # for counting a run's cost to accuracy (the validation split's only chose C, as validations choose the best step)
        "init_forward_passes": round(len(prepared.encoded["train"]) / batch_size, 2),
        "init_seconds": round(time.perf_counter() - started, 1),
    }
    return cost, head_rows(model, objective.label_ids)


def save_rows(path: str | Path, rows: dict, label_ids: list[int], cost: dict) -> None:
    """Write the start's rows, the label-word token ids they belong to, and the start's cost (as metadata) to
    ``path`` (safetensors, atomically)."""
    import torch

    from zotune import checkpoint

    tensors = {f"label_rows.{k}": v for k, v in rows.items()}
    tensors["label_ids"] = torch.tensor(list(label_ids), dtype=torch.int64)
    checkpoint.save_tensors(path, tensors, {k: str(v) for k, v in cost.items()})


_COST_TYPES = {"init": str, "init_probe_C": float, "init_forward_passes": float, "init_seconds": float}


def load_rows(path: str | Path, label_ids: list[int] | None = None) -> tuple[dict, list[int], dict]:
    """(rows, their label-word token ids, the start's cost) from a run's init.safetensors. A damaged file, or
    one for other label words than ``label_ids`` (when given), is a one-line
    :class:`zotune.checkpoint.CheckpointError` naming it."""
    from zotune import checkpoint

    path = Path(path)
    metadata, _ = checkpoint.read_header(path)
    tensors = checkpoint.load_tensors(path)
    ids = tensors.pop("label_ids", None)
    rows = {k.removeprefix("label_rows."): v for k, v in tensors.items() if k.startswith("label_rows.")}
    weight, bias = rows.get("weight"), rows.get("bias")
    if (
        metadata.get("init") != "probe"
        or ids is None
        or ids.dim() != 1
        or ids.is_floating_point()
        or weight is None
        or weight.dim() != 2
        or weight.shape[0] != ids.numel()
        or (bias is not None and tuple(bias.shape) != (ids.numel(),))
        or len(rows) != len(tensors)
        or set(rows) - {"weight", "bias"}
    ):
        raise checkpoint.CheckpointError(
            f"{path}: not a zotune run's start (label_ids [labels], label_rows.weight [labels, hidden], "
            "label_rows.bias [labels] if any, metadata init=probe)"
        )
    stored_ids = ids.tolist()
    if label_ids is not None and stored_ids != list(label_ids):
        raise checkpoint.CheckpointError(
            f"{path}: rows for label-word tokens {stored_ids}, this task's are {list(label_ids)}"
        )
    cost = {}
    for key, kind in _COST_TYPES.items():
        if key in metadata:
            try:
                cost[key] = kind(metadata[key])
            except ValueError:
                raise checkpoint.CheckpointError(f"{path}: metadata {key}={metadata[key]!r} is not a number") from None
    return rows, stored_ids, cost


def stored_start(run_dir: str | Path) -> Path | None:
    """The run folder's init.safetensors, or None where the run started from the model as loaded.

    A run whose own config.yaml says ``train.init: probe`` and whose init.safetensors is missing is a one-line
    :class:`zotune.config.ConfigError`: its trajectory would replay onto another start, and its checkpoints belong to
    a model with an untied output layer.
    """
    run_dir = Path(run_dir)
    stored, config = run_dir / STORED, run_dir / "config.yaml"
    if stored.is_file():
        return stored
    if config.is_file() and load_config(config, saved=True).train.init == "probe":
        raise ConfigError(
            f"the run started from a linear probe (train.init probe) and {stored} is missing: without the rows "
            "it wrote, its steps replay onto another start"
        )
    return None


def replay(target, trajectory, **kwargs):
    """:func:`zotune.optim.replay.replay` with the run's start first (``zotune.replay``).

    A trajectory file whose folder holds init.safetensors is a run that started from a linear probe: its rows are
    written into ``target`` (untying a tied output embedding, as the run did) before the steps are replayed.
    Writing them onto a model that already holds them changes nothing; a probe run's trajectory whose
    init.safetensors is missing is a one-line error (:func:`stored_start`). ``kwargs`` go to the optimizer's replay.

    Example::

        model = AutoModelForCausalLM.from_pretrained(base)
        zotune.replay(model, "runs/sst2-.../trajectory.zot")  # the run's start, then its steps
    """
    import torch

    from zotune.optim.replay import replay as replay_steps
    from zotune.trajectory import Trajectory

    stored = None if isinstance(trajectory, Trajectory) else stored_start(Path(trajectory).parent)
    if stored is not None:
        if not isinstance(target, torch.nn.Module):
            raise ValueError(
                f"the run started from a linear probe ({stored}): replay onto the model (an nn.Module), "
                "whose output rows it writes first"
            )
        from zotune.baselines.probe import write_head_rows

        rows, label_ids, _ = load_rows(stored)
        write_head_rows(target, label_ids, rows["weight"], rows.get("bias"), log=lambda message: None)
    return replay_steps(target, trajectory, **kwargs)
