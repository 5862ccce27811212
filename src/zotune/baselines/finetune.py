"""Fine-tuning with backpropagation and Adam: the "FT" row of MeZO's comparisons.

Malladi et al. 2023 (arXiv 2305.17333), §3 and Appendix D/E: the same prompt-based objective that MeZO
minimises (:meth:`zotune.objectives.Objective.loss`), trained with Adam on true gradients, validated
during training, the best validation weights tested. Whatever parameters have ``requires_grad`` train,
so one loop covers full fine-tuning, LoRA and prefix tuning with Adam (``model.tuning``, set up by
:func:`zotune.tuning.tune_loaded` in :func:`zotune.train.prepare`).

The memory cost is the point of the comparison: backprop keeps activations and Adam two moments per
trained weight, where MeZO keeps neither.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from zotune.config import ConfigError
from zotune.objectives import evaluate_split
from zotune.optim.groups import decay_groups
from zotune.tasks import TaskError

__all__ = ["FinetuneConfig", "finetune"]

_ORDER_KEY = 0xF7  # keys the batch order apart from other users of the same seed


@dataclass
class FinetuneConfig:
    """Backprop fine-tuning with AdamW (see :mod:`zotune.baselines.finetune`)."""

    lr: float = 1e-5  # Adam's learning rate (the paper's FT of OPT: 1e-5, grid 1e-5 / 5e-5 / 8e-5), constant
    epochs: float = 1.0  # passes over the training split (fractions allowed); ignored when steps is set
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # examples per step (the paper's FT: 8)
    forward_chunks: int = 0  # run each batch in this many length-sorted slices (one graph, one backward);
    # 0: choose, as train.forward_chunks (less padding on a CPU, one forward on a GPU)
    weight_decay: float = 0.0  # AdamW's decoupled decay, on tensors of rank >= 2 only (not biases, norms' gains)
    eval_every: int | None = None  # validate every this many steps (and at the end); None: once per epoch
    seed: int = 0  # the batch order
    max_grad_norm: float | None = 1.0  # clip the gradients' global norm to this; None: no clipping
    progress: bool = True  # a progress bar on the terminal

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"finetune.lr must be a finite number > 0, got {self.lr} (the paper uses 1e-5 to 8e-5)")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"finetune.epochs must be a finite number > 0, got {self.epochs}; or set finetune.steps")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"finetune.steps must be >= 1 (or None to use epochs), got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"finetune.batch_size must be >= 1, got {self.batch_size}")
        if self.forward_chunks < 0:
            raise ConfigError(f"finetune.forward_chunks must be >= 0 (0: chosen per batch), got {self.forward_chunks}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"finetune.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"finetune.eval_every must be >= 1 (or None: once per epoch), got {self.eval_every}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(
                f"finetune.max_grad_norm must be a finite number > 0 (or None: no clipping), got {self.max_grad_norm}"
            )


def _batch(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of ``step`` (0-based): epoch e is the permutation keyed by (seed, e) in slices of
    ``batch_size``, its last slice possibly shorter, as a data loader with shuffling would give."""
    per_epoch = -(-n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, _ORDER_KEY, epoch]).permutation(n)
    return perm[i * batch_size : (i + 1) * batch_size].tolist()


def _plan(model, train: list, config: FinetuneConfig) -> tuple[list, int, int]:
    """The trainable ``(name, tensor)`` pairs, the number of steps, and the steps between validations
    (default: an epoch's); no training data or nothing to train is a one-line error."""
    if not train:
        raise TaskError("the training split is empty: fine-tuning needs training examples")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("no parameter requires a gradient: choose them with model.tuning / model.trainable")
    per_epoch = -(-len(train) // config.batch_size)
    total = config.steps if config.steps is not None else max(1, math.ceil(config.epochs * per_epoch))
    return trainable, total, config.eval_every or per_epoch


def _adam_step(model, objective, opt, params: list, batch: list, config: FinetuneConfig, step: int) -> float:
    """One AdamW step on ``batch``; returns its loss. A NaN or infinite loss or gradient raises
    ``FloatingPointError`` before it reaches the weights."""
    model.train()  # dropout on while training (evaluate() switches it off and back)
    opt.zero_grad(set_to_none=True)
    loss = objective.loss(model, batch, config.forward_chunks)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"fine-tuning loss is {value} at step {step}: lower finetune.lr (now "
            f"{config.lr:g}); the weights are those after step {step - 1}"
        )
    loss.backward()
    # With max_grad_norm=None the norm is still computed (an infinite bound clips nothing), to catch NaNs.
    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
    if not math.isfinite(float(norm)):
        raise FloatingPointError(
            f"fine-tuning gradient norm is {float(norm)} at step {step}: lower "
            f"finetune.lr (now {config.lr:g}); the weights are those after step {step - 1}"
        )
    opt.step()
    return value


def _best_of(best: dict | None, step: int, val: dict, metric: str, trainable) -> dict:
    """The best validation so far, ``{"step", "metrics", "weights"}``: this step's if it beats ``best``
    (a tie keeps the earlier), with a copy of the trainable tensors."""
    if best is None or val[metric] > best["metrics"][metric]:
        return {"step": step, "metrics": val, "weights": [p.detach().clone() for _, p in trainable]}
    return best


def _restore_best(best: dict | None, trainable, total: int, log: Callable[[str], None]) -> None:
    """Put the best validation weights back before the test (the last step's are already there)."""
    if best is None:
        log("no validation split: testing the final weights")
    elif best["step"] != total:
        with torch.no_grad():
            for (_, p), saved in zip(trainable, best["weights"]):
                p.copy_(saved)
        log(f"restored the best validation weights (step {best['step']} of {total})")


def finetune(
    prepared, config: FinetuneConfig | None = None, *, eval_batch_size: int = 32, log: Callable[[str], None] = print
) -> dict:
    """Fine-tune ``prepared``'s trainable parameters with AdamW; test the best validation weights.

    Batches are drawn without replacement within each epoch; validation runs every
    ``config.eval_every`` steps (default: each epoch) and at the end, and a copy of the trainable
    tensors at the best validation metric is restored before the test. Without a validation split the
    final weights are tested. A NaN or infinite loss or gradient stops the run with
    ``FloatingPointError`` before it reaches the weights.

    Args:
        prepared: a :class:`zotune.train.Prepared` (model with its trainable set, objective, encoded splits).
        config: the hyper-parameters (default :class:`FinetuneConfig`).
        eval_batch_size: examples per forward when evaluating.
        log: where progress lines go.

    Returns:
        ``{"validation": best validation metrics, "best_step": int, "test": test metrics, "steps": int,
        "wall_time_s": float, "trainable_parameters": int, "losses": the training loss of each step}``.

    Example::

        from zotune.config import RunConfig
        from zotune.train import prepare
        config = RunConfig(); config.task.name = "sst2"; config.model.tuning = "lora"
        result = finetune(prepare(config), FinetuneConfig(lr=1e-4, epochs=5))
        result["test"]["accuracy"]

    Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes", the FT baseline.
    """
    config = config or FinetuneConfig()
    if eval_batch_size < 1:
        raise ConfigError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
    model, objective, encoded = prepared.loaded.model, prepared.objective, prepared.encoded
    train, validation = encoded["train"], encoded["validation"]
    trainable, total, every = _plan(model, train, config)
    metric = objective.metric_name
    opt = torch.optim.AdamW(decay_groups([p for _, p in trainable], config.weight_decay), lr=config.lr)
    n_params = sum(p.numel() for _, p in trainable)
    log(
        f"fine-tuning {n_params:,} parameters with AdamW (lr {config.lr:g}, batch {config.batch_size}): "
        f"{total} steps, {len(train)} training examples, validation every {every} steps"
    )
    from tqdm.auto import tqdm

    was_training = model.training
    best: dict | None = None  # {"step", "metrics", "weights"}
    losses: list[float] = []
    ema = None
    started = time.perf_counter()
    bar = tqdm(total=total, desc="FT", unit="step", disable=not config.progress, dynamic_ncols=True)
    try:
        for step in range(1, total + 1):
            batch = [train[i] for i in _batch(len(train), config.batch_size, step - 1, config.seed)]
            value = _adam_step(model, objective, opt, [p for _, p in trainable], batch, config, step)
            losses.append(value)
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            postfix = {"loss": f"{ema:.4f}"}
            if best is not None:
                postfix[f"best_val_{metric}"] = f"{100 * best['metrics'][metric]:.1f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if validation and (step % every == 0 or step == total):
                best = _validate(prepared, trainable, best, step, eval_batch_size, config.progress, log)
                bar.set_postfix({**postfix, f"best_val_{metric}": f"{100 * best['metrics'][metric]:.1f}"})
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)  # the gradients are as large as the trained weights: free them
        model.train(was_training)
    _restore_best(best, trainable, total, log)
    return _finish(prepared, best, total, n_params, losses, started, eval_batch_size, config.progress, log)


def _finish(prepared, best, total, n_params, losses, started, eval_batch_size, progress, log) -> dict:
    """The test of the restored weights, and :func:`finetune`'s result."""
    metric, test_split = prepared.objective.metric_name, prepared.encoded["test"]
    test = (
        evaluate_split(prepared.objective, prepared.loaded.model, test_split, eval_batch_size, "test", progress)
        if test_split
        else {}
    )
    elapsed = time.perf_counter() - started
    if test:
        log(f"fine-tuned: test {metric} {100 * test[metric]:.1f}; {total} steps, {elapsed:.0f} s")
    best = best or {"metrics": {}, "step": total}
    return {
        "validation": best["metrics"],
        "best_step": best["step"],
        "test": test,
        "steps": total,
        "wall_time_s": round(elapsed, 2),
        "trainable_parameters": n_params,
        "losses": losses,
    }


def _validate(prepared, trainable, best, step, eval_batch_size, progress, log) -> dict:
    """Evaluate the validation split at ``step`` and keep the best weights so far (``_best_of``)."""
    objective, metric = prepared.objective, prepared.objective.metric_name
    val = evaluate_split(
        objective, prepared.loaded.model, prepared.encoded["validation"], eval_batch_size, "validation", progress
    )
    best = _best_of(best, step, val, metric, trainable)
    if not progress:  # with a bar the postfix shows it; lines would break the bar
        log(
            f"step {step}: validation {metric} {100 * val[metric]:.1f} "
            f"(best {100 * best['metrics'][metric]:.1f} at step {best['step']})"
        )
    return best
