"""What a task is: where its data comes from, how an example becomes a prompt, and how it is scored.

A task is a small class registered by name. It reads its raw records and samples the splits by
one of the paper's protocols (``splits``), and renders each record into an :class:`Instance` for a
model kind (``render``). Scoring is shared (:mod:`zotune.objectives`) and chosen by ``Task.kind``:

- ``"classification"``: ``options`` are the label words (with their leading space, e.g. " great");
  a causal LM scores the next token after ``prompt``, a masked LM the token at :data:`MASK` in it.
- ``"multiple_choice"``: ``options`` are whole continuations of ``prompt``, scored by their
  log-likelihood (the paper's scoring of COPA and ReCoRD).
- ``"generation"``: ``target`` is the teacher-forced answer, ``answers`` the references for F1 and
  exact match against the greedy decoding.

Sampling protocols (``Task.splits(..., protocol=)``), see :mod:`zotune.tasks.sampling`:

- ``"paper-causal"``: the OPT experiments (MeZO §E.2): 1,000 train and 500 validation examples
  drawn disjointly from the official train split, 1,000 test examples from the official
  validation split, all by ``random.Random(seed)``.
- ``"kshot"``: the RoBERTa experiments (LM-BFF): ``k`` examples per class for train and again for
  validation (k = 16 or 512, seeds 13, 21, 42, 87, 100), tested on the full test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from zotune.errors import UserError

__all__ = ["KINDS", "MASK", "MODEL_KINDS", "PROTOCOLS", "Instance", "Splits", "Task", "TaskError"]

KINDS = ("classification", "multiple_choice", "generation")
MODEL_KINDS = ("causal", "masked")
PROTOCOLS = ("paper-causal", "kshot")
MASK = "<mask>"  # where a masked LM predicts the label word; replaced by the tokenizer's own mask token


class TaskError(UserError):
    """Bad task data or configuration: the message names the file, line or field."""


@dataclass(frozen=True)
class Instance:
    """One rendered example."""

    prompt: str  # the text before the answer (for masked LMs: contains MASK exactly once)
    options: tuple[str, ...] = ()  # label words or candidate continuations
    label: int | None = None  # index of the correct option (None: unlabelled record)
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
    protocols: tuple[str, ...] = ("paper-causal",)  # sampling protocols; the first is the default

    def splits(
        self,
        data_dir,
        *,
        seed: int = 0,
        train: int | None = None,
        validation: int | None = None,
        test: int | None = None,
        protocol: str | None = None,
        k: int = 16,
    ) -> Splits:
        """Sample the splits from ``data_dir`` (a folder laid out like ``shared/data``).

        ``train``/``validation``/``test`` of None take the protocol's sizes (paper-causal: 1000, 500,
        1000; kshot: k per class, k per class, the full test set); in ``kshot`` they are upper bounds.
        """
        raise NotImplementedError

    def render(self, record: dict, model_kind: str = "causal") -> Instance:
        raise NotImplementedError

    def check_model_kind(self, model_kind: str) -> None:
        """Raise :class:`TaskError` unless this task has a template for ``model_kind``."""
        if model_kind not in self.model_kinds:
            raise TaskError(
                f"task {self.name!r} has no template for {model_kind!r} models "
                f"(it supports: {', '.join(self.model_kinds)})"
            )
