"""Tuning modes (LoRA, prefix, head) and non-differentiable objectives, from the parts to `zotune train`."""

import json

import pytest
import tiny
import torch
from conftest import stopped_during_step, ulp32

from zotune import MeZO, checkpoint, read_trajectory, replay
from zotune.cli import main
from zotune.models import ModelConfig, ModelError, load_model
from zotune.objectives import Encoded, Objective, metric_objective
from zotune.prefix import PrefixLM
from zotune.tuning import apply_tuning, tune_loaded

QUIET = lambda message: None  # noqa: E731


def _logits_tol(logits: torch.Tensor) -> float:
    """How far two float32 evaluations of the tiny models' logits may drift apart when they sum in other orders.

    A logit of these 2-layer models passes through K ~ 570 rounded sums (per layer: norms and projections
    of 32, the 64-wide MLP, attention over <= 11 keys; then the final norm and the head), each within
    2^-24 of its terms' size, which the norms keep at the logits' scale (gain ~1: weights 0.05 N(0, 1)).
    The roundings' signs are independent: ~sqrt(K) ulp of max|logit| per evaluation, 4 of those each
    for the two: 8 sqrt(570) ~ 190 ulp (~2.3e-5; measured <= 8 ulp on AVX2 and ATEN_CPU_CAPABILITY=default).
    """
    return 8 * 570**0.5 * ulp32(float(logits.abs().max()))


def _tuned(family, mode, **options):
    model = tiny.causal_lm(family)
    return apply_tuning(model, ModelConfig(name="tiny", tuning=mode, **options), "causal", tiny.tokenizer(), log=QUIET)


def _expected(family, mode):
    """(trainable tensors, elements) from the tiny models' shapes: hidden 32, 2 layers, head_dim 8, vocab V."""
    vocab, layers = len(tiny.tokenizer()), 2
    kv = 16 if family == "llama" else 32  # Llama: 2 of 4 heads carry keys/values (GQA)
    if mode == "head":
        return 1, vocab * 32
    if mode == "prefix":
        return 2 * layers, 2 * layers * 5 * kv
    if family == "gpt2":  # one pair on the fused q/k/v projection, 32 -> 96
        return 2 * layers, layers * (8 * 32 + 96 * 8)
    return 4 * layers, layers * ((8 * 32 + 32 * 8) + (8 * 32 + kv * 8))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("mode", ["lora", "prefix", "head"])
def test_only_the_modes_parameters_train_and_mezo_moves_only_them(family, mode):
    model = _tuned(family, mode)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensors, elements = _expected(family, mode)
    assert (len(trainable), sum(p.numel() for _, p in trainable)) == (tensors, elements)
    marker = {"lora": "lora_", "prefix": "prefix.layers.", "head": ""}[mode]
    assert all(marker in n for n, _ in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    opt = MeZO(trainable, lr=1e-2, eps=1e-3, seed=0, fuse_next=False)
    for _ in range(2):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, _ in trainable}


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_fresh_prefixes_are_the_real_tokens_keys_and_values(family):
    """At initialisation, prefix + input computes what the model computes on real tokens + input."""
    model = tiny.causal_lm(family)
    tokens = torch.tensor([20, 31, 42, 53, 64])
    wrapped = PrefixLM(model, tokens)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits
        want = model(input_ids=torch.cat([tokens[None], ids], dim=1)).logits[:, 5:]
    # the same rows' dot products, batched otherwise (6 queries on 5 cached keys vs 11 tokens). A prefix
    # token off is 0.25-0.6 off; its keys 2^-10 too large, 3.3e-5-5e-5 (1.4-2.2x this).
    torch.testing.assert_close(got, want, rtol=0, atol=_logits_tol(want))
    greedy = wrapped.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference = model.generate(
        input_ids=torch.cat([tokens[None], ids], dim=1),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert greedy[0, 6:].tolist() == reference[0, 11:].tolist() and len(greedy[0]) == 10
    assert wrapped.get_output_embeddings() is model.get_output_embeddings() and wrapped.config is model.config


def test_lora_starts_at_the_base_model_and_is_the_same_every_time():
    base = tiny.causal_lm("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    a, b = _tuned("llama", "lora"), _tuned("llama", "lora")
    assert torch.equal(a(input_ids=ids).logits, base(input_ids=ids).logits)  # B starts at 0: LoRA adds exact zeros
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_merged_lora_computes_what_the_adapter_did(family):
    from zotune.tuning import merge_lora

    model = _tuned(family, "lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = merge_lora(model)
        # W x + s B (A x) vs (W + s B A) x: other sums and one more rounding (of W + s B A) per weight,
        # within _logits_tol. LoRA's scale s 2^-10 off moves the logits by 7e-4-1e-3; a dropped adapter, 4e-2-0.3.
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=0, atol=_logits_tol(before))
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())


def test_bad_lora_target_lists_the_candidates():
    with pytest.raises(ModelError, match="LoRA target module.*qkv.*linear modules are: .*q_proj.*v_proj"):
        _tuned("llama", "lora", lora_targets=["qkv"])
    with pytest.raises(ModelError, match="causal LMs only"):
        apply_tuning(tiny.masked_lm("roberta"), ModelConfig(name="tiny", tuning="prefix"), "masked", log=QUIET)
    roberta = apply_tuning(tiny.masked_lm("roberta"), ModelConfig(name="tiny", tuning="lora"), "masked", log=QUIET)
    assert {n.split(".")[-4] for n, p in roberta.named_parameters() if p.requires_grad} == {"query", "value"}


# -- end to end through the CLI -------------------------------------------------------------------


def _args(model_dir, out, *extra):
    return [
        "train",
        "--model.name",
        str(model_dir),
        "--steps",
        "4",
        "--eval_every",
        "4",
        "--train",
        "24",
        "--validation",
        "8",
        "--test",
        "8",
        "--batch_size",
        "4",
        "--lr",
        "1e-2",
        "--progress",
        "false",
        "--zero_shot",
        "false",
        "--keep_start",
        "false",
        "--output_dir",
        str(out),
        *extra,
    ]
    # keep_start off: best/ then holds the last step's weights (one validation), which the tests replay


@pytest.mark.parametrize("mode", ["lora", "prefix", "head"])
def test_train_resume_and_replay_in_every_mode(model_dir, tmp_path, monkeypatch, capsys, mode):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(model_dir, full, "--model.tuning", mode)) == 0
    summary = json.loads((full / "summary.json").read_text())
    assert summary["trainable_parameters"] == _expected("llama", mode)[1]

    assert stopped_during_step(monkeypatch, _args(model_dir, part, "--model.tuning", mode), 1) == 130  # in step 2
    assert main(["train", "--resume", str(part)]) == 0
    assert read_trajectory(full / "trajectory.zot").records == read_trajectory(part / "trajectory.zot").records
    trained = checkpoint.load_tensors(full / "best" / "model.safetensors")  # the last step: one evaluation
    resumed = checkpoint.load_tensors(part / "best" / "model.safetensors")
    assert set(resumed) == set(trained) and all(torch.equal(t, resumed[n]) for n, t in trained.items())

    # Replay onto a freshly prepared base gives the trained tensors bit for bit: loaded as the run loaded
    # it (model.device "auto"), it is on the backend the run trained on (the saved tensors are on the CPU).
    config = ModelConfig(name=str(model_dir), tuning=mode)
    fresh = tune_loaded(load_model(config, log=QUIET), config, log=QUIET).model
    device = next(fresh.parameters()).device
    untrained = {n: p.detach().cpu().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    replay(fresh, full / "trajectory.zot")
    assert all(not torch.equal(untrained[n], t) for n, t in trained.items())
    params = dict(fresh.named_parameters())
    assert set(trained) == {n for n, p in params.items() if p.requires_grad}
    assert all(torch.equal(params[n].cpu(), t) for n, t in trained.items())

    # `zotune eval` replays in the same mode; `zotune replay` saves something loadable.
    capsys.readouterr()
    assert main(["eval", "--config", str(full / "config.yaml"), "--trajectory", str(full / "trajectory.zot")]) == 0
    assert main(["eval", "--run", str(full)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"accuracy {100 * summary['test']['accuracy']:.2f}") == 2
    out = tmp_path / "tuned"
    assert (
        main(["replay", "--base", str(model_dir), "--trajectory", str(full / "trajectory.zot"), "--out", str(out)]) == 0
    )
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out).to(device)
    ids = torch.tensor([[5, 6, 7, 8, 9]], device=device)
    with torch.no_grad():
        if mode == "prefix":
            prefixes = checkpoint.load_tensors(out / "prefix.safetensors")
            assert all(torch.equal(prefixes[n.removeprefix("prefix.")], t) for n, t in trained.items())
            assert not any("prefix" in n for n, _ in saved.named_parameters())
            # the replayed folder loads back as a ready prefix model that scores as the trained one
            ready = load_model(ModelConfig(name=str(out)), log=QUIET).model
            # the same weights (prefixes bit for bit, above) through the same kernels: the same bits
            assert torch.equal(ready(input_ids=ids).logits, fresh(input_ids=ids).logits)
            assert main(["eval", "--model.name", str(out), "--train", "24", "--validation", "8", "--test", "8"]) == 0
            assert f"accuracy {100 * summary['test']['accuracy']:.2f}" in capsys.readouterr().out
        else:
            want = fresh(input_ids=ids).logits  # merged LoRA vs the adapters, as in test_merged_lora_...
            torch.testing.assert_close(saved(input_ids=ids).logits, want, rtol=0, atol=_logits_tol(want))
            assert not any("lora" in n for n, _ in saved.named_parameters())


def test_bad_tuning_is_one_line(model_dir, tmp_path, capsys):
    assert main(_args(model_dir, tmp_path / "never", "--model.tuning", "adapters")) == 2
    assert "model.tuning must be full, lora, prefix or head" in capsys.readouterr().err
    assert main(_args(model_dir, tmp_path / "never", "--model.tuning", "lora", "--lora_targets", "nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "linear modules are:" in err[0] and not (tmp_path / "never").exists()


# -- non-differentiable objectives ----------------------------------------------------------------


def _classification():
    tok = tiny.tokenizer()
    objective = Objective("classification", tok, "causal", [" terrible", " great"])
    batch = [Encoded(((5, 6, 7),), ((2,),), ((0,),), label) for label in (0, 1, 1, 0)]
    return objective, batch


def test_metric_objectives_are_the_negative_batch_metric():
    objective, batch = _classification()
    model = tiny.causal_lm("llama")
    predictions = objective.predict(model, batch)  # the same prompt four times: one prediction
    assert float(metric_objective(objective, "accuracy")(model, batch)) == -0.5
    f1 = 2 * 2 / (2 * 2 + 2 + 0) / 2  # the predicted class: tp 2, fp 2; the other: no tp
    assert float(metric_objective(objective, "f1")(model, batch)) == pytest.approx(-f1)
    seen = []
    reward = metric_objective(objective, lambda p, r: seen.append((p, r)) or 7.0)
    assert float(reward(model, batch)) == -7.0 and seen == [(predictions, [0, 1, 1, 0])]


def test_accuracy_and_reward_objectives_train_end_to_end(model_dir, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "CALLS = []\n"
        "def reward(predictions, references):\n"
        "    CALLS.append(len(predictions))\n"
        "    return sum(p == r for p, r in zip(predictions, references)) / len(references)\n"
    )
    monkeypatch.chdir(tmp_path)  # a reward module in the working directory is found, as from the `zotune` script
    assert main(_args(model_dir, tmp_path / "acc", "--train.objective", "accuracy", "--model.tuning", "head")) == 0
    rows = [json.loads(x) for x in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    assert all(-1.0 <= r["loss"] <= 0.0 for r in rows if "loss" in r)
    assert main(_args(model_dir, tmp_path / "rew", "--train.objective", "my_rewards:reward")) == 0
    import sys

    my_rewards = sys.modules.pop("my_rewards")
    assert my_rewards.CALLS == [4] * 8  # two evaluations a step, batch 4
    assert main(_args(model_dir, tmp_path / "never", "--train.objective", "my_rewards:nothing")) == 2
    assert not (tmp_path / "never").exists()


def test_lora_setup_leaves_the_global_rng_alone():
    base, tok = tiny.causal_lm("llama"), tiny.tokenizer()
    before = torch.random.get_rng_state()
    apply_tuning(base, ModelConfig(tuning="lora"), "causal", tok, log=lambda *_: None)
    assert torch.equal(before, torch.random.get_rng_state())
