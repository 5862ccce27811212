"""MeZO in the Hugging Face ``Trainer``: override the training step, keep the loop.

:class:`ZOTrainer` replaces two methods of ``transformers.Trainer``: ``create_optimizer`` (it
builds a :class:`TrainerMeZO`) and ``training_step`` (two forward passes instead of forward +
backward). The loop is the Trainer's own, so logging, evaluation, saving, resuming from a
checkpoint (the MeZO state rides in the Trainer's ``optimizer.pt``), learning-rate schedules,
callbacks and ``torchrun`` / ``accelerate launch`` keep working.

- Gradient accumulation: ``gradient_accumulation_steps=k`` gathers k micro-batches and evaluates
  all of them at theta + eps z and at theta - eps z under one z before the projected gradient is
  formed (:func:`zotune.optim.accumulate`): equal to one step on the k-times larger batch.
- Data parallel (``torchrun`` / ``accelerate launch``): the Trainer gives every rank its own shard
  of each batch; the two losses are averaged over the ranks with a scalar all-reduce
  (:func:`zotune.distributed.all_reduce_closure`) and every rank applies the same update.
  :func:`zotune.distributed.check_consistent` runs on the first step.
- Forward passes run in ``model.eval()`` (no dropout), so L+ and L- differ by the perturbation only.
- LoRA, prefix and head tuning: pass the model :func:`zotune.tuning.apply_tuning` (or PEFT) returns;
  MeZO perturbs the tensors that require gradients, so only the adapter trains.
- fp16 with a gradient scaler cannot work (there are no gradients to unscale); use bf16 or fp32.

Example::

    trainer = ZOTrainer(model=model, args=TrainingArguments("out", learning_rate=1e-6, max_steps=20_000),
                        train_dataset=train, eval_dataset=dev, mezo_kwargs={"eps": 1e-3})
    trainer.train()                                    # or train(resume_from_checkpoint=True)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from zotune import distributed
from zotune.optim import MeZO
from zotune.optim.accumulate import accumulate
from zotune.optim.factory import stochastic_rounding

__all__ = ["TrainerMeZO", "ZOTrainer"]


class TrainerMeZO(MeZO):
    """:class:`zotune.MeZO` for the Trainer: ``step()`` without a closure does nothing.

    The Trainer calls ``optimizer.step()`` after the training steps of each update; ZOTrainer has
    already taken the MeZO step (with a closure) in ``training_step`` by then.
    """

    def step(self, closure=None):  # type: ignore[override]
        if closure is None:
            return None
        return super().step(closure)


class ZOTrainer(Trainer):
    """``transformers.Trainer`` that trains with MeZO (forward passes only).

    Args (besides the Trainer's):
        mezo_kwargs: further arguments of :class:`TrainerMeZO` (``eps``, ``distribution``,
            ``fuse_next``, ``trajectory``, ...). ``lr``, ``weight_decay`` and ``seed`` come from
            ``TrainingArguments`` (``learning_rate``, ``weight_decay``, ``seed``) unless given here.
            ``stochastic_rounding`` is on when a trained weight is bfloat16 / float16 unless given here.
            Or pass ``optimizers=(TrainerMeZO(...), scheduler)``.
    """

    def __init__(self, *args, mezo_kwargs: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mezo_kwargs = dict(mezo_kwargs or {})
        self._micro_batches: list = []
        self._checked = False
        if self.optimizer is not None and not isinstance(self.optimizer, TrainerMeZO):
            raise TypeError(
                f"ZOTrainer needs a zotune.integrations.hf.TrainerMeZO optimizer, got "
                f"{type(self.optimizer).__name__} (or pass none and set mezo_kwargs)"
            )

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            options = dict(lr=self.args.learning_rate, weight_decay=self.args.weight_decay, seed=self.args.seed)
            options.update(self.mezo_kwargs)
            named = list(opt_model.named_parameters())
            # bf16 / fp16 weights round MeZO's sub-half-ulp updates away unless rounded stochastically: on for them
            # unless mezo_kwargs says otherwise, as `zotune train`'s optimizer.stochastic_rounding: null
            options["stochastic_rounding"] = stochastic_rounding(
                options.get("stochastic_rounding"), (p for _, p in named)
            )
            self.optimizer = TrainerMeZO(named, **options)
            if self.optimizer.fuse_next:  # evaluation and saving must see the clean weights
                self.optimizer.attach(opt_model)
        return self.optimizer

    @property
    def mezo(self) -> TrainerMeZO:
        """The MeZO optimizer (unwrapped from accelerate's wrapper)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Collect the micro-batch; on the last one of an update, take the MeZO step over all of them.

        Returns the micro-batch's share of the logged loss: 0 until the update, then the mean of
        L+ and L- over the update's micro-batches (summed by the Trainer, as it sums loss / k).
        """
        model.eval()
        self._micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        opt = self.mezo
        if not self._checked:
            distributed.check_consistent(opt)
            self._checked = True

        def loss_of(batch):
            def closure():
                with self.compute_loss_context_manager():
                    return self.compute_loss(model, batch).detach()

            return closure

        closure = distributed.all_reduce_closure(accumulate([loss_of(b) for b in batches]))
        with torch.no_grad():
            opt.step(closure)
        plus, minus = opt.last_losses
        return torch.tensor((plus + minus) / 2, dtype=torch.float32, device=self.args.device)
