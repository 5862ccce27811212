"""What a task is: where its data comes from, how an example becomes a prompt, and how it is scored.

A task is a small class registered by name. It reads its raw records (``load``), samples the splits
by the paper's protocol (``splits``), and renders each record into an :class:`Instance` for a model
kind (``render``). Scoring is shared (:mod:`zotune.objectives`) and chosen by ``Task.kind``:

- ``"classification"``: ``options`` are the label words (with their leading space, e.g. " great");
  a causal LM scores the next token after ``prompt``, a masked LM the token at :data:`MASK` in it.
- ``"multiple_choice"``: ``options`` are whole continuations of ``prompt``, scored by their
  log-likelihood (the paper's scoring of COPA and ReCoRD).
- ``"generation"``: ``target`` is the teacher-forced answer, ``answers`` the references for F1 and
  exact match against the greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["KINDS", "MASK", "Instance", "Splits", "Task", "TaskError"]

KINDS = ("classification", "multiple_choice", "generation")
MASK = "<mask>"  # where a masked LM predicts the label word; replaced by the tokenizer's own mask token


class TaskError(ValueError):
    """Bad task data or configuration: the message names the file, line or field."""


@dataclass(frozen=True)
class Instance:
    """One rendered example."""

    prompt: str  # the text before the answer (for masked LMs: contains MASK exactly once)
    options: tuple[str, ...] = ()  # label words or candidate continuations
    label: int | None = None  # index of the correct option
    target: str = ""  # generation: the answer text to teacher-force (with its leading space)
    answers: tuple[str, ...] = ()  # generation: the accepted answers, for F1 / exact match


@dataclass
class Splits:
    """Raw records of the three splits, with a note on how they were drawn."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    note: str = ""  # e.g. "train/validation/test sampled disjointly from the labelled validation file"


@dataclass
class Task:
    """Base class. Subclasses set the class attributes and implement ``splits`` and ``render``."""

    name: str = ""  # registry name, e.g. "sst2"
    kind: str = "classification"
    model_kinds: tuple[str, ...] = ("causal", "masked")  # which model kinds this template serves
    label_words: Sequence[str] = field(default_factory=tuple)  # for classification

    def splits(self, data_dir, *, seed: int = 0, train: int = 1000, validation: int = 500, test: int = 1000) -> Splits:
        raise NotImplementedError

    def render(self, record: dict, model_kind: str = "causal") -> Instance:
        raise NotImplementedError
