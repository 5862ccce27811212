"""The linear-probing baseline: features are the LM head's inputs at the scored positions, the probe
learns what is linearly there, multiple choice gets one prediction per instance, bad input is refused."""

import json
import types

import numpy as np
import pytest
import torch
import tiny

from zotune.baselines.probe import ProbeConfig, features, linear_probe
from zotune.config import ConfigError, RunConfig
from zotune.objectives import Objective
from zotune.tasks import MASK, Instance, TaskError
from zotune.train import prepare

FILLERS = ["the cat", "a film", "the mat", "it was", "one two", "Paris", "the acting", "so it"]
WORDS = {"0": " terrible", "1": " great"}


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _sentiment(n: int, offset: int = 0) -> list[dict]:
    """The label is which of two words the text holds; the fillers say nothing about it."""
    return [{"text": f"{FILLERS[(i // 2 + offset) % len(FILLERS)]} {'great good' if i % 2 else 'terrible bad'}",
             "label": i % 2} for i in range(n)]


def _prepare(model_dir, tmp_path, custom: dict, *, validation=8):
    config = RunConfig()
    config.model.name = str(model_dir)
    config.task.name, config.task.validation = "custom", validation
    config.task.custom = custom
    return prepare(config, log=lambda s: None)


def _classification(model_dir, tmp_path, template="{text}", validation=8, train=24):
    return _prepare(model_dir, tmp_path, dict(
        train=_write(tmp_path / "train.jsonl", _sentiment(train + validation)),
        test=_write(tmp_path / "test.jsonl", _sentiment(8, offset=3)),
        template=template, label_field="label", label_words=WORDS), validation=validation)


def _quiet(**kwargs) -> ProbeConfig:
    return ProbeConfig(**{"progress": False, **kwargs})


def _full_logits(model, sequence) -> torch.Tensor:
    ids = torch.tensor([list(sequence)])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


def test_causal_features_are_the_head_inputs_at_the_scored_position(model_dir, tmp_path):
    prepared = _classification(model_dir, tmp_path)
    model, objective, train = prepared.loaded.model, prepared.objective, prepared.encoded["train"]
    X = features(objective, model, train, batch_size=5)  # uneven batches, padded
    assert X.shape == (len(train), model.config.hidden_size) and X.dtype == np.float32
    np.testing.assert_allclose(features(objective, model, train, batch_size=1), X, rtol=1e-5, atol=1e-5)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for i in (0, 7):
            expected = _full_logits(model, train[i].sequences[0])[train[i].positions[0][0]]
            torch.testing.assert_close(torch.from_numpy(X[i]) @ head.T, expected, rtol=1e-4, atol=1e-4)


def test_masked_features_are_taken_at_the_mask():
    tok, model = tiny.tokenizer(masked=True), tiny.masked_lm("roberta")
    objective = Objective("classification", tok, "masked", [" great", " terrible"])
    encoded = [objective.encode(Instance(f"{text} . It was {MASK} .", (" great", " terrible"), i % 2))
               for i, text in enumerate(["the movie was good", "a terrible film", "bad"])]
    X = features(objective, model, encoded)
    assert X.shape == (3, model.config.hidden_size)
    decoder = model.get_output_embeddings()
    with torch.no_grad():
        for x, e in zip(X, encoded):
            expected = _full_logits(model, e.sequences[0])[e.positions[0][0]]
            torch.testing.assert_close(decoder(torch.from_numpy(x)), expected, rtol=1e-4, atol=1e-4)


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
    assert {k: v for k, v in again.items() if k != "wall_time_s"} == {k: v for k, v in result.items()
                                                                       if k != "wall_time_s"}  # deterministic
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
            out.append({"q": f"{FILLERS[i % len(FILLERS)]} . It was", "choices": options,
                        "answer": options.index("great")})
        return out

    prepared = _prepare(model_dir, tmp_path, dict(
        train=_write(tmp_path / "train.jsonl", records(24)), test=_write(tmp_path / "test.jsonl", records(9)),
        template="{q}", options_field="choices", label_field="answer"), validation=6)
    objective, encoded = prepared.objective, prepared.encoded
    X = features(objective, prepared.loaded.model, encoded["test"])
    assert X.shape == (sum(len(e.sequences) for e in encoded["test"]), 32)
    assert not np.allclose(X[0], X[1])  # one-token options still get different features
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
    prepared = _prepare(model_dir, tmp_path, dict(
        train=_write(tmp_path / "qa.jsonl", [{"q": "one two", "a": "three"}] * 4), template="{q}",
        target_field="a"), validation=0)
    with pytest.raises(TaskError, match="linear probing applies to classification and multiple-choice tasks"):
        linear_probe(prepared, _quiet(), log=lambda s: None)
    with pytest.raises(TaskError, match="linear probing applies"):
        features(prepared.objective, prepared.loaded.model, prepared.encoded["train"])
    positive = [r for r in _sentiment(8) if r["label"] == 1]
    one_class = _prepare(model_dir, tmp_path, dict(
        train=_write(tmp_path / "pos.jsonl", positive), template="{text}", label_field="label",
        label_words=WORDS), validation=0)
    with pytest.raises(TaskError, match="single label"):
        linear_probe(one_class, _quiet(), log=lambda s: None)


@pytest.mark.parametrize("kwargs,field", [
    (dict(Cs=[]), "probe.Cs"), (dict(Cs=[0.1, -1.0]), "probe.Cs"), (dict(Cs=[float("inf")]), "probe.Cs"),
    (dict(max_iter=0), "probe.max_iter"), (dict(batch_size=0), "probe.batch_size"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ProbeConfig(**kwargs)
    assert ProbeConfig(Cs=0.5).Cs == [0.5]
