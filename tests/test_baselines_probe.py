"""The linear-probing baseline: features are the LM head's inputs at the scored positions, the probe
learns what is linearly there, multiple choice gets one prediction per instance, bad input is refused."""

import json

import numpy as np
import pytest
import tiny
import torch
from conftest import ulp32

from zotune.baselines.probe import ProbeConfig, features, init_head_from_probe, linear_probe
from zotune.config import ConfigError, RunConfig
from zotune.models import LoadedModel, select_trainable
from zotune.objectives import Objective
from zotune.tasks import MASK, Instance, TaskError
from zotune.train import prepare

FILLERS = ["the cat", "a film", "the mat", "it was", "one two", "Paris", "the acting", "so it"]
WORDS = {"0": " terrible", "1": " great"}


def _tol(value) -> float:
    """How far two float32 evaluations of a tiny model's features or logits may be apart when batched otherwise.

    A feature (the head's input, after the final norm) or a logit of these 2-layer models (hidden 32, MLP 64,
    short texts) passes through K ~ 600 rounded sums, each within 2^-24 of its terms' size, which the norms
    keep at the features' scale (~1-3). Their signs are independent: ~sqrt(K) ulp per evaluation, 4 of those
    each for the two: 8 sqrt(600) ~ 200 ulp of max(|value|, 1). Measured <= 3 ulp, also with
    ATEN_CPU_CAPABILITY=default.
    """
    return 8 * 600**0.5 * ulp32(max(float(abs(value).max()), 1.0))


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _sentiment(n: int, offset: int = 0) -> list[dict]:
    """The label is which of two words the text holds; the fillers say nothing about it."""
    return [
        {
            "text": f"{FILLERS[(i // 2 + offset) % len(FILLERS)]} {'great good' if i % 2 else 'terrible bad'}",
            "label": i % 2,
        }
        for i in range(n)
    ]


def _prepare(model_dir, tmp_path, custom: dict, *, validation=8, loaded=None, tuning="full"):
    config = RunConfig()
    config.model.name, config.model.tuning = str(model_dir), tuning
    config.task.name, config.task.validation = "custom", validation
    config.task.custom = custom
    return prepare(config, log=lambda s: None, loaded=loaded)


def _classification(model_dir, tmp_path, template="{text}", validation=8, train=24):
    return _prepare(
        model_dir,
        tmp_path,
        dict(
            train=_write(tmp_path / "train.jsonl", _sentiment(train + validation)),
            test=_write(tmp_path / "test.jsonl", _sentiment(8, offset=3)),
            template=template,
            label_field="label",
            label_words=WORDS,
        ),
        validation=validation,
    )


def _quiet(**kwargs) -> ProbeConfig:
    return ProbeConfig(**{"progress": False, **kwargs})


def _full_logits(model, sequence) -> torch.Tensor:
    ids = torch.tensor([list(sequence)], device=next(model.parameters()).device)  # the model may be on a GPU
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


def test_causal_features_are_the_head_inputs_at_the_scored_position(model_dir, tmp_path):
    prepared = _classification(model_dir, tmp_path)
    model, objective, train = prepared.loaded.model, prepared.objective, prepared.encoded["train"]
    X = features(objective, model, train, batch_size=5)  # uneven batches, padded
    assert X.shape == (len(train), model.config.hidden_size) and X.dtype == np.float32
    np.testing.assert_allclose(features(objective, model, train, batch_size=1), X, rtol=0, atol=_tol(X))
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for i in (0, 7):
            expected = _full_logits(model, train[i].sequences[0])[train[i].positions[0][0]]
            got = torch.from_numpy(X[i]).to(head.device) @ head.T  # a feature one position off: O(1) off
            torch.testing.assert_close(got, expected, rtol=0, atol=_tol(expected))


def test_masked_features_are_taken_at_the_mask():
    tok, model = tiny.tokenizer(masked=True), tiny.masked_lm("roberta")
    objective = Objective("classification", tok, "masked", [" great", " terrible"])
    encoded = [
        objective.encode(Instance(f"{text} . It was {MASK} .", (" great", " terrible"), i % 2))
        for i, text in enumerate(["the movie was good", "a terrible film", "bad"])
    ]
    X = features(objective, model, encoded)
    assert X.shape == (3, model.config.hidden_size)
    decoder = model.get_output_embeddings()
    with torch.no_grad():
        for x, e in zip(X, encoded):
            expected = _full_logits(model, e.sequences[0])[e.positions[0][0]]
            got = decoder(torch.from_numpy(x).to(expected.device))
            torch.testing.assert_close(got, expected, rtol=0, atol=_tol(expected))


def test_the_probe_separates_a_linearly_separable_task_and_leaves_the_model_alone(model_dir, tmp_path):
    # The prompt ends on the sentiment word itself: the classes are separable in the features.
    prepared = _classification(model_dir, tmp_path)
    model = prepared.loaded.model
    before = {n: p.clone() for n, p in model.named_parameters()}
    lines = []
    result = linear_probe(prepared, _quiet(), log=lines.append)
    assert result["train"]["accuracy"] == result["validation"]["accuracy"] == result["test"]["accuracy"] == 1.0
    assert result["C"] in ProbeConfig().Cs and result["wall_time_s"] > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not model.training
    assert any("chosen on validation" in line for line in lines)


def test_c_is_chosen_on_validation_first_of_ties_or_on_train_without_one(model_dir, tmp_path):
    # The prompt ends on " was" for every example: the class is only in what attention carried there.
    prepared = _classification(model_dir, tmp_path / "a", template="{text} . It was", train=48, validation=16)
    Cs = [0.001, 0.01, 1.0, 100.0]
    lines = []
    result = linear_probe(prepared, _quiet(Cs=Cs), log=lines.append)
    scores = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("linear probe C=")]
    assert len(scores) == len(Cs) and result["C"] == Cs[scores.index(max(scores))]
    assert result["validation"]["accuracy"] == pytest.approx(max(scores) / 100)
    assert result["test"]["accuracy"] > 0.5  # better than chance on unseen fillers
    again = linear_probe(prepared, _quiet(Cs=Cs), log=lambda s: None)
    assert {k: v for k, v in again.items() if k != "wall_time_s"} == {
        k: v for k, v in result.items() if k != "wall_time_s"
    }  # deterministic
    lines = []
    result = linear_probe(_classification(model_dir, tmp_path / "b", validation=0), _quiet(), log=lines.append)
    assert result["validation"] == {} and any("chosen on train" in line for line in lines)


def test_multiple_choice_gives_one_prediction_per_instance(model_dir, tmp_path):
    # The correct option is the " great" one, wherever it stands among two or three options.
    def records(n):
        out = []
        for i in range(n):
            options = ["great", "terrible", "bad"][: 2 + i % 2]
            k = i % len(options)
            options = options[k:] + options[:k]
            out.append(
                {"q": f"{FILLERS[i % len(FILLERS)]} . It was", "choices": options, "answer": options.index("great")}
            )
        return out

    prepared = _prepare(
        model_dir,
        tmp_path,
        dict(
            train=_write(tmp_path / "train.jsonl", records(24)),
            test=_write(tmp_path / "test.jsonl", records(9)),
            template="{q}",
            options_field="choices",
            label_field="answer",
        ),
        validation=6,
    )
    objective, encoded = prepared.objective, prepared.encoded
    X = features(objective, prepared.loaded.model, encoded["test"])
    assert X.shape == (sum(len(e.sequences) for e in encoded["test"]), 32)
    assert not np.allclose(X[0], X[1])  # one-token options still get different features
    # Batches run in length order, two or three rows per instance: the rows come back in instance order.
    np.testing.assert_allclose(
        features(objective, prepared.loaded.model, encoded["test"], batch_size=4), X, rtol=0, atol=_tol(X)
    )
    one_by_one = [features(objective, prepared.loaded.model, [e], batch_size=1) for e in encoded["test"]]
    np.testing.assert_allclose(np.concatenate(one_by_one), X, rtol=0, atol=_tol(X))  # rows out of order: O(1)
    seen = []
    metrics = objective.metrics

    def spy(predictions, batch):
        seen.append((list(predictions), batch))
        return metrics(predictions, batch)

    objective.metrics = spy
    result = linear_probe(prepared, _quiet(), log=lambda s: None)
    predictions, batch = seen[-1]
    assert batch is encoded["test"] and len(predictions) == len(batch) == 9
    assert all(0 <= p < len(e.sequences) for p, e in zip(predictions, batch))
    assert result["test"]["accuracy"] == 1.0


def test_generation_and_single_class_training_data_are_refused(model_dir, tmp_path):
    prepared = _prepare(
        model_dir,
        tmp_path,
        dict(
            train=_write(tmp_path / "qa.jsonl", [{"q": "one two", "a": "three"}] * 4), template="{q}", target_field="a"
        ),
        validation=0,
    )
    with pytest.raises(TaskError, match="linear probing applies to classification and multiple-choice tasks"):
        linear_probe(prepared, _quiet(), log=lambda s: None)
    with pytest.raises(TaskError, match="linear probing applies"):
        features(prepared.objective, prepared.loaded.model, prepared.encoded["train"])
    positive = [r for r in _sentiment(8) if r["label"] == 1]
    one_class = _prepare(
        model_dir,
        tmp_path,
        dict(train=_write(tmp_path / "pos.jsonl", positive), template="{text}", label_field="label", label_words=WORDS),
        validation=0,
    )
    with pytest.raises(TaskError, match="single label"):
        linear_probe(one_class, _quiet(), log=lambda s: None)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(Cs=[]), "probe.Cs"),
        (dict(Cs=[0.1, -1.0]), "probe.Cs"),
        (dict(Cs=[float("inf")]), "probe.Cs"),
        (dict(max_iter=0), "probe.max_iter"),
        (dict(batch_size=0), "probe.batch_size"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ProbeConfig(**kwargs)
    assert ProbeConfig(Cs=0.5).Cs == [0.5]


# -- linear probing, then fine-tuning from the probe ----------------------------------------------

THREE = {"0": " terrible", "1": " great", "2": " Maybe"}


@pytest.mark.parametrize("family,words", [("llama", WORDS), ("gpt2", THREE), ("roberta", WORDS)])
def test_the_head_initialised_from_a_probe_predicts_what_the_probe_predicts(model_dir, tmp_path, family, words):
    # llama: separate head, no bias; gpt2: tied head, three labels; roberta: tied head with a bias, at the mask.
    masked = family == "roberta"
    loaded = (
        None
        if family == "llama"
        else LoadedModel(
            tiny.masked_lm(family) if masked else tiny.causal_lm(family),
            tiny.tokenizer(masked=masked),
            "masked" if masked else "causal",
            f"tiny-{family}",
        )
    )
    records = [
        {
            "text": f"{FILLERS[i % len(FILLERS)]} {['terrible bad', 'great good', 'Paris'][i % len(words)]}",
            "label": i % len(words),
        }
        for i in range(30)
    ]
    prepared = _prepare(
        model_dir,
        tmp_path,
        dict(
            train=_write(tmp_path / "train.jsonl", records[:24]),
            test=_write(tmp_path / "test.jsonl", records[24:]),
            template="{text} . It was {mask} ." if masked else "{text}",
            label_field="label",
            label_words=words,
        ),
        loaded=loaded,
        validation=6,
    )
    model, objective, test = prepared.loaded.model, prepared.objective, prepared.encoded["test"]
    inputs_before = model.get_input_embeddings().weight.clone()
    head_before = model.get_output_embeddings().weight.clone()
    lines = []
    result = init_head_from_probe(prepared, _quiet(Cs=[0.1, 1.0]), log=lines.append)
    probe, X = result["probe"], features(objective, model, test)
    assert objective.predict(model, test) == probe.predict(X).tolist()
    with torch.no_grad():
        label_logits = objective._label_logits(model, test)
    # The head's float32 rows W (the probe's coefficients, rounded) times the model's feature, vs sklearn's
    # float64 on X, taken in another batch (within _tol(X)): the logits differ by <= 33 2^-24 sum |W| |x| (the
    # rounded coefficients and a 32-long float32 dot) + |W|_1 _tol(X); probabilities by at most half of that.
    # Head rows 2^-8 off move them by 4e-4-1.3e-3.
    W = model.get_output_embeddings().weight[objective.label_ids].detach().double().cpu().numpy()
    scale = float((np.abs(X).astype(np.float64) @ np.abs(W).T).max())
    tol = (33 * 2**-24 * scale + np.abs(W).sum(1).max() * _tol(X)) / 2  # 1.2e-5-5.1e-5; measured <= 1.2e-7
    np.testing.assert_allclose(torch.softmax(label_logits, -1).cpu().numpy(), probe.predict_proba(X), rtol=0, atol=tol)
    head = model.get_output_embeddings().weight
    others = [i for i in range(head.shape[0]) if i not in objective.label_ids]
    assert torch.equal(head[others], head_before[others]) and not torch.equal(head, head_before)
    assert torch.equal(model.get_input_embeddings().weight, inputs_before)  # untied where they were tied
    assert head is not model.get_input_embeddings().weight
    assert any("untied" in line for line in lines) == (family != "llama")
    assert set(result) == {"train", "validation", "test", "C", "wall_time_s", "probe"}
    # the test split's features are not taken (the run evaluates its start on every split itself)
    assert (
        result["test"] == {}
        and result["validation"]
        and any("test: the run evaluates its start" in line for line in lines)
    )


def test_only_classification_heads_are_initialised_from_a_probe(model_dir, tmp_path):
    prepared = _prepare(
        model_dir,
        tmp_path,
        dict(
            train=_write(tmp_path / "mc.jsonl", [{"q": "It was", "c": ["great", "bad"], "a": i % 2} for i in range(6)]),
            template="{q}",
            options_field="c",
            label_field="a",
        ),
        validation=0,
    )
    with pytest.raises(TaskError, match="output rows of classification tasks"):
        init_head_from_probe(prepared, _quiet(), log=lambda s: None)


def _tied_gpt2(model_dir, tmp_path, *, tuning="full", patterns=None):
    """A sentiment task on the tiny GPT-2, whose output layer is tied to its input embeddings."""
    loaded = LoadedModel(tiny.causal_lm("gpt2"), tiny.tokenizer(), "causal", "tiny-gpt2")
    if patterns is not None:
        select_trainable(loaded.model, patterns)
    custom = dict(
        train=_write(tmp_path / "train.jsonl", _sentiment(12)),
        template="{text}",
        label_field="label",
        label_words=WORDS,
    )
    return _prepare(model_dir, tmp_path, custom, loaded=loaded, validation=0, tuning=tuning)


def test_head_tuning_trains_the_untied_head_alone(model_dir, tmp_path):
    prepared = _tied_gpt2(model_dir, tmp_path, tuning="head")
    model = prepared.loaded.model
    init_head_from_probe(prepared, _quiet(Cs=[1.0]), log=lambda s: None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["lm_head.weight"] and not model.config.tie_word_embeddings


@pytest.mark.parametrize(
    "patterns, trained",
    [
        (["lm_head.weight"], ["lm_head.weight"]),  # before the untie this trained the shared matrix: both
        (["transformer.wte.weight"], ["transformer.wte.weight"]),
        (["*"], ["transformer.wte.weight", "lm_head.weight"]),
        (["transformer.h.0.*"], []),
    ],
)
def test_after_the_untie_model_trainable_picks_the_head_and_the_embeddings_by_their_own_names(
    model_dir, tmp_path, patterns, trained
):
    prepared = _tied_gpt2(model_dir, tmp_path, patterns=patterns)
    model, lines = prepared.loaded.model, []
    init_head_from_probe(prepared, _quiet(Cs=[1.0]), log=lines.append)
    embeddings = ["transformer.wte.weight", "lm_head.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad and n in embeddings] == trained
    others = [n for n, p in model.named_parameters() if p.requires_grad and n not in embeddings]
    assert bool(others) == (patterns != ["lm_head.weight"] and patterns != ["transformer.wte.weight"])
    assert any("by its own name" in line for line in lines) == (len(trained) == 1)
