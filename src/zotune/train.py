"""The training run behind ``zotune train``: MeZO on a task, with evaluation, checkpoints and logs.

A run directory holds everything::

    config.yaml        the full configuration
    metrics.jsonl      one line per step (loss, projected gradient, lr) and per evaluation
    trajectory.zot     the run as seed + projected gradients (zotune.replay rebuilds the weights)
    state.json         what --resume needs: optimizer, schedule and loop state (no weights)
    resume/            the trainable weights at state.json's step (train.snapshot), while the run can go on
    best/              the best validation weights (trainable tensors, safetensors) and best.json
    curves.png         training loss and validation metric against steps
    summary.json       zero-shot -> best validation -> test, steps, wall time, peak memory

Resuming loads the weights saved with the state (``resume/``) or, without them, rebuilds them from
the base model and the trajectory: bit for bit either way (replay costs about one sweep per step
and term, which adds up over thousands of steps on a CPU). Ctrl-C (or SIGTERM) stops at the end of
the current step and saves the state.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from zotune import checkpoint
from zotune.config import ConfigError, RunConfig, load_config
from zotune.models import LoadedModel, load_model
from zotune.objectives import Encoded, Objective, evaluate, make_objective, metric_objective
from zotune.optim import make_optimizer
from zotune.runtime import StopFlag as _StopFlag  # Ctrl-C or SIGTERM: finish the step, save, stop
from zotune.runtime import peak_memory_mb as _peak_memory_mb
from zotune.tasks import TaskError, get_task
from zotune.trajectory import read_trajectory, replay
from zotune.tuning import tune_loaded

__all__ = ["Prepared", "RunResult", "prepare", "run", "schedule_factor"]

SPLITS = ("train", "validation", "test")


@dataclass
class Prepared:
    """A model with its task, ready to train or evaluate."""

    loaded: LoadedModel
    objective: Objective
    encoded: dict[str, list[Encoded]]
    note: str = ""


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    interrupted: bool = False


def _make_task(config: RunConfig):
    if config.task.name == "custom":
        from zotune.tasks.custom import CustomTask, CustomTaskConfig

        return CustomTask(CustomTaskConfig.from_dict(config.task.custom))
    task = get_task(config.task.name)
    if config.task.template is not None or config.task.label_words is not None:
        from zotune.tasks.templated import Retemplated

        return Retemplated(task, config.task.template, config.task.label_words)
    return task


def prepare(config: RunConfig, *, log: Callable[[str], None] = print, loaded: LoadedModel | None = None) -> Prepared:
    """Load the model and the task's splits, render the prompts and tokenize them once."""
    task = _make_task(config)
    t = config.task
    # The data first: a bad file should fail before a model is loaded.
    splits = task.splits(t.data_dir, seed=t.seed, train=t.train, validation=t.validation, test=t.test,
                         protocol=t.protocol, k=t.k)
    loaded = tune_loaded(loaded or load_model(config.model, log=log), config.model, log=log)
    instances = {s: [task.render(r, loaded.kind) for r in getattr(splits, s)] for s in SPLITS}
    first = next((i for s in SPLITS for i in instances[s]), None)
    if first is None:
        raise TaskError(f"task {config.task.name!r} produced no examples")
    objective = make_objective(task, loaded.tokenizer, loaded.kind, label_words=first.options, scoring=t.scoring,
                               max_length=t.max_length, max_new_tokens=t.max_new_tokens)
    encoded = {s: [objective.encode(i) for i in instances[s]] for s in SPLITS}
    prepared = Prepared(loaded, objective, encoded, splits.note)
    if config.train.init == "probe":
        # Deterministic (same data, same fit), so resume, eval --run and eval --trajectory, which all
        # prepare the model this way, start from the same head before weights or a trajectory.
        from zotune.baselines.probe import ProbeConfig, init_head_from_probe

        init_head_from_probe(prepared, ProbeConfig(progress=False), log=log)
    return prepared


def schedule_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """The learning-rate multiplier at ``step`` (0-based) for a run of ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of ``step``: consecutive slices of a per-epoch permutation keyed by (seed, epoch)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return out


DIVERGENCE_START = 5  # the first steps, whose median loss is the starting loss the divergence guard compares with


def _diverged(loop: dict, ema: float | None, loss: float, tc) -> bool:
    """Whether the running mean of the training loss has passed ``tc.divergence`` times the starting loss.

    The starting loss is the median of the first ``DIVERGENCE_START`` steps' (finite) losses, taken at
    weights that have barely moved: a median, so that one lucky or one already exploding batch does not
    set it. The guard watches from then on, so a rate too high for the model stops the run within a
    few steps rather than after the loss has grown for tens of them. The reference is kept in the loop
    state (a resumed run compares with the same number; runs of earlier versions keep theirs, the running
    mean at step 20). Only a loss is guarded: a metric objective is negative.
    """
    if tc.objective != "loss" or tc.divergence <= 0 or ema is None:
        return False
    if "loss_reference" not in loop:
        start = loop.setdefault("start_losses", [])
        if math.isfinite(loss):
            start.append(loss)
        if len(start) < DIVERGENCE_START:
            return False
        reference = statistics.median(start)
        if reference <= 0:  # a loss that starts at 0 (or below) has no scale to compare with
            return False
        loop["loss_reference"] = reference
    return ema > tc.divergence * loop["loss_reference"]


def _divergence_message(loop: dict, ema: float, step: int, tc, lr: float, tested: str) -> str:
    reference = loop["loss_reference"]
    where = (f"the starting loss ({reference:.4g}, the median of steps 1-{DIVERGENCE_START})" if "start_losses" in loop
             else f"its value at step 20 ({reference:.4g})")
    return (f"the training loss diverged: its running mean {ema:.4g} at step {step} is over {tc.divergence:g}x "
            f"{where}; stopping and testing {tested}. optimizer.lr {lr:g} is too high for this model and task: "
            f"try --optimizer.lr {_smaller_lr(lr)}")


def _smaller_lr(lr: float) -> str:
    """A rate a tenth of ``lr``, written as a user would type it (5e-05 -> 5e-06)."""
    return f"{lr / 10:.0e}".replace("e-0", "e-").replace("e+0", "e+")


class _Logger:
    """metrics.jsonl, and TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, resume: bool):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a" if resume else "w")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, row: dict) -> None:
        import json

        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after ``step`` (they belong to steps a resume will redo)."""
    import json

    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if (row := json.loads(r)).get("step", 0) <= step  # a finished run's test row goes too
            and not any(key.startswith("test_") for key in row)]
    path.write_text("".join(r + "\n" for r in rows))


SNAPSHOT = Path("resume") / "model.safetensors"  # the trainable weights at state.json's step, for a fast resume


_MOMENT = "zotune.moment."  # the snapshot's names of a stored-state optimizer's moments (beside the weights)


def _save_snapshot(run_dir: Path, step: int, trajectory_bytes, trainable, moments, log) -> None:
    """The trainable weights exactly as they are (a fused perturbation included), tagged with the step,
    and the optimizer's stored moments (stored-state momentum/Adam), which resume would otherwise rebuild."""
    try:
        checkpoint.save_tensors(run_dir / SNAPSHOT, {**dict(trainable), **{_MOMENT + n: t for n, t in moments.items()}},
                                {"step": str(step), "trajectory_bytes": str(trajectory_bytes)})
    except (OSError, ValueError) as err:  # a full disk or non-finite weights: resume can still replay
        _drop_snapshot(run_dir)
        log(f"warning: no weights saved for --resume ({err}); it will replay the trajectory")


def _drop_snapshot(run_dir: Path) -> None:
    (run_dir / SNAPSHOT).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the folder goes too when nothing else is in it
        (run_dir / SNAPSHOT).parent.rmdir()


def _load_snapshot(run_dir: Path, step: int, trajectory_bytes, trainable) -> dict | None:
    """Load the snapshot into the trainable weights if it is the state's (same step and trajectory length).

    Returns the saved moments (``{}`` when there are none), or None when nothing was loaded.
    """
    path = run_dir / SNAPSHOT
    if not path.is_file():
        return None
    try:
        meta, shapes = checkpoint.read_header(path)
        if meta.get("step") != str(step) or meta.get("trajectory_bytes") != str(trajectory_bytes):
            return None  # an older save's, or the state was written by a version without snapshots
        weights = {n: s for n, s in shapes.items() if not n.startswith(_MOMENT)}
        if weights != {n: list(p.shape) for n, p in trainable}:  # every tensor, or replay would mix the two
            return None
        moments = {n: torch.empty(s, dtype=torch.float32) for n, s in shapes.items() if n.startswith(_MOMENT)}
        checkpoint.copy_into(path, {**dict(trainable), **moments})
    except checkpoint.CheckpointMismatch:
        return None
    return {n[len(_MOMENT):]: t for n, t in moments.items()}


def _default_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fmt(metrics: dict | None, name: str) -> str:
    if not metrics or name not in metrics or not math.isfinite(metrics[name]):
        return "-"
    return f"{100 * metrics[name]:.1f}"


# what a resume may change (train.steps: more steps, and optimizer.lr: the rate of the steps still to
# come, both under a constant schedule; the trajectory records every step's lr, so replay stays exact)
RESUME_OVERRIDES = ("train.steps", "train.time_limit", "train.divergence", "train.progress", "train.snapshot",
                    "optimizer.lr")


def _check_constant(config: RunConfig, what: str) -> None:
    if config.optimizer.schedule != "constant":
        raise ConfigError(f"optimizer.schedule {config.optimizer.schedule} spreads its learning rates over "
                          f"train.steps ({config.train.steps}): a resume cannot change {what} (start a new run)")


def _check_more_steps(config: RunConfig, steps: int, done: int) -> None:
    """A resume may change train.steps only where the steps already taken stay as they were."""
    if steps < done:
        raise ConfigError(f"train.steps {steps} is fewer than the {done} this run has already taken")
    _check_constant(config, "train.steps")


def _set_lr(opt, sched, lr: float) -> None:
    """Give the steps from here learning rate ``lr`` (over a constant schedule's warmup factor, if any)."""
    for group in opt.param_groups:
        factor = group["lr"] / group["initial_lr"] if group["initial_lr"] else 1.0
        group["initial_lr"], group["lr"] = lr, lr * factor
    sched.base_lrs = [lr for _ in opt.param_groups]


def run(config: RunConfig | None = None, *, resume: str | Path | None = None,
        log: Callable[[str], None] = print, loaded: LoadedModel | None = None,
        resume_overrides: list[str] | None = None) -> RunResult:
    """Fine-tune with MeZO as ``config`` says (or continue the run in ``resume``).

    ``resume_overrides`` (``["--train.time_limit", "120"]``) may change the keys of ``RESUME_OVERRIDES``
    of a resumed run, e.g. to extend one that stopped at its time limit, or one that finished its steps
    with more of them; the run's config.yaml records it.
    """
    state = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "state.json").is_file() or not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} is not a resumable run directory (no state.json / config.yaml)")
        config = load_config(run_dir / "config.yaml")
        state = checkpoint.read_json(run_dir / "state.json")
        if resume_overrides:
            changed = load_config(run_dir / "config.yaml", resume_overrides)
            before, after = config.to_dict(), changed.to_dict()
            bad = [f"{section}.{key}" for section in after for key in after[section]
                   if after[section][key] != before[section][key] and f"{section}.{key}" not in RESUME_OVERRIDES]
            if bad:
                raise ConfigError(f"--resume continues a run with its own config; it may change only "
                                  f"{', '.join(RESUME_OVERRIDES)}, not {', '.join(bad)}")
            if changed.train.steps != config.train.steps:
                _check_more_steps(config, changed.train.steps, state["loop"]["step"])
            if changed.optimizer.lr != config.optimizer.lr:
                _check_constant(config, "optimizer.lr")
            config = changed
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    else:
        config = config or RunConfig()
        run_dir = Path(config.train.output_dir) if config.train.output_dir else _default_dir(config)
        if (run_dir / "state.json").exists():
            raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another output_dir")
    tc, oc = config.train, config.optimizer
    prepared = prepare(config, log=log, loaded=loaded)
    if tc.objective == "loss":
        train_loss = lambda m, b: prepared.objective.loss(m, b, tc.forward_chunks)  # noqa: E731
    else:  # a non-differentiable objective: MeZO minimises the batch's negative metric or reward
        train_loss = metric_objective(prepared.objective, tc.objective)
    model, objective, encoded = prepared.loaded.model, prepared.objective, prepared.encoded
    device = next(model.parameters()).device
    if not encoded["train"]:
        raise TaskError("the training split is empty")
    run_dir.mkdir(parents=True, exist_ok=True)
    if state is None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    log(f"model {prepared.loaded.source} ({prepared.loaded.kind}); task {config.task.name}: "
        + ", ".join(f"{len(encoded[s])} {s}" for s in SPLITS) + (f" ({prepared.note})" if prepared.note else ""))
    log(f"run directory {run_dir}")

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = make_optimizer(trainable, oc, trajectory=run_dir / "trajectory.zot", on_nonfinite="skip")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: schedule_factor(s, tc.steps, oc.schedule, oc.warmup_steps))
    metric = objective.metric_name
    loop = {"step": 0, "best": None, "zero_shot": {}, "elapsed": 0.0, "skipped": 0, "device": str(device)}
    if state is not None:
        loop = state["loop"]
        before = loop.get("device")
        if before is not None and torch.device(before).type != device.type:
            log(f"warning: this run trained on {before} and resumes on {device}: the steps from here (and weights "
                f"rebuilt from the trajectory) may differ from an uninterrupted run in the last bits")
        loop["device"] = str(device)
        size = state["optimizer"]["mezo"]["trajectory_bytes"] or 0
        traj_path = run_dir / "trajectory.zot"
        with open(traj_path, "r+b") as f:
            f.truncate(size)
        moments = _load_snapshot(run_dir, loop["step"], size, trainable)
        if moments is not None:
            log(f"resuming at step {loop['step']}: the weights saved with its state loaded")
        else:
            log(f"resuming at step {loop['step']}: rebuilding the weights from the trajectory")
            replay(model, read_trajectory(traj_path), finish=False)
        opt.load_state_dict(state["optimizer"], moments=moments)  # None or {}: rebuilt from the trajectory
        sched.load_state_dict(state["scheduler"])
        if sched.base_lrs and sched.base_lrs[0] != oc.lr:  # --resume ... --optimizer.lr X: the state holds the old rate
            log(f"optimizer.lr {sched.base_lrs[0]:g} -> {oc.lr:g} from step {loop['step']}")
            loop.setdefault("lr_changes", []).append({"step": loop["step"], "from": sched.base_lrs[0], "to": oc.lr})
            _set_lr(opt, sched, oc.lr)
        _truncate_metrics(run_dir / "metrics.jsonl", loop["step"])
    logger = _Logger(run_dir, resume=state is not None)

    from tqdm.auto import tqdm

    def eval_split(split: str) -> dict:
        with opt.unperturbed(), tqdm(total=len(encoded[split]), desc=f"eval {split}", unit="ex", leave=False,
                                     disable=not tc.progress, dynamic_ncols=True) as eval_bar:
            return evaluate(objective, model, encoded[split], tc.eval_batch_size, progress=eval_bar.update)

    def save_state() -> None:
        loop["loss_ema"] = ema
        optimizer_state = opt.state_dict(flush=False)
        if tc.snapshot:  # first: a crash between the two files leaves a snapshot whose step is not the state's
            _save_snapshot(run_dir, loop["step"], optimizer_state["mezo"]["trajectory_bytes"], trainable,
                           opt.moment_tensors(), log)
        else:  # turned off on resume: no stale weights left taking disk space
            _drop_snapshot(run_dir)
        checkpoint.write_json(run_dir / "state.json", {
            "optimizer": optimizer_state, "scheduler": sched.state_dict(), "loop": loop})

    def keep_best(step: int, val: dict) -> None:
        loop["best"] = {"step": step, "metric": val[metric], "metrics": val}
        if tc.save_best:
            with opt.unperturbed():
                checkpoint.save_tensors(run_dir / "best" / "model.safetensors",
                                        {n: p for n, p in trainable}, {"step": str(step)})
            checkpoint.write_json(run_dir / "best" / "best.json", loop["best"])

    # The starting weights are validated (zero_shot: and tested), and with keep_start they are the best
    # checkpoint until a step beats them: a run that only makes the model worse tests what it started from.
    start_splits = ("validation", "test") if tc.zero_shot else ("validation",) if tc.keep_start else ()
    if state is None and any(encoded[s] for s in start_splits):
        log("zero-shot evaluation ..." if tc.zero_shot else "validating the starting weights ...")
        loop["zero_shot"] = {s: eval_split(s) for s in start_splits if encoded[s]}
        log(f"zero-shot: validation {_fmt(loop['zero_shot'].get('validation'), metric)}, "
            f"test {_fmt(loop['zero_shot'].get('test'), metric)}")
        logger.write({"step": 0, **{f"zero_shot_{s}_{k}": v for s, m in loop["zero_shot"].items() for k, v in m.items()}})
        if tc.keep_start and "validation" in loop["zero_shot"]:
            keep_best(0, loop["zero_shot"]["validation"])
            loop["last_val"] = loop["best"]["metric"]

    bar = tqdm(total=tc.steps, initial=loop["step"], disable=not tc.progress, desc="MeZO", unit="step",
               dynamic_ncols=True)
    started = time.perf_counter() - loop["elapsed"]
    ema = loop.get("loss_ema")
    tested = "the best weights" if tc.save_best else "the last weights (save_best is off)"
    interrupted = False
    with _StopFlag() as stop:
        while loop["step"] < tc.steps:
            idx = _batch_indices(len(encoded["train"]), tc.batch_size, loop["step"], config.task.seed)
            batch = [encoded["train"][i] for i in idx]
            loss = float(opt.step(lambda: train_loss(model, batch)))
            loop["skipped"] += int(not all(math.isfinite(x) for x in opt.last_losses))  # a NaN/inf step was skipped
            sched.step()
            loop["step"] += 1
            step = loop["step"]
            if math.isfinite(loss):
                ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            diverged = _diverged(loop, ema, loss, tc)
            logger.write({"step": step, "loss": loss, "loss_minus": opt.last_losses[1] if opt.last_losses else None,
                          "projected_grad": opt.projected_grad, "lr": opt.param_groups[0]["lr"],
                          "elapsed": time.perf_counter() - started})
            postfix = {"loss": f"{ema:.4f}" if ema is not None else "-"}
            if loop["best"] is not None:
                postfix[f"val_{metric}"] = f"{100 * loop['last_val']:.1f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            out_of_time = (tc.time_limit > 0 and step < tc.steps
                           and time.perf_counter() - started >= 60 * tc.time_limit)
            if diverged:  # these weights are not a candidate for the best: stop before validating them
                loop["stopped"] = "diverged"
                log(_divergence_message(loop, ema, step, tc, opt.param_groups[0]["initial_lr"], tested))
                break
            if step % tc.eval_every == 0 or step == tc.steps or out_of_time:
                val = eval_split("validation") if encoded["validation"] else {metric: -loss}
                loop["last_val"] = val[metric]
                logger.write({"step": step, **{f"validation_{k}": v for k, v in val.items()}})
                if loop["best"] is None or val[metric] > loop["best"]["metric"]:  # a tie keeps the earlier
                    keep_best(step, val)
                bar.set_postfix({**postfix, f"val_{metric}": f"{100 * val[metric]:.1f}"})
                loop["elapsed"] = time.perf_counter() - started
                best = loop["best"]
                seen = (f"validation {metric} {_fmt(val, metric)} (best {_fmt(best['metrics'], metric)} at step "
                        f"{best['step']})" if encoded["validation"] else "no validation split")
                with tqdm.external_write_mode():  # a line per validation, above the bar, readable in a log file
                    log(f"step {step}/{tc.steps}: training loss {postfix['loss']} (running mean), {seen}; "
                        f"{loop['elapsed'] / 60:.1f} min")
                save_state()
            if out_of_time:
                loop["stopped"] = "time_limit"
                log(f"time limit of {tc.time_limit:g} min reached at step {step} of {tc.steps}: testing {tested}")
                break
            if stop.requested:
                interrupted = True
                break
    bar.close()
    loop["elapsed"] = time.perf_counter() - started
    if interrupted:
        save_state()
        logger.close()
        log(f"interrupted at step {loop['step']}: state saved. Continue with: zotune train --resume {run_dir}")
        return RunResult(run_dir, {"interrupted_at": loop["step"]}, interrupted=True)

    opt.flush()
    best = loop["best"]
    if best is None and loop.get("stopped") == "diverged":
        log("no validation before the divergence: the test below is of the diverged weights")
    if best is not None and best["step"] != loop["step"] and tc.save_best:
        checkpoint.copy_into(run_dir / "best" / "model.safetensors", dict(trainable))  # no second copy of the model
    if best is not None and best["step"] == 0 and tc.save_best and "test" in loop["zero_shot"]:
        test = loop["zero_shot"]["test"]  # the starting weights, restored bit for bit: their test is the zero-shot one
    else:
        test = eval_split("test") if encoded["test"] else {}
    logger.write({"step": loop["step"], **{f"test_{k}": v for k, v in test.items()}})
    logger.close()
    summary = {
        "task": config.task.name, "model": prepared.loaded.source, "metric": metric,
        "zero_shot": loop["zero_shot"], "best_validation": best, "test": test, "steps": loop["step"],
        "skipped_steps": loop["skipped"], "stopped": loop.get("stopped", "steps"), "device": str(device),
        "beat_start": _beat_start(best, loop["zero_shot"], metric),
        "wall_time_s": round(loop["elapsed"], 1),
        "peak_memory_mb": round(_peak_memory_mb(device), 1), "trainable_parameters": sum(p.numel() for _, p in trainable),
        "trajectory_bytes": (run_dir / "trajectory.zot").stat().st_size,
    }
    if loop.get("lr_changes"):  # a resume changed optimizer.lr: config.yaml holds only the last rate
        summary["lr_changes"] = loop["lr_changes"]
    if loop.get("stopped") == "diverged":  # what the guard saw, and the rate it named (state.json may not exist)
        lr = opt.param_groups[0]["initial_lr"]
        summary["divergence"] = {"running_loss": ema, "starting_loss": loop["loss_reference"], "lr": lr,
                                 "try_lr": float(_smaller_lr(lr))}
    checkpoint.write_json(run_dir / "summary.json", summary)
    try:
        from zotune.plot import plot_run

        plot_run(run_dir / "metrics.jsonl", run_dir / "curves.png", metric)
    except ImportError:
        log("matplotlib is not installed: no curves.png")
    log(format_summary(summary))
    if summary["stopped"] == "steps":  # nothing left to resume: the snapshot's disk space is given back
        _drop_snapshot(run_dir)
    return RunResult(run_dir, summary)


def _beat_start(best: dict | None, zero_shot: dict, metric: str) -> bool | None:
    """Whether a trained step's validation beat the starting weights' (None: the start was not validated)."""
    start = (zero_shot or {}).get("validation")
    if not start or best is None:
        return None
    return best["step"] != 0 and best["metric"] > start[metric]


def format_summary(summary: dict) -> str:
    """A small table: zero-shot -> best validation -> test."""
    metric = summary["metric"]
    zs = summary.get("zero_shot") or {}
    best = summary.get("best_validation") or {}
    rows = [
        ("", "zero-shot", "fine-tuned"),
        (f"validation {metric}", _fmt(zs.get("validation"), metric), _fmt(best.get("metrics"), metric)),
        (f"test {metric}", _fmt(zs.get("test"), metric), _fmt(summary.get("test"), metric)),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    lines.append(f"best validation at step {best.get('step', '-')} of {summary['steps']}; "
                 f"{summary['wall_time_s']:.0f} s; peak memory {summary['peak_memory_mb']:.0f} MB; "
                 f"trajectory {summary['trajectory_bytes'] / 1024:.1f} kB")
    if summary.get("beat_start") is False:
        kept = ("the test above is of the starting weights" if best.get("step") == 0
                else "the test above is of trained weights (keep_start is off)")
        lines.append(f"no step beat the starting weights on validation {metric}: training did not improve "
                     f"the model; {kept} (a smaller optimizer.lr, or more steps, may help)")
    return "\n".join(lines)

