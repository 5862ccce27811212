"""In-context learning: the cached demonstrations give the logits of the concatenated text; truncation."""

import pytest
import tiny
import torch
from conftest import ulp32

from zotune.baselines.icl import ICLConfig, _shift, demonstration_tokens, in_context
from zotune.config import ConfigError, RunConfig
from zotune.models import ModelConfig
from zotune.objectives import selective_head
from zotune.prefix import PrefixLM
from zotune.tasks import TaskError
from zotune.train import prepare

QUIET = lambda message: None  # noqa: E731


def _prepared(model_dir, **task):
    config = RunConfig()
    config.model = ModelConfig(name=str(model_dir))
    config.task.train, config.task.validation, config.task.test = 12, 4, 6
    for key, value in task.items():
        setattr(config.task, key, value)
    return prepare(config, log=QUIET)


def test_cached_demonstrations_give_the_logits_of_the_whole_text(model_dir):
    prepared = _prepared(model_dir)
    objective, model = prepared.objective, prepared.loaded.model
    examples = prepared.encoded["test"]
    tokens, used = demonstration_tokens(
        objective, prepared.encoded["train"], examples, config=ICLConfig(k=2), limit=256, log=QUIET
    )
    assert used == 2
    device = next(model.parameters()).device  # the model may be on a GPU
    icl_model = PrefixLM(model, torch.tensor(tokens))
    vocab = torch.tensor(objective.label_ids, device=device)
    bos = objective.tokenizer.bos_token_id if tokens[:1] == [objective.tokenizer.bos_token_id] else None
    with torch.no_grad():
        for e in examples:
            shifted = _shift(e, bos)
            cached = objective._label_logits(icl_model, [shifted])
            whole = torch.tensor([tokens + list(shifted.sequences[0])], device=device)
            at = len(tokens) + shifted.positions[0][0]
            with selective_head(model, torch.tensor([0], device=device), torch.tensor([at], device=device), vocab):
                direct = model(input_ids=whole).logits.float()
            # the same rows' dot products, batched otherwise (the example's queries on cached keys vs the whole
            # text). A logit passes through K rounded sums (~570 in the tiny Llama's norms, projections, MLP and
            # head, plus 2 layers' softmax and weighted sum over the n keys), each within 2^-24 of its terms'
            # size at the logits' scale (~1); independent signs: ~sqrt(K) ulp per evaluation, 4 of those
            # each for the two (measured <= 1 ulp). The last demonstration token's keys and values from another
            # token: 1.4e-3 off (~40x).
            K = 570 + 2 * 2 * whole.shape[1]
            tol = 8 * K**0.5 * ulp32(max(float(direct.abs().max()), 1.0))
            torch.testing.assert_close(cached, direct, rtol=0, atol=tol)


def test_each_demonstration_is_a_training_prompt_with_its_answer(model_dir):
    prepared = _prepared(model_dir)
    objective, train = prepared.objective, prepared.encoded["train"]
    tokens, used = demonstration_tokens(
        objective, train, train[:1], config=ICLConfig(k=3, separator="\n\n"), limit=10_000, log=QUIET
    )
    text = objective.tokenizer.decode(tokens)
    demos = [d for d in text.split("\n\n") if d]
    assert len(demos) == 3
    answers = {objective.tokenizer.decode([objective.label_ids[e.label]]).strip() for e in train}
    for demo in demos:
        assert demo.strip().split()[-1] in answers  # every demonstration ends with a label word


def test_demonstrations_that_do_not_fit_are_dropped_and_reported(model_dir):
    prepared = _prepared(model_dir)
    objective, train, test = prepared.objective, prepared.encoded["train"], prepared.encoded["test"]
    longest = max(len(e.sequences[0]) for e in test)
    full, _ = demonstration_tokens(objective, train, test, config=ICLConfig(k=8), limit=10_000, log=QUIET)
    limit = longest + len(full) // 2
    messages = []
    tokens, used = demonstration_tokens(objective, train, test, config=ICLConfig(k=8), limit=limit, log=messages.append)
    assert 0 < used < 8 and len(tokens) + longest <= limit
    assert any(f"{used} of 8 demonstrations fit in {limit} tokens" in m for m in messages)


def test_no_demonstrations_is_zero_shot(model_dir):
    from zotune.objectives import evaluate

    prepared = _prepared(model_dir)
    result = in_context(prepared, ICLConfig(k=0), log=QUIET, progress=False)
    zero = evaluate(prepared.objective, prepared.loaded.model, prepared.encoded["test"])
    assert result["demonstrations"] == 0 and result["test"] == zero


def test_in_context_reports_metrics_and_is_deterministic(model_dir):
    first = in_context(_prepared(model_dir), ICLConfig(k=2, seed=3), log=QUIET, progress=False)
    second = in_context(_prepared(model_dir), ICLConfig(k=2, seed=3), log=QUIET, progress=False)
    assert first["demonstrations"] == 2 and set(first) >= {"validation", "test", "context_tokens"}
    assert first["test"] == second["test"] and first["context_tokens"] == second["context_tokens"]


def test_masked_models_and_bad_configs_are_refused(tmp_path):
    folder = tmp_path / "roberta"
    tiny.masked_lm("roberta").save_pretrained(folder)
    tiny.tokenizer(masked=True).save_pretrained(folder)
    config = RunConfig()
    config.model = ModelConfig(name=str(folder))
    config.task.train, config.task.validation, config.task.test = 8, 2, 2
    with pytest.raises(TaskError, match="causal LMs"):
        in_context(prepare(config, log=QUIET), ICLConfig(k=2), log=QUIET, progress=False)
    with pytest.raises(ConfigError, match="icl.k"):
        ICLConfig(k=-1)
