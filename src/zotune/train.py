"""The training run behind ``zotune train``: MeZO on a task, with evaluation, checkpoints and logs.

A run directory holds everything::

    config.yaml        the full configuration (train.init as resolved: probe or none)
    init.safetensors   the start a linear probe wrote (train.init probe): resume, eval and replay write it back
    metrics.jsonl      one line per step (loss, projected gradient, lr) and per evaluation
    tensorboard/       the same scalars for TensorBoard (when it is installed)
    trajectory.zot     the run as seed + projected gradients (zotune.replay rebuilds the weights)
    state.json         what --resume needs: optimizer, schedule and loop state (no weights)
    resume/            the trainable weights at state.json's step (train.snapshot), while the run can go on
    best/              the best validation weights (trainable tensors, safetensors) and best.json
    curves.png         training loss and validation metric against steps
    summary.json       the start (zero-shot or the probe) -> best validation -> test, steps, wall time, peak memory

:func:`run` checks the config (or a resume's changes), prepares the model and the task, and hands
them to a :class:`Trainer`, whose typed :class:`RunState` is what state.json keeps of the loop.
Resuming loads the weights saved with the state (``resume/``) or, without them, rebuilds them from
the base model and the trajectory: bit for bit either way (replay costs about one sweep per step
and term, which adds up over thousands of steps on a CPU). Ctrl-C (or SIGTERM) stops at the end of
the current step and saves the state.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from zotune import checkpoint, start
from zotune.config import ConfigError, RunConfig, load_config
from zotune.models import LoadedModel, load_model
from zotune.objectives import Encoded, Objective, evaluate_split, make_objective, metric_objective
from zotune.optim import GRZO, make_optimizer
from zotune.optim.batched import BatchedClosure
from zotune.optim.replay import replay
from zotune.runtime import StopFlag as _StopFlag  # Ctrl-C or SIGTERM: finish the step, save, stop
from zotune.runtime import peak_memory_mb as _peak_memory_mb
from zotune.tasks import TaskError, get_task
from zotune.trajectory import read_trajectory
from zotune.tuning import tune_loaded

__all__ = ["Prepared", "RunResult", "RunState", "Trainer", "prepare", "run", "schedule_factor"]

SPLITS = ("train", "validation", "test")


@dataclass
class Prepared:
    """A model with its task, ready to train or evaluate."""

    loaded: LoadedModel
    objective: Objective
    encoded: dict[str, list[Encoded]]
    note: str = ""
    init: dict = field(default_factory=dict)  # what train.init cost before the first step (init_forward_passes, ...)


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
    splits = task.splits(
        t.data_dir, seed=t.seed, train=t.train, validation=t.validation, test=t.test, protocol=t.protocol, k=t.k
    )
    loaded = tune_loaded(loaded or load_model(config.model, log=log), config.model, log=log)
    instances = {s: [task.render(r, loaded.kind) for r in getattr(splits, s)] for s in SPLITS}
    first = next((i for s in SPLITS for i in instances[s]), None)
    if first is None:
        raise TaskError(f"task {config.task.name!r} produced no examples")
    objective = make_objective(
        task,
        loaded.tokenizer,
        loaded.kind,
        label_words=first.options,
        scoring=t.scoring,
        max_length=t.max_length,
        max_new_tokens=t.max_new_tokens,
    )
    encoded = {s: [objective.encode(i) for i in instances[s]] for s in SPLITS}
    return Prepared(loaded, objective, encoded, splits.note)


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


RUN_STATE_VERSION = 2  # 1: zotune 0.1.0, whose state.json "loop" had no version (its keys are a subset of 2's)


@dataclass
class RunState:
    """The loop's progress: what state.json holds as "loop", beside the optimizer's and the schedule's state."""

    step: int = 0  # steps taken
    best: dict | None = None  # the best validation so far: {"step", "metric", "metrics"} (step 0: the start)
    zero_shot: dict = field(default_factory=dict)  # split -> metrics of the starting weights
    elapsed: float = 0.0  # seconds of training, resumes included
    skipped: int = 0  # steps skipped for a non-finite loss
    device: str | None = None  # where the run last trained
    loss_ema: float | None = None  # running mean of the training loss
    last_val: float | None = None  # the last validation's metric
    stopped: str | None = None  # "time_limit" or "diverged"; None: still going, or it did all its steps
    lr_changes: list = field(default_factory=list)  # {"step", "from", "to"} of each resume that changed optimizer.lr
    start_losses: list | None = None  # the first steps' losses (None: a version-1 run, referenced at step 20)
    loss_reference: float | None = None  # the starting loss the divergence guard compares with
    version: int = RUN_STATE_VERSION

    @classmethod
    def from_dict(cls, raw, where: Path) -> RunState:
        """Read a saved "loop" of this version or an earlier one (a newer one is refused)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not set(raw) <= names or not isinstance(raw.get("step"), int):
            raise checkpoint.CheckpointError(f'{where}: not a zotune run state (its "loop" is not one)')
        if raw.get("version", 1) > RUN_STATE_VERSION:
            raise checkpoint.CheckpointError(
                f"{where}: written by a newer zotune (run state version {raw['version']}); upgrade zotune to resume it"
            )
        return cls(**{**raw, "version": RUN_STATE_VERSION})

    def to_dict(self) -> dict:
        return asdict(self)


DIVERGENCE_START = 5  # the first steps, whose median loss is the starting loss the divergence guard compares with


def _diverged(state: RunState, loss: float, tc) -> bool:
    """Whether the running mean of the training loss has passed ``tc.divergence`` times the starting loss.

    The starting loss is the median of the first ``DIVERGENCE_START`` steps' (finite) losses, taken at
    weights that have barely moved: a median, so that one lucky or one already exploding batch does not
    set it. The guard watches from then on, so a rate too high for the model stops the run within a
    few steps rather than after the loss has grown for tens of them. The reference is kept in the run
    state (a resumed run compares with the same number; a version-1 run keeps its own, the running mean
    at step 20, or collects the losses from where it resumes). Only a loss is guarded: a metric
    objective is negative.
    """
    if tc.objective != "loss" or tc.divergence <= 0 or state.loss_ema is None:
        return False
    if state.loss_reference is None:
        state.start_losses = state.start_losses or []
        if math.isfinite(loss):
            state.start_losses.append(loss)
        if len(state.start_losses) < DIVERGENCE_START:
            return False
        reference = statistics.median(state.start_losses)
        if reference <= 0:  # a loss that starts at 0 (or below) has no scale to compare with
            return False
        state.loss_reference = reference
    return state.loss_ema > tc.divergence * state.loss_reference


def _divergence_message(state: RunState, tc, lr: float, tested: str) -> str:
    where = (
        f"the starting loss ({state.loss_reference:.4g}, the median of steps 1-{DIVERGENCE_START})"
        if state.start_losses is not None
        else f"its value at step 20 ({state.loss_reference:.4g})"
    )
    return (
        f"the training loss diverged: its running mean {state.loss_ema:.4g} at step {state.step} is over "
        f"{tc.divergence:g}x {where}; stopping and testing {tested}. optimizer.lr {lr:g} is too high for "
        f"this model and task: try --optimizer.lr {_smaller_lr(lr)}"
    )


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
    """Drop metric rows logged after ``step`` (they belong to steps a resume will redo).

    Lines that are not JSON objects go too: a run killed in the middle of a write leaves a torn last
    line, and a crash of the machine can leave a block of NUL bytes where the file's end was; the
    resume writes those steps' rows again, so the file it continues is whole.
    """
    import json

    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step and not any(k.startswith("test_") for k in row):
            kept.append(line)  # (a finished run's test row goes too)
    checkpoint.write_text(path, "".join(r + "\n" for r in kept))


def _default_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fmt(metrics: dict | None, name: str) -> str:
    if not metrics or name not in metrics or not math.isfinite(metrics[name]):
        return "-"
    return f"{100 * metrics[name]:.1f}"


# what a resume may change (train.steps: more steps, and optimizer.lr: the rate of the steps still to
# come, both under a constant schedule; the trajectory records every step's lr, so replay stays exact)
RESUME_OVERRIDES = (
    "train.steps",
    "train.time_limit",
    "train.divergence",
    "train.progress",
    "train.snapshot",
    "optimizer.lr",
)


def _check_constant(config: RunConfig, what: str) -> None:
    if config.optimizer.schedule != "constant":
        raise ConfigError(
            f"optimizer.schedule {config.optimizer.schedule} spreads its learning rates over "
            f"train.steps ({config.train.steps}): a resume cannot change {what} (start a new run)"
        )


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


class Trainer:
    """One run's loop over a typed :class:`RunState`: ``resume``, ``validate``, ``step``, ``checkpoint``, ``finish``.

    :func:`run` makes one from a config (a new run) or from a run directory's saved state (a resume)
    and calls :meth:`train`, which validates the start, steps until the run's steps, its time limit,
    a diverging loss or a stop signal, and finishes: the best weights tested and the summary written.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        prepared: Prepared,
        log: Callable[[str], None],
        train_loss: Callable | None = None,
    ):
        self.config, self.run_dir, self.prepared, self.log = config, run_dir, prepared, log
        tc, oc = config.train, config.optimizer
        self.tc = tc
        self.train_loss = train_loss or training_loss(prepared, tc)
        self.model, self.objective, self.encoded = prepared.loaded.model, prepared.objective, prepared.encoded
        self.device = next(self.model.parameters()).device
        self.metric = self.objective.metric_name
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.opt = make_optimizer(
            self.trainable, oc, trajectory=run_dir / "trajectory.zot", on_nonfinite="skip", model=self.model
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: schedule_factor(s, tc.steps, oc.schedule, oc.warmup_steps)
        )
        self.state = RunState(device=str(self.device), start_losses=[])
        self.tested = "the best weights" if tc.save_best else "the last weights (save_best is off)"
        self.logger: _Logger | None = None
        self.started = 0.0  # perf_counter() at the run's start, resumes' time included

    # -- resume --------------------------------------------------------------------------------------

    def resume(self, saved: dict, state: RunState) -> None:
        """Continue from a saved state (state.json, its "loop" read as ``state``): the trajectory cut to
        it, the weights loaded or replayed, the optimizer and schedule restored, a new learning rate
        applied, later metric rows dropped."""
        self.state = state
        if state.device is not None and torch.device(state.device).type != self.device.type:
            self.log(
                f"warning: this run trained on {state.device} and resumes on {self.device}: the steps from here "
                f"(and weights rebuilt from the trajectory) may differ from an uninterrupted run in the last bits"
            )
        state.device = str(self.device)
        recorded, here = saved["optimizer"]["mezo"].get("params"), self.opt.param_names
        if recorded is not None and recorded != here:
            # the same config selecting other tensors: a zotune that chose them otherwise wrote the run (before
            # 2026-12-07 a probe's untie left a tied matrix's flag on both names; model.trainable now picks each)
            changed = sorted(set(recorded) ^ set(here))
            if not changed:
                which = "the same tensors in another order"
            elif changed[0] in here:
                which = f"{changed[0]}: trained here, not by the run"
            else:
                which = f"{changed[0]}: trained by the run, not here"
            raise ConfigError(
                f"the run trained {len(recorded)} tensors and its config selects {len(here)} here ({which}): a "
                "version that selected them otherwise wrote it, so it cannot continue; `zotune replay` and "
                "`zotune eval --run` still rebuild and test it"
            )
        size = saved["optimizer"]["mezo"]["trajectory_bytes"] or 0
        path = self.run_dir / "trajectory.zot"
        with open(path, "r+b") as f:
            f.truncate(size)
        moments = checkpoint.load_snapshot(self.run_dir, state.step, size, self.trainable)
        if moments is not None:
            self.log(f"resuming at step {state.step}: the weights saved with its state loaded")
        else:
            self.log(f"resuming at step {state.step}: rebuilding the weights from the trajectory")
            replay(self.model, read_trajectory(path), finish=False)
        rounding = saved["optimizer"]["mezo"].get("stochastic_rounding")
        if self.config.optimizer.stochastic_rounding is None and rounding is not None:
            # the run keeps the rounding it started with: runs saved before optimizer.stochastic_rounding existed
            # rounded bf16/fp16 updates to nearest, and their trajectories say so
            self.opt.stochastic_rounding = bool(rounding)
        self.opt.load_state_dict(saved["optimizer"], moments=moments)  # None or {}: rebuilt from the trajectory
        self.sched.load_state_dict(saved["scheduler"])
        lr, before = self.config.optimizer.lr, self.sched.base_lrs[0] if self.sched.base_lrs else None
        if before is not None and before != lr:  # --resume ... --optimizer.lr X: the state holds the old rate
            self.log(f"optimizer.lr {before:g} -> {lr:g} from step {state.step}")
            state.lr_changes.append({"step": state.step, "from": before, "to": lr})
            _set_lr(self.opt, self.sched, lr)
        _truncate_metrics(self.run_dir / "metrics.jsonl", state.step)

    # -- evaluation and the best weights ---------------------------------------------------------------

    def evaluate(self, split: str) -> dict:
        with self.opt.unperturbed():  # the clean weights, whatever perturbation a fused step left in them
            return evaluate_split(
                self.objective, self.model, self.encoded[split], self.tc.eval_batch_size, split, show=self.tc.progress
            )

    def keep_best(self, step: int, val: dict) -> None:
        self.state.best = {"step": step, "metric": val[self.metric], "metrics": val}
        if self.tc.save_best:
            with self.opt.unperturbed():
                checkpoint.save_tensors(
                    self.run_dir / "best" / "model.safetensors", {n: p for n, p in self.trainable}, {"step": str(step)}
                )
            checkpoint.write_json(self.run_dir / "best" / "best.json", self.state.best)

    def validate_start(self) -> None:
        """The starting weights, validated (zero_shot: and tested); with keep_start they are the best
        checkpoint until a step beats them, so a run that only makes the model worse tests its start."""
        tc, state, metric = self.tc, self.state, self.metric
        splits = ("validation", "test") if tc.zero_shot else ("validation",) if tc.keep_start else ()
        if not any(self.encoded[s] for s in splits):
            return
        name = _start_name(self.prepared.init)
        self.log(f"{name} evaluation ..." if tc.zero_shot else "validating the starting weights ...")
        state.zero_shot = {s: self.evaluate(s) for s in splits if self.encoded[s]}
        self.log(
            f"{name}: validation {_fmt(state.zero_shot.get('validation'), metric)}, "
            f"test {_fmt(state.zero_shot.get('test'), metric)}"
        )
        self.logger.write(
            {
                "step": 0,
                **self.prepared.init,
                **{f"zero_shot_{s}_{k}": v for s, m in state.zero_shot.items() for k, v in m.items()},
            }
        )
        if tc.keep_start and "validation" in state.zero_shot:
            self.keep_best(0, state.zero_shot["validation"])
            state.last_val = state.best["metric"]

    def validate(self, loss: float) -> None:
        """Validate the weights at this step, keep them if they are the best, log a line, save the state."""
        state, metric = self.state, self.metric
        val = self.evaluate("validation") if self.encoded["validation"] else {metric: -loss}
        state.last_val = val[metric]
        self.logger.write({"step": state.step, **{f"validation_{k}": v for k, v in val.items()}})
        if state.best is None or val[metric] > state.best["metric"]:  # a tie keeps the earlier
            self.keep_best(state.step, val)
        state.elapsed = time.perf_counter() - self.started
        best = state.best
        seen = (
            f"validation {metric} {_fmt(val, metric)} (best {_fmt(best['metrics'], metric)} at step {best['step']})"
            if self.encoded["validation"]
            else "no validation split"
        )
        from tqdm.auto import tqdm

        with tqdm.external_write_mode():  # a line per validation, above the bar, readable in a log file
            ema = f"{state.loss_ema:.4f}" if state.loss_ema is not None else "-"
            self.log(
                f"step {state.step}/{self.tc.steps}: training loss {ema} (running mean), {seen}; "
                f"{state.elapsed / 60:.1f} min"
            )
        self.checkpoint()

    # -- a step --------------------------------------------------------------------------------------

    def step(self) -> float:
        """One MeZO step on the next batch; returns its loss (the mean of the two evaluations)."""
        state = self.state
        train = self.encoded["train"]
        idx = _batch_indices(len(train), self.tc.batch_size, state.step, self.config.task.seed)
        batch = [train[i] for i in idx]
        if isinstance(self.opt, GRZO):  # per-example losses; by width, so train.forward_chunks' slices pad less
            chunks = self.tc.forward_chunks
            rows = sorted(batch, key=lambda e: e.width) if chunks != 1 else batch
            loss = float(
                self.opt.step(lambda: self.objective.losses(self.model, rows, chunks), self.objective.rows(rows))
            )
        else:
            closure = lambda: self.train_loss(self.model, batch)  # noqa: E731
            if getattr(self.opt, "batched", False):
                closure = BatchedClosure(self.model, closure)
            loss = float(self.opt.step(closure))
        state.skipped += int(self.opt.last_step_skipped)  # a NaN/inf loss (or estimate): the step was skipped
        self.sched.step()
        state.step += 1
        if math.isfinite(loss):
            state.loss_ema = loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * loss
        self.logger.write(
            {
                "step": state.step,
                "loss": loss,
                "loss_minus": self.opt.last_losses[1] if self.opt.last_losses else None,
                "projected_grad": self.opt.projected_grad,
                "lr": self.opt.param_groups[0]["lr"],
                "forward_passes": self.opt.forward_passes,  # training closure calls so far
                "elapsed": time.perf_counter() - self.started,
            }
        )
        return loss

    # -- saving --------------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """state.json, and (train.snapshot) the weights as they are, so that --resume continues from here."""
        optimizer_state = self.opt.state_dict(flush=False)
        if self.tc.snapshot:  # first: a crash between the two files leaves a snapshot whose step is not the state's
            checkpoint.save_snapshot(
                self.run_dir,
                self.state.step,
                optimizer_state["mezo"]["trajectory_bytes"],
                self.trainable,
                self.opt.moment_tensors(),
                self.log,
            )
        else:  # turned off on resume: no stale weights left taking disk space
            checkpoint.drop_snapshot(self.run_dir)
        checkpoint.write_json(
            self.run_dir / "state.json",
            {"optimizer": optimizer_state, "scheduler": self.sched.state_dict(), "loop": self.state.to_dict()},
        )

    # -- the loop ------------------------------------------------------------------------------------

    def train(self, resumed: bool) -> RunResult:
        from tqdm.auto import tqdm

        tc, state = self.tc, self.state
        self.logger = _Logger(self.run_dir, resume=resumed)
        if not resumed:
            self.validate_start()
        bar = tqdm(
            total=tc.steps, initial=state.step, disable=not tc.progress, desc="MeZO", unit="step", dynamic_ncols=True
        )
        self.started = time.perf_counter() - state.elapsed
        interrupted = False
        with _StopFlag() as stop:
            while state.step < tc.steps:
                loss = self.step()
                diverged = _diverged(state, loss, tc)
                postfix = {"loss": f"{state.loss_ema:.4f}" if state.loss_ema is not None else "-"}
                if state.best is not None:
                    postfix[f"val_{self.metric}"] = f"{100 * state.last_val:.1f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                out_of_time = (
                    tc.time_limit > 0
                    and state.step < tc.steps
                    and time.perf_counter() - self.started >= 60 * tc.time_limit
                )
                if diverged:  # these weights are not a candidate for the best: stop before validating them
                    state.stopped = "diverged"
                    self.log(_divergence_message(state, tc, self.opt.param_groups[0]["initial_lr"], self.tested))
                    break
                if state.step % tc.eval_every == 0 or state.step == tc.steps or out_of_time:
                    self.validate(loss)
                    bar.set_postfix({**postfix, f"val_{self.metric}": f"{100 * state.last_val:.1f}"})
                if out_of_time:
                    state.stopped = "time_limit"
                    self.log(
                        f"time limit of {tc.time_limit:g} min reached at step {state.step} of {tc.steps}: "
                        f"testing {self.tested}"
                    )
                    break
                if stop.requested:
                    interrupted = True
                    break
        bar.close()
        state.elapsed = time.perf_counter() - self.started
        if interrupted:
            self.checkpoint()
            self.logger.close()
            self.log(
                f"interrupted at step {state.step}: state saved. Continue with: zotune train --resume {self.run_dir}"
            )
            return RunResult(self.run_dir, {"interrupted_at": state.step}, interrupted=True)
        return self.finish()

    def finish(self) -> RunResult:
        """Test the best weights (the start's test when the start won), write summary.json and curves.png."""
        tc, state, metric = self.tc, self.state, self.metric
        self.opt.flush()
        best = state.best
        if best is None and state.stopped == "diverged":
            self.log("no validation before the divergence: the test below is of the diverged weights")
        if best is not None and best["step"] != state.step and tc.save_best:
            checkpoint.copy_into(self.run_dir / "best" / "model.safetensors", dict(self.trainable))  # no second copy
        if best is not None and best["step"] == 0 and tc.save_best and "test" in state.zero_shot:
            test = state.zero_shot[
                "test"
            ]  # the starting weights, restored bit for bit: their test is the zero-shot one
        else:
            test = self.evaluate("test") if self.encoded["test"] else {}
        self.logger.write({"step": state.step, **{f"test_{k}": v for k, v in test.items()}})
        self.logger.close()
        summary = self.summary(test)
        checkpoint.write_json(self.run_dir / "summary.json", summary)
        try:
            from zotune.plot import plot_run

            plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png", metric)
        except ImportError:
            self.log("matplotlib is not installed: no curves.png")
        self.log(format_summary(summary))
        if summary["stopped"] == "steps":  # nothing left to resume: the snapshot's disk space is given back
            checkpoint.drop_snapshot(self.run_dir)
        return RunResult(self.run_dir, summary)

    def summary(self, test: dict) -> dict:
        state, best = self.state, self.state.best
        summary = {
            "task": self.config.task.name,
            "model": self.prepared.loaded.source,
            "metric": self.metric,
            "zero_shot": state.zero_shot,
            "best_validation": best,
            "test": test,
            "steps": state.step,
            "skipped_steps": state.skipped,
            "stopped": state.stopped or "steps",
            "device": str(self.device),
            "beat_start": _beat_start(best, state.zero_shot, self.metric),
            "wall_time_s": round(state.elapsed, 1),
            "peak_memory_mb": round(_peak_memory_mb(self.device), 1),
            "trainable_parameters": sum(p.numel() for _, p in self.trainable),
            "trajectory_bytes": (self.run_dir / "trajectory.zot").stat().st_size,
            "forward_passes": self.opt.forward_passes,  # training loss evaluations (None: resumed from an older state)
        }
        if self.prepared.init:  # train.init's own cost (the probe's features of the training split), not in the above
            summary.update(self.prepared.init)
        if state.lr_changes:  # a resume changed optimizer.lr: config.yaml holds only the last rate
            summary["lr_changes"] = state.lr_changes
        if state.stopped == "diverged":  # what the guard saw, and the rate it named (state.json may not exist)
            lr = self.opt.param_groups[0]["initial_lr"]
            summary["divergence"] = {
                "running_loss": state.loss_ema,
                "starting_loss": state.loss_reference,
                "lr": lr,
                "try_lr": float(_smaller_lr(lr)),
            }
        return summary


def training_loss(prepared: Prepared, tc) -> Callable:
    """What MeZO minimises: ``loss(model, batch)``, the objective's loss, or (a non-differentiable
    objective) the batch's negative metric or reward."""
    if tc.objective == "loss":
        return lambda model, batch: prepared.objective.loss(model, batch, tc.forward_chunks)
    return metric_objective(prepared.objective, tc.objective)


def _read_state(run_dir: Path) -> tuple[dict, RunState]:
    """state.json, and its "loop" as a RunState; a file that is not a run's state is a one-line error."""
    path = run_dir / "state.json"
    saved = checkpoint.read_json(path)
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("optimizer"), dict)
        and isinstance(saved["optimizer"].get("mezo"), dict)
        and isinstance(saved.get("scheduler"), dict)
    ):
        raise checkpoint.CheckpointError(f"{path}: not a zotune run state (no optimizer or scheduler state)")
    return saved, RunState.from_dict(saved.get("loop"), path)


def _resumed_config(run_dir: Path, changes: Mapping[str, object] | None, done: int) -> RunConfig:
    """The run's own config, with what a resume may change (RESUME_OVERRIDES) changed and recorded."""
    config = load_config(run_dir / "config.yaml", saved=True)
    if not changes:
        return config
    changed = load_config(run_dir / "config.yaml", changes=changes, saved=True)
    before, after = config.to_dict(), changed.to_dict()
    bad = [
        f"{section}.{key}"
        for section in after
        for key in after[section]
        if after[section][key] != before[section][key] and f"{section}.{key}" not in RESUME_OVERRIDES
    ]
    if bad:
        raise ConfigError(
            f"--resume continues a run with its own config; it may change only "
            f"{', '.join(RESUME_OVERRIDES)}, not {', '.join(bad)}"
        )
    if changed.train.steps != config.train.steps:
        _check_more_steps(config, changed.train.steps, done)
    if changed.optimizer.lr != config.optimizer.lr:
        _check_constant(config, "optimizer.lr")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(changed.to_dict(), sort_keys=False))
    return changed


def run(
    config: RunConfig | None = None,
    *,
    resume: str | Path | None = None,
    log: Callable[[str], None] = print,
    loaded: LoadedModel | None = None,
    changes: Mapping[str, object] | None = None,
) -> RunResult:
    """Fine-tune with MeZO as ``config`` says (or continue the run in ``resume``).

    ``changes`` (``{"train.time_limit": 120}``, ``{"optimizer.lr": 1e-5, "train.steps": 4000}``) may
    change the keys of ``RESUME_OVERRIDES`` of a resumed run, e.g. to extend one that stopped at its
    time limit, or one that finished its steps with more of them; the run's config.yaml records it.
    """
    saved = state = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "state.json").is_file() or not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} is not a resumable run directory (no state.json / config.yaml)")
        saved, state = _read_state(run_dir)
        config = _resumed_config(run_dir, changes, state.step)
    else:
        config = config or RunConfig()
        run_dir = Path(config.train.output_dir) if config.train.output_dir else _default_dir(config)
        if (run_dir / "state.json").exists():
            raise ConfigError(
                f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another output_dir"
            )
    prepared = prepare(config, log=log, loaded=loaded)
    encoded = prepared.encoded
    if not encoded["train"]:
        raise TaskError("the training split is empty")
    train_loss = training_loss(prepared, config.train)  # a bad objective fails before anything is written
    init = start.resolve(config.train.init, prepared, log)
    if init != config.train.init:  # config.yaml records what auto meant here, for every later rebuild of the run
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, init=init))
    stored = run_dir / start.STORED
    prepared.init, rows = start.initialise(
        prepared, init, batch_size=config.train.batch_size, stored=stored if saved is not None else None, log=log
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if saved is None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    # what the start wrote, for resume, eval and replay to write back as it was: always for a new run (a file left by
    # an attempt that stopped before its first state is not this run's), on resume where the run had none stored
    if rows and (saved is None or not stored.is_file()):
        start.save_rows(stored, rows, prepared.objective.label_ids, prepared.init)
    log(
        f"model {prepared.loaded.source} ({prepared.loaded.kind}); task {config.task.name}: "
        + ", ".join(f"{len(encoded[s])} {s}" for s in SPLITS)
        + (f" ({prepared.note})" if prepared.note else "")
    )
    log(f"run directory {run_dir}")
    trainer = Trainer(config, run_dir, prepared, log, train_loss)
    if saved is not None:
        trainer.resume(saved, state)
    return trainer.train(resumed=saved is not None)


def _beat_start(best: dict | None, zero_shot: dict, metric: str) -> bool | None:
    """Whether a trained step's validation beat the starting weights' (None: the start was not validated)."""
    first = (zero_shot or {}).get("validation")
    if not first or best is None:
        return None
    return best["step"] != 0 and best["metric"] > first[metric]


def _start_name(init: dict) -> str:
    """What the starting weights are called in logs: zero-shot, or the train.init that wrote them."""
    return "zero-shot" if not init.get("init") else "linear probe" if init["init"] == "probe" else str(init["init"])


def format_summary(summary: dict) -> str:
    """A small table: the start (zero-shot, or the probe of train.init) -> best validation -> test."""
    metric = summary["metric"]
    zs = summary.get("zero_shot") or {}  # the starting weights' evaluation (the key predates train.init)
    best = summary.get("best_validation") or {}
    rows = [
        ("", _start_name(summary), "fine-tuned"),
        (f"validation {metric}", _fmt(zs.get("validation"), metric), _fmt(best.get("metrics"), metric)),
        (f"test {metric}", _fmt(zs.get("test"), metric), _fmt(summary.get("test"), metric)),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    lines.append(
        f"best validation at step {best.get('step', '-')} of {summary['steps']}; "
        f"{summary['wall_time_s']:.0f} s; peak memory {summary['peak_memory_mb']:.0f} MB; "
        f"trajectory {summary['trajectory_bytes'] / 1024:.1f} kB"
    )
    if summary.get("beat_start") is False:
        kept = (
            "the test above is of the starting weights"
            if best.get("step") == 0
            else "the test above is of trained weights (the start was not kept as a candidate: keep_start)"
        )
        lines.append(
            f"no step beat the starting weights on validation {metric}: training did not improve "
            f"the model; {kept} (a smaller optimizer.lr, or more steps, may help)"
        )
    return "\n".join(lines)
