"""The backprop fine-tuning baseline on a tiny Llama: it learns, trains only what is trainable, tests
the best validation weights, is reproducible, and refuses bad settings and NaN losses."""

import json

import pytest
import torch
from conftest import ulp32

import zotune.objectives as objectives
from zotune.baselines.finetune import FinetuneConfig, finetune
from zotune.config import ConfigError, RunConfig
from zotune.train import prepare

FILLERS = ["the cat", "a film", "the mat", "it was", "one two", "Paris", "the acting", "so it"]


def _records(n: int, offset: int = 0) -> list[dict]:
    """A learnable sentiment toy: the label is which of two words the text holds."""
    return [
        {
            "text": f"{FILLERS[(i // 2 + offset) % len(FILLERS)]} {'great good' if i % 2 else 'terrible bad'}",
            "label": i % 2,
        }
        for i in range(n)
    ]


def _prepare(model_dir, tmp_path, *, tuning="full", train=24, validation=0, test=8):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(train + validation)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(test, offset=3)))
    config = RunConfig()
    config.model.name, config.model.tuning = str(model_dir), tuning
    config.task.name, config.task.validation = "custom", validation
    config.task.custom = dict(
        train=str(tmp_path / "train.jsonl"),
        test=str(tmp_path / "test.jsonl"),
        template="{text} . It was",
        label_field="label",
        label_words={"0": " terrible", "1": " great"},
    )
    return prepare(config, log=lambda s: None)


def _quiet(**kwargs) -> FinetuneConfig:
    return FinetuneConfig(**{"lr": 1e-3, "batch_size": 8, "progress": False, **kwargs})


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def _train_loss(prepared) -> float:
    return float(prepared.objective.loss(prepared.loaded.model, prepared.encoded["train"]))


def test_full_finetuning_lowers_the_training_loss_and_reports_what_it_did(model_dir, tmp_path):
    prepared = _prepare(model_dir, tmp_path)
    before = _train_loss(prepared)
    result = finetune(prepared, _quiet(epochs=4), log=lambda s: None)
    assert _train_loss(prepared) < 0.5 * before  # four epochs of AdamW on 24 examples reach 0.20 of the start
    assert result["steps"] == len(result["losses"]) == 12  # 24 examples / batch 8 = 3 steps an epoch
    assert result["validation"] == {} and result["best_step"] == 12  # no validation split: the final weights
    assert result["test"]["accuracy"] >= 0.875 and result["wall_time_s"] > 0  # it generalises to unseen fillers
    assert result["trainable_parameters"] == sum(p.numel() for p in prepared.loaded.model.parameters())


@pytest.mark.parametrize("tuning,trained", [("lora", "lora_"), ("prefix", "prefix."), ("head", "lm_head.")])
def test_only_the_trainable_tensors_change(model_dir, tmp_path, tuning, trained):
    prepared = _prepare(model_dir, tmp_path, tuning=tuning)
    model = prepared.loaded.model
    before = _state(model)
    result = finetune(prepared, _quiet(steps=3), log=lambda s: None)
    after = _state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and all(trained in n for n in changed) and changed <= names
    assert all(torch.equal(before[n], after[n]) for n in before if n not in names)  # frozen: bit-identical
    assert result["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any(p.grad is not None for p in model.parameters())  # gradients are freed


def test_the_best_validation_weights_are_the_ones_tested(model_dir, tmp_path, monkeypatch):
    prepared = _prepare(model_dir, tmp_path, validation=8)
    model = prepared.loaded.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fake = iter([0.5, 0.9, 0.1, 0.2])  # validation peaks at the second evaluation
    seen = []
    real = objectives.evaluate  # what finetune's evaluations call (through objectives.evaluate_split)

    def spy(objective, model_, encoded, batch_size, progress=None):
        seen.append((encoded is prepared.encoded["test"], _state(model_)))
        metrics = real(objective, model_, encoded, batch_size, progress)
        return metrics if encoded is prepared.encoded["test"] else {"accuracy": next(fake)}

    monkeypatch.setattr(objectives, "evaluate", spy)
    result = finetune(prepared, _quiet(steps=8, eval_every=2), log=lambda s: None)
    assert [is_test for is_test, _ in seen] == [False] * 4 + [True]
    assert result["best_step"] == 4 and result["validation"] == {"accuracy": 0.9}
    best, last, tested = seen[1][1], seen[3][1], seen[4][1]
    assert all(torch.equal(tested[n], best[n]) for n in names)
    assert not all(torch.equal(last[n], best[n]) for n in names)
    assert all(torch.equal(p, best[n]) for n, p in model.named_parameters())  # the model is left at the best


def test_epochs_batches_and_evaluation_steps(model_dir, tmp_path, monkeypatch):
    prepared = _prepare(model_dir, tmp_path, validation=8)
    batches, evals = [], []
    loss = prepared.objective.loss
    prepared.objective.loss = lambda model, batch, chunks=1: batches.append(batch) or loss(model, batch, chunks)
    real = objectives.evaluate  # what finetune's evaluations call (through objectives.evaluate_split)

    def spy(objective, model, encoded, batch_size, progress=None):
        evals.append(len(batches))  # after how many steps
        return real(objective, model, encoded, batch_size, progress)

    monkeypatch.setattr(objectives, "evaluate", spy)
    result = finetune(prepared, _quiet(epochs=1.5), log=lambda s: None)
    assert result["steps"] == 5 and [len(b) for b in batches] == [8, 8, 8, 8, 8]
    assert evals == [3, 5, 5]  # each epoch, the end, then the test
    first_epoch = [e for b in batches[:3] for e in b]
    assert sorted(map(id, first_epoch)) == sorted(map(id, prepared.encoded["train"]))  # each example once
    assert [id(e) for e in first_epoch] != [id(e) for e in prepared.encoded["train"]]  # shuffled


def test_same_seed_same_run_other_seed_other_order(model_dir, tmp_path):
    runs = []
    for seed in (0, 0, 1):
        prepared = _prepare(model_dir, tmp_path, tuning="lora", validation=8)
        result = finetune(prepared, _quiet(steps=4, seed=seed), log=lambda s: None)
        runs.append((result, _state(prepared.loaded.model)))
    (a, wa), (b, wb), (c, _) = runs
    assert a["losses"] == b["losses"] and a["validation"] == b["validation"] and a["test"] == b["test"]
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert a["losses"] != c["losses"]


def test_length_sorted_slices_train_the_same_weights(model_dir, tmp_path):
    # One graph over the slices, one backward: the same gradients up to float summation order.
    weights, losses = [], []
    for chunks in (1, 3, 0):
        prepared = _prepare(model_dir, tmp_path)
        losses.append(finetune(prepared, _quiet(steps=3, forward_chunks=chunks), log=lambda s: None)["losses"])
        weights.append(_state(prepared.loaded.model))
    # The first step's loss is taken at the same weights: a mean over the same token losses summed in
    # another order, within 8 float32 ulps of it (a missing or doubled slice changes the mean far more).
    for other in losses[1:]:
        assert abs(other[0] - losses[0][0]) <= 8 * ulp32(losses[0][0])
    # The weights: AdamW divides each gradient element by its own running size, so no rounding bound
    # survives it (an element whose gradient is at rounding level may step +-lr either way). 1e-5 is
    # 10x the gap seen (<= 1.5e-6) and ~300x below the 3e-3 the weights move in these 3 steps, so a slice
    # trained twice or not at all still fails.
    for other in weights[1:]:
        for name, w in weights[0].items():
            torch.testing.assert_close(other[name], w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nan_stops_the_run_before_it_reaches_the_weights(model_dir, tmp_path, where):
    prepared = _prepare(model_dir, tmp_path)
    model = prepared.loaded.model
    calls, snapshot = [], {}
    loss = prepared.objective.loss

    def poisoned(model_, batch, chunks=1):
        calls.append(1)
        if len(calls) != 3:
            return loss(model_, batch, chunks)
        snapshot.update(_state(model))
        if where == "loss":
            return loss(model_, batch, chunks) * float("nan")
        next(model.parameters()).register_hook(lambda grad: grad * float("nan"))  # a finite loss, NaN gradient
        return loss(model_, batch, chunks)

    prepared.objective.loss = poisoned
    with pytest.raises(FloatingPointError, match=f"{where}.* is nan at step 3: lower finetune.lr"):
        finetune(prepared, _quiet(steps=5, max_grad_norm=None), log=lambda s: None)
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(lr=0.0), "finetune.lr"),
        (dict(lr=float("nan")), "finetune.lr"),
        (dict(epochs=0), "finetune.epochs"),
        (dict(steps=0), "finetune.steps"),
        (dict(batch_size=0), "finetune.batch_size"),
        (dict(weight_decay=-0.1), "finetune.weight_decay"),
        (dict(eval_every=0), "finetune.eval_every"),
        (dict(max_grad_norm=0.0), "finetune.max_grad_norm"),
        (dict(forward_chunks=-1), "finetune.forward_chunks"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        FinetuneConfig(**kwargs)
    assert FinetuneConfig(steps=None, eval_every=None, max_grad_norm=None).max_grad_norm is None
