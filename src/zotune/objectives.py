"""Turning rendered instances into losses and predictions, computing only the logits that matter.

Three scorings, by task kind (:mod:`zotune.tasks.base`):

- classification: the label words' logits at one position (the next token for a causal LM, the mask
  for a masked LM); loss = cross-entropy over the label words (LM-BFF / MeZO "prompt-based"
  fine-tuning); prediction = argmax. Label words must be single tokens (with ``task.scoring: options``
  they are scored as whole options instead, as multiple choice).
- multiple choice: every option is appended to the prompt and scored by its mean token
  log-likelihood; loss = cross-entropy over the options' scores; prediction = argmax.
- generation: loss = teacher-forced cross-entropy of the target tokens; prediction = greedy decoding
  up to a newline; metrics: SQuAD-style F1 and exact match.

Wherever possible the full vocabulary projection is skipped: the model's output embedding is
swapped, for one forward, for a head that computes only the selected rows and positions
(:func:`selective_head`). That works for any Hugging Face LM whose forward ends in
``get_output_embeddings()``.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zotune.tasks.base import MASK, Instance, TaskError

__all__ = [
    "CPU_FORWARD_OVERHEAD",
    "Encoded",
    "Objective",
    "evaluate",
    "evaluate_split",
    "exact_match",
    "f1_score",
    "hidden_at",
    "length_slices",
    "make_objective",
    "metric_objective",
    "selective_head",
]


@dataclass(frozen=True)
class Encoded:
    """Token ids of one instance, ready to batch."""

    sequences: tuple[tuple[int, ...], ...]  # one sequence (classification, generation) or one per option
    positions: tuple[tuple[int, ...], ...]  # per sequence: the positions whose next-token logits are scored
    targets: tuple[tuple[int, ...], ...]  # per sequence: the token expected at each scored position
    label: int | None
    prompt: tuple[int, ...] = ()  # generation: the prompt alone, for decoding
    answers: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """Its longest sequence in tokens: what a batch pads it to."""
        return max(len(s) for s in self.sequences)


@contextlib.contextmanager
def selective_head(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, vocab: torch.Tensor | None):
    """Within the context, the model's logits are only ``hidden[rows, cols] @ W[vocab].T`` (+ bias).

    The output is a 2-D tensor (selected positions x selected vocabulary); ``vocab=None`` keeps the
    whole vocabulary at the selected positions.
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TaskError(f"{type(model).__name__} has no output embedding to score label words with")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        h = hidden[rows, cols]
        weight = head.weight if vocab is None else head.weight[vocab]
        out = h @ weight.T
        bias = getattr(head, "bias", None)
        if bias is not None:
            out = out + (bias if vocab is None else bias[vocab])
        return out

    head.forward = forward  # an instance attribute shadows the class's forward for this one module
    try:
        yield
    finally:
        del head.forward


# What one more forward costs on a CPU, in padded tokens' worth (per-layer op dispatch, small matmuls'
# lower efficiency). Fitted side by side on SmolLM2-135M, 2 cores (benchmarks/slices.py; RESULTS.md,
# "Length-sorted slices"): mostly 2 slices of SST-2's batches of 16, 3 of RTE's and BoolQ's, 1 of COPA's;
# within 9% of the best of 1, 2 and 4 slices on each, and 1.35x (SST-2) to 1.6x (RTE, BoolQ) faster than one.
CPU_FORWARD_OVERHEAD = 150


def length_slices(shapes: Sequence[tuple[int, int]], overhead: int | None) -> list[int]:
    """Sizes of the consecutive slices to run a length-sorted batch in: fewest padded tokens + overheads.

    ``shapes`` are (width, rows) per example, sorted by width (rows: sequences per example, e.g. the
    options of a multiple-choice question). A slice costs rows x its widest width in padded tokens,
    plus ``overhead`` for its forward; ``overhead=None`` means one forward (an accelerator, where
    a bigger batch is nearly free). An exact dynamic programme over the split points: a batch is
    tens of examples, so O(n^2) is nothing, and no library partitions by this cost.
    """
    n = len(shapes)
    if overhead is None or n <= 1:
        return [n] if n else []
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # the slice i..j-1; its width is the widest, shapes[j-1]'s
            rows += shapes[i][1]
            cost = best[i] + overhead + rows * shapes[j - 1][0]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    sizes, j = [], n
    while j:
        sizes.append(j - cut[j])
        j = cut[j]
    return sizes[::-1]


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(_normalize_answer(prediction) == _normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 of ``prediction`` against the best-matching answer."""
    best = 0.0
    pred = _normalize_answer(prediction).split()
    for answer in answers:
        gold = _normalize_answer(answer).split()
        common = collections.Counter(pred) & collections.Counter(gold)
        same = sum(common.values())
        if not pred or not gold:
            best = max(best, float(pred == gold))
        elif same:
            precision, recall = same / len(pred), same / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


class Objective:
    """Loss, predictions and metric of one task on one tokenizer / model kind.

    Args:
        kind: the task kind ("classification", "multiple_choice", "generation").
        tokenizer: the model's tokenizer.
        model_kind: "causal" or "masked".
        label_words: classification only: the words whose logits are compared.
        max_length: longest sequence in tokens; prompts are cut from the left to fit.
        max_new_tokens: generation: longest decoded answer.
    """

    def __init__(
        self,
        kind: str,
        tokenizer,
        model_kind: str,
        label_words: Sequence[str] = (),
        *,
        max_length: int = 512,
        max_new_tokens: int = 32,
    ):
        if kind == "generation" and model_kind != "causal":
            raise TaskError("generation tasks need a causal LM")
        if kind == "multiple_choice" and model_kind != "causal":
            raise TaskError("multiple-choice scoring needs a causal LM")
        self.kind, self.tokenizer, self.model_kind = kind, tokenizer, model_kind
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.metric_name = "f1" if kind == "generation" else "accuracy"
        self.label_ids: list[int] = []
        if kind == "classification":
            for word in label_words:
                ids = tokenizer(word, add_special_tokens=False)["input_ids"]
                if len(ids) != 1:
                    pieces = tokenizer.convert_ids_to_tokens(ids)
                    raise TaskError(
                        f"label word {word!r} is {len(ids)} tokens for this tokenizer ({pieces}); classification "
                        "scores a single next token: choose single-token label words, or score each label word "
                        "as a whole option with --task.scoring options"
                    )
                self.label_ids.append(ids[0])

    # -- encoding ----------------------------------------------------------------------------
    def _ids(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _fit(self, prompt: list[int], tail: int) -> list[int]:
        room = self.max_length - tail
        if room < 1:
            raise TaskError(f"an answer of {tail} tokens does not fit max_length={self.max_length}")
        return prompt[-room:] if len(prompt) > room else prompt

    def encode(self, instance: Instance) -> Encoded:
        if self.kind == "classification":
            if self.model_kind == "masked":
                if instance.prompt.count(MASK) != 1:
                    raise TaskError(f"a masked-LM prompt needs exactly one {MASK}: {instance.prompt[:80]!r}")
                ids = self._ids(instance.prompt.replace(MASK, self.tokenizer.mask_token))
                at = ids.index(self.tokenizer.mask_token_id)
                if len(ids) > self.max_length:  # cut the text before the mask, keep the mask and the end
                    cut = len(ids) - self.max_length
                    ids = ids[:1] + ids[1 + cut :] if at > cut else ids[: self.max_length]
                    at = ids.index(self.tokenizer.mask_token_id)
                return Encoded((tuple(ids),), ((at,),), ((0,),), instance.label)
            ids = self._fit(self._ids(instance.prompt), 0)
            return Encoded((tuple(ids),), ((len(ids) - 1,),), ((0,),), instance.label)
        if self.kind == "multiple_choice":
            prompt = self._ids(instance.prompt)
            sequences, positions, targets = [], [], []
            for option in instance.options:
                tail = self._ids(option, special=False)
                head = self._fit(prompt, len(tail))
                sequences.append(tuple(head + tail))
                positions.append(tuple(range(len(head) - 1, len(head) + len(tail) - 1)))
                targets.append(tuple(tail))
            return Encoded(tuple(sequences), tuple(positions), tuple(targets), instance.label)
        prompt = self._ids(instance.prompt)
        tail = self._ids(instance.target, special=False)
        if self.tokenizer.eos_token_id is not None:
            tail = tail + [self.tokenizer.eos_token_id]
        head = self._fit(prompt, len(tail))
        return Encoded(
            (tuple(head + tail),),
            (tuple(range(len(head) - 1, len(head) + len(tail) - 1)),),
            (tuple(tail),),
            None,
            tuple(self._fit(prompt, self.max_new_tokens)),
            instance.answers,
        )

    # -- scoring -----------------------------------------------------------------------------
    def _device(self, model) -> torch.device:
        return next(model.parameters()).device

    def _logits(self, model, sequences, positions, vocab) -> torch.Tensor:
        """Logits at the given (sequence, position) pairs, flattened in order; vocab=None: all of it."""
        ids, mask = _pad(sequences, self.tokenizer.pad_token_id, self._device(model))
        rows = torch.tensor([i for i, ps in enumerate(positions) for _ in ps], device=ids.device)
        cols = torch.tensor([p for ps in positions for p in ps], device=ids.device)
        with selective_head(model, rows, cols, vocab):
            return model(input_ids=ids, attention_mask=mask).logits.float()

    def _option_scores(self, model, batch: Sequence[Encoded]) -> list[torch.Tensor]:
        """Mean log-likelihood of each option (multiple choice), one tensor per instance."""
        sequences = [s for e in batch for s in e.sequences]
        positions = [p for e in batch for p in e.positions]
        targets = torch.tensor([t for e in batch for ts in e.targets for t in ts], device=self._device(model))
        logp = torch.log_softmax(self._logits(model, sequences, positions, None), dim=-1)
        token_logp = logp.gather(1, targets[:, None]).squeeze(1)
        lengths = [len(p) for e in batch for p in e.positions]
        per_option = torch.stack([chunk.mean() for chunk in token_logp.split(lengths)])
        return list(per_option.split([len(e.sequences) for e in batch]))

    def _label_logits(self, model, batch: Sequence[Encoded]) -> torch.Tensor:
        vocab = torch.tensor(self.label_ids, device=self._device(model))
        return self._logits(model, [e.sequences[0] for e in batch], [e.positions[0] for e in batch], vocab)

    def loss(self, model, batch: Sequence[Encoded], chunks: int = 1) -> torch.Tensor:
        """The training loss of a batch (a scalar tensor).

        ``chunks > 1`` sorts the batch by length and runs that many forward passes over consecutive
        slices, so short examples are not padded to the longest one: the same loss (up to float
        summation order) for fewer FLOPs, which pays on a CPU. ``chunks=0`` chooses the slices: on a
        CPU those of :func:`length_slices` (padding saved against a forward's overhead), elsewhere one
        forward. Losses are summed per example (per target token for generation) and divided once,
        so chunking does not reweight anything.
        """
        if chunks != 1 and len(batch) > 1:
            batch = sorted(batch, key=lambda e: e.width)
        sizes = self._slices(model, batch, chunks)
        total, count, start = None, 0, 0
        for size in sizes:
            part_sum, part_count = self._loss_sum(model, batch[start : start + size])
            total = part_sum if total is None else total + part_sum
            count += part_count
            start += size
        return total / count

    def _slices(self, model, batch: Sequence[Encoded], chunks: int) -> list[int]:
        """The sizes of the consecutive slices the forward passes take (see :meth:`loss`'s ``chunks``)."""
        if chunks == 0:
            overhead = CPU_FORWARD_OVERHEAD if self._device(model).type == "cpu" else None
            return length_slices([(e.width, len(e.sequences)) for e in batch], overhead)
        size = -(-len(batch) // max(1, chunks))
        return [min(size, len(batch) - start) for start in range(0, len(batch), size)]

    def losses(self, model, batch: Sequence[Encoded], chunks: int = 1) -> torch.Tensor:
        """The per-example training losses (B,), in the batch's order: what :class:`zotune.GRZO` normalises.

        The forward passes take the batch's rows in order (an example's options are consecutive rows), in one
        pass or (``chunks`` as :meth:`loss`'s, without its sorting: sort the batch by width first to save
        padding) in consecutive slices. Their mean is :meth:`loss` for classification and multiple choice; for
        generation each example's is its mean over its target tokens."""
        sizes = self._slices(model, batch, chunks) if chunks != 1 and len(batch) > 1 else [len(batch)]
        parts, start = [], 0
        for size in sizes:
            parts.append(self._losses(model, batch[start : start + size]))
            start += size
        return torch.cat(parts)

    def _losses(self, model, batch: Sequence[Encoded]) -> torch.Tensor:
        device = self._device(model)
        if self.kind == "classification":
            labels = torch.tensor([e.label for e in batch], device=device)
            return F.cross_entropy(self._label_logits(model, batch), labels, reduction="none")
        if self.kind == "multiple_choice":
            scores = self._option_scores(model, batch)
            return torch.stack([-torch.log_softmax(s, 0)[e.label] for s, e in zip(scores, batch)])
        sequences = [e.sequences[0] for e in batch]
        positions = [e.positions[0] for e in batch]
        targets = torch.tensor([t for e in batch for t in e.targets[0]], device=device)
        tokens = F.cross_entropy(self._logits(model, sequences, positions, None), targets, reduction="none")
        return torch.stack([part.mean() for part in tokens.split([len(e.targets[0]) for e in batch])])

    def rows(self, batch: Sequence[Encoded]) -> list[int]:
        """The rows each example takes in :meth:`losses`'s forwards (its options; 1 for the other kinds)."""
        return [len(e.sequences) if self.kind == "multiple_choice" else 1 for e in batch]

    def _loss_sum(self, model, batch: Sequence[Encoded]) -> tuple[torch.Tensor, int]:
        """(sum of the per-example or per-token losses, how many were summed)."""
        device = self._device(model)
        if self.kind == "classification":
            labels = torch.tensor([e.label for e in batch], device=device)
            return F.cross_entropy(self._label_logits(model, batch), labels, reduction="sum"), len(batch)
        if self.kind == "multiple_choice":
            scores = self._option_scores(model, batch)
            return torch.stack([-torch.log_softmax(s, 0)[e.label] for s, e in zip(scores, batch)]).sum(), len(batch)
        sequences = [e.sequences[0] for e in batch]
        positions = [e.positions[0] for e in batch]
        targets = torch.tensor([t for e in batch for t in e.targets[0]], device=device)
        logits = self._logits(model, sequences, positions, None)
        return F.cross_entropy(logits, targets, reduction="sum"), len(targets)

    @torch.no_grad()
    def predict(self, model, batch: Sequence[Encoded]) -> list:
        """Predicted option indices (classification, multiple choice) or decoded strings (generation)."""
        if self.kind == "classification":
            return self._label_logits(model, batch).argmax(-1).tolist()
        if self.kind == "multiple_choice":
            return [int(s.argmax()) for s in self._option_scores(model, batch)]
        return [self._greedy(model, e.prompt) for e in batch]

    def _greedy(self, model, prompt: Sequence[int]) -> str:
        ids = torch.tensor([list(prompt)], device=self._device(model))
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        text = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return text.split("\n")[0].strip()

    def metrics(self, predictions: Sequence, batch: Sequence[Encoded]) -> dict[str, float]:
        """accuracy, or f1 and exact_match (generation), in [0, 1]."""
        if not batch:
            return {self.metric_name: float("nan")}
        if self.kind == "generation":
            f1 = sum(f1_score(p, e.answers) for p, e in zip(predictions, batch)) / len(batch)
            em = sum(exact_match(p, e.answers) for p, e in zip(predictions, batch)) / len(batch)
            return {"f1": f1, "exact_match": em}
        return {"accuracy": sum(int(p == e.label) for p, e in zip(predictions, batch)) / len(batch)}


def hidden_at(
    objective: Objective, model, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
) -> torch.Tensor:
    """The final hidden states (what the output embedding receives) at the given positions.

    One row per (sequence, position) pair, in order: shape (pairs, hidden size). These are the vectors
    whose products with the output embedding's rows are the logits the objective scores; a linear probe
    fits them (:mod:`zotune.baselines.probe`). As :func:`selective_head`, the output embedding's forward is
    swapped for one forward, so no vocabulary projection is computed.

    Example::

        e = objective.encode(instance)
        h = hidden_at(objective, model, e.sequences, e.positions)  # classification: (1, hidden size)
    """
    ids, mask = _pad(sequences, objective.tokenizer.pad_token_id, objective._device(model))
    rows = torch.tensor([i for i, ps in enumerate(positions) for _ in ps], device=ids.device)
    cols = torch.tensor([p for ps in positions for p in ps], device=ids.device)
    head = model.get_output_embeddings()
    if head is None:
        raise TaskError(f"{type(model).__name__} has no output embedding to read hidden states at")
    captured = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        # Kept here rather than read from the output: some models post-process their logits (soft-capping).
        captured.append(hidden[rows, cols])
        return captured[-1]

    head.forward = forward
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        del head.forward
    return captured[0]


def make_objective(
    task, tokenizer, model_kind: str, label_words: Sequence[str] | None = None, scoring: str = "auto", **kwargs
) -> Objective:
    """The objective of a :class:`zotune.tasks.Task` for this tokenizer and model kind.

    ``label_words`` defaults to the task's; pass the rendered options where they depend on the model kind.
    ``scoring="options"`` scores a classification task's label words as whole options (multiple choice),
    which allows label words of several tokens.
    """
    words = getattr(task, "label_words", ()) if label_words is None else label_words
    kind = task.kind
    if scoring == "options" and kind == "classification":
        kind = "multiple_choice"  # the label words become whole options, scored by their log-likelihood
    return Objective(kind, tokenizer, model_kind, words, **kwargs)


def evaluate(
    objective: Objective, model, encoded: Sequence[Encoded], batch_size: int = 32, progress: Callable | None = None
) -> dict[str, float]:
    """The objective's metrics over ``encoded``, in batches (progress(n) is called after each batch)."""
    # Batches of similar lengths waste little on padding; predictions go back to the original order.
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].width)
    predictions: list = [None] * len(encoded)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        for i, p in zip(chosen, objective.predict(model, [encoded[i] for i in chosen])):
            predictions[i] = p
        if progress is not None:
            progress(len(chosen))
    model.train(was_training)
    return objective.metrics(predictions, encoded)


def evaluate_split(
    objective: Objective, model, encoded: Sequence[Encoded], batch_size: int, split: str, show: bool = True
) -> dict[str, float]:
    """:func:`evaluate` with a progress bar over ``split``'s examples (gone when done; ``show=False``: none)."""
    from tqdm.auto import tqdm

    with tqdm(
        total=len(encoded), desc=f"eval {split}", unit="ex", leave=False, disable=not show, dynamic_ncols=True
    ) as bar:
        return evaluate(objective, model, encoded, batch_size, progress=bar.update)


def _macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Macro-averaged F1 over the classes that occur in predictions or labels."""
    scores = []
    for c in set(predictions) | set(labels):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def metric_objective(objective: Objective, metric: str | Callable) -> Callable:
    """A non-differentiable MeZO objective: ``(model, batch) -> -metric`` of the batch's predictions.

    MeZO needs only loss values, so it can maximise what gradients cannot: ``"accuracy"``, ``"f1"``
    (SQuAD F1 for generation, macro-F1 over labels otherwise; accuracy of generation is exact match), or a ``reward(predictions, references)
    -> float`` (a callable or a ``"module:function"`` path). References are the labels (classification,
    multiple choice) or the lists of accepted answers (generation). The paper's §3.3 / Table 5.

    Example::

        # rewards.py
        def reward(predictions, references):
            return sum(p == r for p, r in zip(predictions, references)) - 0.1 * sum(predictions)

        zotune train --train.objective rewards:reward
    """
    if isinstance(metric, str) and metric not in ("accuracy", "f1"):
        import importlib
        import os
        import sys

        from zotune.config import ConfigError

        module_name, _, function = metric.partition(":")
        sys.path.insert(0, os.getcwd())  # the `zotune` script's sys.path lacks the working directory
        try:
            metric = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigError(f"train.objective {metric!r}: cannot load it ({err})") from None
        finally:
            sys.path.remove(os.getcwd())
        if not callable(metric):
            raise ConfigError(f"train.objective {module_name}:{function} is not a function")

    def negative(model, batch: Sequence[Encoded]) -> torch.Tensor:
        predictions = objective.predict(model, batch)
        references = [e.answers if objective.kind == "generation" else e.label for e in batch]
        if callable(metric):
            value = float(metric(predictions, references))
        elif metric == "f1" and objective.kind != "generation":
            value = _macro_f1(predictions, references)
        elif objective.kind == "generation":  # accuracy of generated answers: exact match
            value = objective.metrics(predictions, batch)["f1" if metric == "f1" else "exact_match"]
        else:
            value = objective.metrics(predictions, batch)["accuracy"]
        return torch.tensor(-value)

    return negative
