"""ZOTrainer: MeZO inside the Hugging Face Trainer loop (tiny Llama, CPU, offline)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainingArguments  # noqa: E402

from zotune.demo import tiny_llama  # noqa: E402
from zotune.integrations.hf import TrainerMeZO, ZOTrainer  # noqa: E402


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 64, (n, 12), generator=gen)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _args(out, **overrides):
    options = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        seed=5,
        save_strategy="steps",
        save_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def _trainer(out, **overrides):
    return ZOTrainer(
        model=tiny_llama(seed=1),
        args=_args(out, **overrides),
        train_dataset=_Sequences(48, 2),
        eval_dataset=_Sequences(8, 3),
        mezo_kwargs={"eps": 1e-3},
    )


def _ulp32(x: float) -> float:
    """The spacing of float32 numbers at ``x`` (the losses and weights are float32)."""
    return math.ldexp(1.0, math.frexp(x)[1] - 24)


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = _trainer(out)
    before = _params(trainer)
    trainer.train()
    return out, trainer, before


def test_trains_logs_evaluates_and_saves(uninterrupted):
    out, trainer, before = uninterrupted
    assert isinstance(trainer.mezo, TrainerMeZO)
    assert trainer.mezo.step_count == 6 == trainer.state.global_step
    after = _params(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)
    assert [h["step"] for h in history if "eval_loss" in h] == [3, 6]
    lrs = [h["learning_rate"] for h in history if "learning_rate" in h]
    assert lrs[0] > lrs[-1]  # the Trainer's linear schedule drives MeZO's lr
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "trainer_state.json").exists()
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["mezo"]["step"] == 3
    json.dumps(state["mezo"])


def test_resume_from_checkpoint_continues_exactly(uninterrupted, tmp_path):
    out, trainer, _ = uninterrupted
    resumed = _trainer(out)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert resumed.mezo.step_count == 6
    want, got = _params(trainer), _params(resumed)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # 2 micro-batches of 4 under one z == 1 batch of 8 (same examples in the same order), up to the
    # order in which the loss is summed. One step, so that both runs take their losses at the same weights.
    small = _trainer(tmp_path / "a", max_steps=1, save_strategy="no", eval_strategy="no")
    before = _params(small)
    small.train()
    big = _trainer(
        tmp_path / "b",
        max_steps=1,
        save_strategy="no",
        eval_strategy="no",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
    )
    big.train()
    a, b = small.mezo, big.mezo
    # L+ and L- are each a mean of the same 8 sequences' token losses summed in another order (two
    # means of 4 vs one of 8): a few float32 roundings apart, which 8 ulps of L bounds with room for any
    # CPU's summation order. g = (L+ - L-) / 2eps then agrees within 2 * 8 ulp / 2eps; accumulating only
    # one micro-batch, or evaluating the two under different z, moves L by ~1e-2 and g by ~1.
    ulp = _ulp32(max(map(abs, a.last_losses + b.last_losses)))
    assert a.last_losses == pytest.approx(b.last_losses, rel=0, abs=8 * ulp)
    g_tol = 8 * ulp / a.eps
    assert abs(a.projected_grad - b.projected_grad) <= g_tol
    assert abs(b.projected_grad) > 100 * g_tol  # the comparison above is not vacuous
    # Same z, same lr: the weights differ by lr * (g_a - g_b) * z, with |z| < 6 for a Gaussian over these
    # few thousand elements (P(|z| > 6) ~ 2e-9 each), plus the rounding of theta +- update (2 ulp of 1.0,
    # above these weights' size).
    lr = big.args.learning_rate  # the step's rate: the linear schedule is at its start (it is 0 after the step)
    w_tol = lr * g_tol * 6 + 2 * _ulp32(1.0)
    want, got = _params(big), _params(small)
    assert any(not torch.equal(before[n], want[n]) for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=w_tol)


def test_fuse_next_leaves_clean_weights_for_evaluation_and_saving(tmp_path):
    plain = _trainer(tmp_path / "plain", max_steps=2, save_strategy="no", eval_strategy="no")
    plain.train()
    fused = ZOTrainer(
        model=tiny_llama(seed=1),
        args=_args(tmp_path / "fused", max_steps=2, save_strategy="no", eval_strategy="no"),
        train_dataset=_Sequences(48, 2),
        eval_dataset=_Sequences(8, 3),
        mezo_kwargs={"eps": 1e-3, "fuse_next": True},
    )
    fused.train()
    assert fused.mezo._pending == 2  # step 2's +eps is still in the weights
    # The fused sweep applies step 1's update and step 2's +eps z term by term, each rounded to float32,
    # as the plain run's two sweeps do: step 2 takes its losses at bit-identical weights.
    assert fused.mezo.last_losses == plain.mezo.last_losses
    metrics = fused.evaluate()  # the forward pre-hook flushes it first
    assert fused.mezo._pending is None
    # The fused weights then differ only by the flush's round trip theta -> theta + eps z -> theta - eps z:
    # two float32 roundings, half an ulp of |theta| + eps |z| and half an ulp of |theta|, so within one ulp
    # of max |theta| + 6 eps (|z| < 6, as above). Evaluating or saving before the flush is off by
    # eps |z| ~ 1e-3.
    want, got = _params(plain), _params(fused)
    eps = fused.mezo.eps
    w_tol = _ulp32(max(float(w.abs().max()) for w in want.values()) + 6 * eps)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=w_tol)
    # A weight difference of at most w_tol moves the exact eval loss by at most |grad L|_1 * w_tol (the
    # gradient taken by one backward on the eval batch); the two float32 forwards then round differently,
    # by 8 ulps of L as in the accumulation test. Evaluated before the flush it is off by eps |grad L . z|
    # (2.5e-4 here, 20 times the tolerance).
    want_loss = plain.evaluate()["eval_loss"]
    batch = _Sequences(8, 3).data  # the eval set, one batch of 8: eval_loss is the model's loss on it
    plain.model(input_ids=batch, labels=batch).loss.backward()
    grad_l1 = sum(float(p.grad.abs().sum()) for p in plain.model.parameters())
    assert metrics["eval_loss"] == pytest.approx(want_loss, rel=0, abs=grad_l1 * w_tol + 8 * _ulp32(want_loss))


def test_other_optimizers_are_refused(tmp_path):
    model = tiny_llama(seed=1)
    with pytest.raises(TypeError, match="TrainerMeZO"):
        ZOTrainer(
            model=model,
            args=_args(tmp_path, eval_strategy="no"),
            train_dataset=_Sequences(8, 2),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )


def test_trainer_step_without_closure_is_a_no_op():
    model = torch.nn.Linear(2, 2)
    opt = TrainerMeZO(model.named_parameters(), lr=0.1)
    before = model.weight.detach().clone()
    assert opt.step() is None and opt.step_count == 0
    assert torch.equal(model.weight, before)
    assert os.environ.get("RANK") is None  # a single process: no collective ran


def _data_parallel_main(out: str) -> None:
    """Run under accelerate launch / torchrun: 2 ranks, 4 examples each per step."""
    import sys

    from zotune import distributed

    trainer = _trainer(
        out,
        max_steps=2,
        save_strategy="no",
        eval_strategy="no",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
    )
    trainer.train()
    stats = distributed.comm_stats()
    if trainer.args.process_index == 0:
        torch.save(
            {
                "params": _params(trainer),
                "world": trainer.args.world_size,
                "bytes": stats.bytes,
                "losses": trainer.mezo.last_losses,
            },
            os.path.join(out, "params.pt"),
        )
    # Leave without tearing gloo down (docs/scaling.md, "Ending a gloo run"). A gloo worker thread releases a
    # finished collective's tensors after the caller has moved on, and needs the GIL to do it. During
    # interpreter finalization that thread is ended by pthread_exit inside a noexcept destructor: the rank
    # aborts ("terminate called without an active exception"). destroy_process_group() does not stop the
    # workers; when the last reference to the group goes (here with the Trainer's DDP wrapper) its
    # destructor waits for them while holding the GIL: a deadlock. The barrier ensures no rank is still in
    # a collective; os._exit skips both teardowns (benchmarks/gloo_exit_abort.py, torch alone).
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_data_parallel_under_accelerate_launch_equals_one_process_on_the_whole_batch(tmp_path):
    # `accelerate launch --multi_gpu` starts the ranks with torchrun; on a machine without GPUs the
    # Trainer (use_cpu=True) joins them with gloo. `torchrun --nproc_per_node 2` works the same way.
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    # Port 0: torchrun's rendezvous binds a free port itself. A port found free here and closed could be taken
    # by another process before the store binds it (a rare EADDRINUSE on a busy runner).
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        __file__,
        str(tmp_path),
    ]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "params.pt", weights_only=True)
    assert result["world"] == 2
    assert result["bytes"] == 2 * 2 * 8  # 2 steps x 2 losses x one float64
    # The same 8 examples per step in one process, as two micro-batches of 4: rank r's shard is
    # micro-batch r (accelerate hands rank r the r-th batch of 4 of the sampler's order). Rank r's loss
    # is its shard's float32 mean, as is micro-batch r's; the all-reduce sums the two in float64 and
    # divides by 2, as accumulate() does. So every loss, projected gradient and update is the same
    # float computation, and the weights agree bit for bit. A forward's float32 result can depend on
    # the number of threads that share its reductions, so this process runs with one, as each rank
    # does (OMP_NUM_THREADS=1). test_gradient_accumulation_equals_one_big_batch relates these two
    # micro-batches to one batch of 8.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _trainer(
            tmp_path / "single",
            max_steps=2,
            save_strategy="no",
            eval_strategy="no",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
        )
        single.train()
    finally:
        torch.set_num_threads(threads)
    assert result["losses"] == single.mezo.last_losses
    want = _params(single)
    for name in want:
        assert torch.equal(result["params"][name], want[name]), name


if __name__ == "__main__":
    import sys

    _data_parallel_main(sys.argv[1])


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_tuning_modes_train_only_their_parameters(tmp_path, mode):
    """A model set up by zotune.tuning (or PEFT) trains its adapter only: MeZO takes requires_grad tensors."""
    from zotune.models import ModelConfig
    from zotune.tuning import apply_tuning

    model = apply_tuning(tiny_llama(seed=1), ModelConfig(name="tiny", tuning=mode), "causal", log=lambda m: None)
    trainer = ZOTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, save_strategy="no", eval_strategy="no"),
        train_dataset=_Sequences(16, 2),
        mezo_kwargs={"eps": 1e-2},
    )
    before = _params(trainer)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert changed == trainable and changed
    assert all(("lora_" if mode == "lora" else "prefix.") in n for n in changed)


@pytest.mark.parametrize(
    ("dtype", "given", "expected"),
    [
        (torch.bfloat16, None, True),
        (torch.float16, None, True),
        (torch.float32, None, False),
        (torch.bfloat16, False, False),
    ],
)
def test_stochastic_rounding_follows_the_weights_dtype_unless_given(tmp_path, dtype, given, expected):
    # as `zotune train` with optimizer.stochastic_rounding: null: bf16 / fp16 weights would round MeZO's
    # sub-half-ulp updates away
    kwargs = {"eps": 1e-3} if given is None else {"eps": 1e-3, "stochastic_rounding": given}
    trainer = ZOTrainer(
        model=tiny_llama(seed=1).to(dtype),
        args=_args(tmp_path, eval_strategy="no"),
        train_dataset=_Sequences(8, 2),
        mezo_kwargs=kwargs,
    )
    assert trainer.create_optimizer().stochastic_rounding is expected
    assert trainer.mezo.state_dict()["mezo"]["stochastic_rounding"] is expected
