"""Extractive and discrete-reasoning QA as generation for causal LMs: SQuAD v1.1 and DROP.

Templates are MeZO's (``large_models/templates.py``: ``SQuADv2Template``, used for SQuAD, and
``DROPTemplate``; paper Appendix E.2):

- squad: ``Title: <title>\\nContext: <context>\\nQuestion: <question>\\nAnswer:``
- drop: ``Passage: <passage>\\nQuestion: <question>\\nAnswer:``

``target`` is ``" " + answers[0]``; ``answers`` are all accepted answers (distinct, in order) for F1
and exact match. Deviation: MeZO teacher-forces ``" <answer>\\n"`` -- the newline teaches the model to
stop, and MeZO's decoding stops at it -- while ``target`` here is the answer alone, as the
:class:`~zotune.tasks.base.Instance` contract asks; :data:`STOP` is that newline, for the decoder.

DROP answers follow the HF ``drop`` release MeZO read (``answers_spans``): for the main answer and
each validated answer, a number gives its string, spans give each span as its own accepted answer,
a date gives ``"day month year"`` (the parts present).

Data: SQuAD ``train-v1.1-subset.jsonl`` (11,877 questions of 44 train articles) as the train pool,
``dev-v1.1.jsonl`` (the whole official dev set) as the test pool. DROP has only ``drop_1000.jsonl``:
its ``origin`` field splits it into 572 questions from the official train file (the train pool,
split 2:1 into train and validation when short) and 428 from the official dev file (the test pool),
so no passage is shared between training and test.
"""

from __future__ import annotations

from dataclasses import dataclass

from zotune.tasks.base import Instance, TaskError
from zotune.tasks.readers import Rows, read_jsonl
from zotune.tasks.sampling import FileTask, Source

__all__ = ["DROP", "STOP", "SQuAD", "TASKS", "drop_answers"]

STOP = "\n"  # MeZO ends its generation targets with a newline and stops decoding there


def _distinct(texts) -> tuple[str, ...]:
    out = []
    for text in texts:
        if text and text not in out:
            out.append(text)
    return tuple(out)


@dataclass
class _QA(FileTask):
    kind: str = "generation"
    model_kinds: tuple = ("causal",)
    protocols: tuple = ("paper-causal",)

    def render(self, record, model_kind="causal"):
        self.check_model_kind(model_kind)
        prompt, answers = self.prompt_and_answers(record)
        if not answers:
            raise TaskError(f"{self.name} record has no answer text")
        return Instance(prompt, target=" " + answers[0], answers=answers)

    def prompt_and_answers(self, record: dict) -> tuple[str, tuple[str, ...]]:
        """The prompt of ``record`` and its accepted answers (the first is the training target)."""
        raise NotImplementedError


@dataclass
class SQuAD(_QA):
    """SQuAD v1.1: records ``{id, title, context, question, answers: [{text, answer_start}]}``."""

    name: str = "squad"
    folder: str = "SQuAD"

    def paper_sources(self):
        return [Source("train-v1.1-subset.jsonl", read_jsonl)], [Source("dev-v1.1.jsonl", read_jsonl)]

    def prompt_and_answers(self, record):
        prompt = (
            f"Title: {record['title']}\nContext: {record['context']}\nQuestion: {record['question'].strip()}\nAnswer:"
        )
        return prompt, _distinct(a["text"].strip() for a in record["answers"])


def _answer_texts(answer: dict) -> list[str]:
    number = answer.get("number")
    if number not in (None, ""):
        return [str(number).strip()]
    spans = [s.strip() for s in answer.get("spans") or () if s and s.strip()]
    if spans:
        return spans
    date = answer.get("date") or {}
    text = " ".join(str(date.get(part) or "").strip() for part in ("day", "month", "year")).split()
    return [" ".join(text)] if text else []


def drop_answers(record: dict) -> tuple[str, ...]:
    """The accepted answer strings of a DROP record: main answer first, then validated answers."""
    texts = []
    for answer in [record["answer"], *(record.get("validated_answers") or ())]:
        texts += _answer_texts(answer)
    return _distinct(texts)


@dataclass
class DROP(_QA):
    """DROP: records ``{passage_id, passage, query_id, question, answer, validated_answers, origin}``."""

    name: str = "drop"
    folder: str = "DROP"

    def paper_sources(self):
        return [Source("drop_1000.jsonl", _read_origin("drop_dataset_train"), part="official train questions")], [
            Source("drop_1000.jsonl", _read_origin("drop_dataset_dev"), part="official dev questions")
        ]

    def prompt_and_answers(self, record):
        return f"Passage: {record['passage']}\nQuestion: {record['question'].strip()}\nAnswer:", drop_answers(record)


def _read_origin(prefix: str):
    """A reader of ``drop_1000.jsonl`` keeping the records whose ``origin`` starts with ``prefix``."""

    def read(path):
        rows = read_jsonl(path)
        keep = [i for i, record in enumerate(rows) if str(record.get("origin", "")).startswith(prefix)]
        if not keep:
            raise TaskError(f"{path}: no record has an 'origin' starting with {prefix!r}")
        return Rows(rows.path, [rows[i] for i in keep], [rows.locations[i] for i in keep])

    return read


TASKS = (SQuAD(), DROP())
