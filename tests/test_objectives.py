"""Scoring: the selective head equals the full logits, and each task kind's loss, predictions and metric."""

import random

import pytest
import tiny
import torch
from conftest import ulp32

from zotune.objectives import Objective, evaluate, exact_match, f1_score, length_slices
from zotune.tasks.base import MASK, Instance, TaskError

CAUSAL = ["llama", "opt", "gpt2"]
MASKED = ["roberta", "bert"]


def _tol(value: torch.Tensor) -> float:
    """How far two float32 evaluations of a tiny model's scores may be apart when batched or padded otherwise.

    A logit of these 2-layer models (hidden 32, MLP 64, <= 20 tokens) passes through K ~ 600 rounded sums
    (norms, projections, attention, the head; a log-softmax over the 400 words), each within 2^-24 of its
    terms' size, which the norms keep at the logits' scale (|logit| ~ 1). Their signs are independent: ~sqrt(K)
    ulp per evaluation, 4 of those each for the two: 8 sqrt(600) ~ 200 ulp of max(|value|, 1) (a score or
    loss carries its logits' errors). Measured <= 2 ulp, also with ATEN_CPU_CAPABILITY=default.
    """
    return 8 * 600**0.5 * ulp32(max(float(value.abs().max()), 1.0))


def _full_logits(model, encoded, tokenizer):
    from zotune.objectives import _pad

    ids, mask = _pad([s for e in encoded for s in e.sequences], tokenizer.pad_token_id, "cpu")
    return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("family", CAUSAL)
def test_causal_classification_uses_only_label_logits(family):
    tok, model = tiny.tokenizer(), tiny.causal_lm(family)
    obj = Objective("classification", tok, "causal", [" terrible", " great"])
    instances = [
        Instance("the movie was great . It was", (" terrible", " great"), 1),
        Instance("a bad film . It was", (" terrible", " great"), 0),
    ]
    encoded = [obj.encode(i) for i in instances]
    with torch.no_grad():
        selected = obj._label_logits(model, encoded)
        full = _full_logits(model, encoded, tok)
    lengths = [len(e.sequences[0]) for e in encoded]
    expected = torch.stack([full[i, n - 1, obj.label_ids] for i, n in enumerate(lengths)])
    torch.testing.assert_close(selected, expected, rtol=0, atol=_tol(expected))  # a position one off: all fail
    with torch.no_grad():
        loss = obj.loss(model, encoded)
    # cross-entropy moves by at most twice its logits' largest error (its gradient in them has l1 norm <= 2)
    ce = torch.nn.functional.cross_entropy(expected, torch.tensor([1, 0]))
    torch.testing.assert_close(loss, ce, rtol=0, atol=2 * _tol(expected))
    assert obj.predict(model, encoded) == expected.argmax(-1).tolist()
    # The model's output head is back to normal afterwards.
    assert model(input_ids=torch.tensor([[5, 6]])).logits.shape[-1] == len(tok)


@pytest.mark.parametrize("family", MASKED)
def test_masked_classification_scores_the_mask(family):
    tok, model = tiny.tokenizer(masked=True), tiny.masked_lm(family)
    obj = Objective("classification", tok, "masked", [" great", " terrible"])
    enc = obj.encode(Instance(f"the movie was good . It was {MASK} .", (" great", " terrible"), 0))
    at = enc.positions[0][0]
    assert enc.sequences[0][at] == tok.mask_token_id
    assert enc.sequences[0][0] == tok.bos_token_id and enc.sequences[0][-1] == tok.eos_token_id
    with torch.no_grad():
        selected = obj._label_logits(model, [enc])
        full = _full_logits(model, [enc], tok)
    torch.testing.assert_close(selected[0], full[0, at, obj.label_ids], rtol=0, atol=_tol(selected))
    with pytest.raises(TaskError, match="exactly one <mask>"):
        obj.encode(Instance("no mask here", (" great", " terrible"), 0))


def test_multi_token_label_word_is_explained():
    with pytest.raises(TaskError, match=r"label word ' Parisian' is \d+ tokens .* --task.scoring options"):
        Objective("classification", tiny.tokenizer(), "causal", [" great", " Parisian"])


@pytest.mark.parametrize("family", CAUSAL)
def test_multiple_choice_scores_mean_option_log_likelihood(family):
    tok, model = tiny.tokenizer(), tiny.causal_lm(family)
    obj = Objective("multiple_choice", tok, "causal")
    inst = Instance("the cat sat on the mat because", (" it was tired", " the movie was great and boring"), 0)
    enc = obj.encode(inst)
    with torch.no_grad():
        scores = obj._option_scores(model, [enc])[0]
        full = torch.log_softmax(_full_logits(model, [enc], tok), -1)
    for k, (positions, targets) in enumerate(zip(enc.positions, enc.targets)):
        expected = torch.stack([full[k, p, t] for p, t in zip(positions, targets)]).mean()
        torch.testing.assert_close(scores[k], expected, rtol=0, atol=_tol(expected))
    with torch.no_grad():
        loss = obj.loss(model, [enc])
    # the loss's own forward of the same batch (equal here): a log-softmax over the options moves by at most
    # twice their scores' largest error
    torch.testing.assert_close(loss, -torch.log_softmax(scores, 0)[0], rtol=0, atol=2 * _tol(scores.max()))


@pytest.mark.parametrize("family", CAUSAL)
def test_generation_loss_is_teacher_forced_on_the_answer(family):
    tok, model = tiny.tokenizer(), tiny.causal_lm(family)
    obj = Objective("generation", tok, "causal", max_new_tokens=4)
    inst = Instance("Question : what is the answer ? Answer :", target=" Paris", answers=("Paris",))
    enc = obj.encode(inst)
    seq = torch.tensor([enc.sequences[0]])
    labels = torch.full_like(seq, -100)
    labels[0, -len(enc.targets[0]) :] = torch.tensor(enc.targets[0])
    with torch.no_grad():
        expected = model(input_ids=seq, labels=labels).loss  # HF shifts labels by one internally
        loss = obj.loss(model, [enc])
    torch.testing.assert_close(loss, expected, rtol=0, atol=_tol(expected))
    prediction = obj.predict(model, [enc])
    assert isinstance(prediction[0], str)
    assert set(obj.metrics(prediction, [enc])) == {"f1", "exact_match"}


def test_long_prompts_are_cut_from_the_left():
    tok = tiny.tokenizer()
    obj = Objective("classification", tok, "causal", [" great", " terrible"], max_length=6)
    enc = obj.encode(Instance("the movie was great and the acting was good . It was", (" great", " terrible"), 0))
    assert len(enc.sequences[0]) == 6
    assert tok.decode(enc.sequences[0]).endswith("It was")
    with pytest.raises(TaskError, match="does not fit max_length=2"):
        Objective("multiple_choice", tok, "causal", max_length=2).encode(
            Instance("the cat", (" the movie was great and boring",), 0)
        )


def test_squad_f1_and_exact_match():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert f1_score("Eiffel", ["eiffel tower"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert f1_score("in Paris France", ["Paris", "London"]) == pytest.approx(0.5)
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalise to nothing


def test_evaluate_reports_accuracy():
    tok, model = tiny.tokenizer(), tiny.causal_lm("llama")
    obj = Objective("classification", tok, "causal", [" terrible", " great"])
    encoded = [obj.encode(Instance(f"review {i} . It was", (" terrible", " great"), i % 2)) for i in range(10)]
    predictions = obj.predict(model, encoded)
    expected = sum(int(p == e.label) for p, e in zip(predictions, encoded)) / 10
    assert evaluate(obj, model, encoded, batch_size=3) == {"accuracy": expected}


@pytest.mark.parametrize("kind", ["classification", "multiple_choice", "generation"])
def test_chunked_loss_equals_the_whole_batch(kind):
    tok, model = tiny.tokenizer(), tiny.causal_lm("llama")
    obj = Objective(kind, tok, "causal", [" terrible", " great"] if kind == "classification" else ())
    words = [
        "the movie was great",
        "a terrible film , it was bad and boring and the acting was good",
        "bad",
        "It was great and the cat sat on the mat",
        "boring",
        "the acting was good",
    ]
    if kind == "classification":
        instances = [Instance(f"{w} . It was", (" terrible", " great"), i % 2) for i, w in enumerate(words)]
    elif kind == "multiple_choice":
        instances = [Instance(w, (" so it slept", " because it was tired and bad"), i % 2) for i, w in enumerate(words)]
    else:
        instances = [
            Instance(f"Question : {w} ? Answer :", target=" Paris" if i % 2 else " one two three", answers=("Paris",))
            for i, w in enumerate(words)
        ]
    encoded = [obj.encode(i) for i in instances]
    with torch.no_grad():
        whole = obj.loss(model, encoded)
        for chunks in (0, 2, 3, 6):  # 0: the slices length_slices chooses on a CPU
            # other pads and batches (a mean of chunk means, which reweighs tokens, is 4e-3 off for generation)
            torch.testing.assert_close(obj.loss(model, encoded, chunks=chunks), whole, rtol=0, atol=_tol(whole))
        # GRZO's per-example losses: in the batch's order however sliced; their mean is the loss but for generation
        each = obj.losses(model, encoded)
        assert each.shape == (len(encoded),) and obj.rows(encoded) == [2 if kind == "multiple_choice" else 1] * 6
        if kind != "generation":  # (there each example's loss is its own token mean)
            torch.testing.assert_close(each.mean(), whole, rtol=0, atol=_tol(whole))
        for chunks in (0, 2, 3):
            torch.testing.assert_close(obj.losses(model, encoded, chunks=chunks), each, rtol=0, atol=_tol(whole))


def _brute_force_cost(shapes, overhead):
    """The cheapest split of a sorted batch into consecutive slices, trying every split."""
    n, best = len(shapes), float("inf")
    for mask in range(1 << (n - 1)):
        cost, start = 0, 0
        for j in range(1, n + 1):
            if j == n or mask >> (j - 1) & 1:
                cost += overhead + sum(r for _, r in shapes[start:j]) * shapes[j - 1][0]
                start = j
        best = min(best, cost)
    return best


def test_length_slices_finds_the_cheapest_split():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        shapes = sorted((rng.randint(1, 300), rng.choice([1, 1, 2, 4])) for _ in range(n))
        overhead = rng.choice([0, 50, 150, 1000])
        sizes = length_slices(shapes, overhead)
        assert sum(sizes) == n and min(sizes) >= 1
        cost, start = 0, 0
        for size in sizes:
            cost += overhead + sum(r for _, r in shapes[start : start + size]) * shapes[start + size - 1][0]
            start += size
        assert cost == _brute_force_cost(shapes, overhead)


def test_length_slices_splits_only_where_padding_outweighs_a_forward():
    assert length_slices([(10, 1)] * 8 + [(200, 1)] * 8, 150) == [8, 8]  # 8 x 190 padded tokens saved
    assert length_slices([(10, 1)] * 15 + [(12, 1)], 150) == [16]  # 30 saved: not worth a forward
    assert length_slices([(10, 1)] * 8 + [(200, 1)] * 8, None) == [16]  # an accelerator: one forward
    assert length_slices([], 150) == [] and length_slices([(5, 2)], 150) == [1]
