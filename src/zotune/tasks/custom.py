"""Tasks defined by configuration alone: data files, a prompt template, and what to predict.

A :class:`CustomTaskConfig` names the files (``.jsonl``, ``.csv`` with a header row, or ``.tsv``
with a header row, read by extension), a ``template`` with ``{field}`` placeholders filled from each
record, and one of three things to predict:

- ``label_field`` + ``label_words``: classification; ``label_words`` maps each label value (written
  as a string; booleans as ``"true"``/``"false"``) to its word, in option order. For a masked LM put
  ``{mask}`` in the template where the word goes. Label words are used exactly as written: give
  them their leading space (``" great"``) when they follow a space in the text.
- ``options_field`` + ``label_field``: multiple choice; the record's options (a list, or in CSV a
  JSON list) are continuations of the prompt, each prefixed with ``option_prefix``; the label is the
  correct option's index or its text.
- ``target_field``: generation; the record's answer (a string, or a list of accepted answers whose
  first is the training target), prefixed with ``option_prefix``.

In a run configuration (YAML)::

    task:
      name: custom
      data_dir: data/reviews          # relative file paths below are read from here
      custom:
        name: reviews
        train: train.jsonl            # {"text": "...", "stars": 5}
        validation: dev.jsonl
        test: test.csv                # header: text,stars
        template: "Review: {text}\\nSentiment:"
        label_field: stars
        label_words: {"1": " bad", "5": " good"}

or, for a masked LM, ``template: "{text} It was {mask}."``. Splits: train and test are their files
(sampled down with ``random.Random(seed)`` when fewer are asked for); validation is its file, or,
without one, drawn from the train file disjointly from train.

Errors name the file and line: a template field a record lacks (listing the fields it has), a label
value not in ``label_words``, a malformed line, an empty file.
"""

from __future__ import annotations

import difflib
import json
import random
import string
from dataclasses import dataclass, fields
from pathlib import Path

from zotune.tasks.base import MASK, Instance, Splits, Task, TaskError
from zotune.tasks.readers import Rows, read_rows
from zotune.tasks.sampling import shrink

__all__ = ["CustomTask", "CustomTaskConfig", "template_fields"]

_SUFFIXES = (".jsonl", ".csv", ".tsv")


def _key(value) -> str:
    """A label value as written in ``label_words``: booleans as "true"/"false", the rest as str()."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a prompt template, in order; a malformed template is a one-line TaskError."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise TaskError(f"template is malformed ({err}); write literal braces as {{{{ and }}}}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.strip() or name.isdigit() or any(c in name for c in ".[]"):
            raise TaskError(
                f"template placeholder {{{name}}} is not a field name; use {{field}} with the "
                f"record's field, or {{mask}} for a masked LM's label word"
            )
        if name not in names:
            names.append(name)
    return names


@dataclass
class CustomTaskConfig:
    """A task from files and a template (see the module docstring for a YAML example)."""

    template: str = ""  # prompt with {field} placeholders; {mask} marks a masked LM's label word
    train: str | None = None  # training file (.jsonl, .csv, .tsv)
    validation: str | None = None  # validation file; None: drawn from the train file
    test: str | None = None  # test file
    label_field: str | None = None  # classification / multiple choice: the field holding the label
    label_words: dict | None = None  # classification: label value (as a string) -> word, in option order
    target_field: str | None = None  # generation: the field holding the answer (or list of answers)
    options_field: str | None = None  # multiple choice: the field holding the list of options
    option_prefix: str = " "  # put before each multiple-choice option and before the generation target
    name: str = "custom"  # the task's name in notes and errors

    def __post_init__(self):
        if not isinstance(self.template, str) or not self.template.strip():
            raise TaskError('custom task needs a template, e.g. template: "{sentence} It was"')
        names = template_fields(self.template)
        if not [n for n in names if n != "mask"]:
            raise TaskError("template has no {field} placeholder: name at least one field of the records")
        if self.template.count("{mask}") > 1:
            raise TaskError("template has {mask} more than once; a masked LM predicts one label word")
        chosen = [
            n
            for n, v in (
                ("label_words", self.label_words),
                ("target_field", self.target_field),
                ("options_field", self.options_field),
            )
            if v
        ]
        if len(chosen) != 1:
            raise TaskError(
                "custom task needs exactly one of label_words (classification), options_field "
                f"(multiple choice) or target_field (generation); got {', '.join(chosen) or 'none'}"
            )
        if self.label_words is not None:
            if not isinstance(self.label_words, dict) or len(self.label_words) < 2:
                raise TaskError(
                    'label_words must map at least two label values to words, e.g. {"0": " terrible", "1": " great"}'
                )
            self.label_words = {_key(k): str(v) for k, v in self.label_words.items()}
        if (self.label_words or self.options_field) and not self.label_field:
            raise TaskError(f"{chosen[0]} needs label_field: the field holding each record's label")
        if "mask" in names and not self.label_words:
            raise TaskError("{mask} is for masked-LM classification: give label_words, or drop {mask}")
        if not any((self.train, self.validation, self.test)):
            raise TaskError("custom task needs at least one data file: set train, validation and/or test")
        for split in ("train", "validation", "test"):
            path = getattr(self, split)
            if path is not None and Path(path).suffix.lower() not in _SUFFIXES:
                raise TaskError(f"{split} file {path} must end in {', '.join(_SUFFIXES)} (read by extension)")

    @classmethod
    def from_dict(cls, values: dict) -> "CustomTaskConfig":
        """Build from a mapping (e.g. YAML), rejecting unknown keys with a suggestion."""
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
                raise TaskError(f"unknown custom task key {key!r}{hint}")
        return cls(**values)

    @property
    def kind(self) -> str:
        if self.label_words:
            return "classification"
        return "multiple_choice" if self.options_field else "generation"

    @property
    def template_fields(self) -> list[str]:
        """The record fields the template names ({mask} excluded)."""
        return [n for n in template_fields(self.template) if n != "mask"]


class CustomTask(Task):
    """A task built from a :class:`CustomTaskConfig`."""

    def __init__(self, config: CustomTaskConfig):
        if not isinstance(config, CustomTaskConfig):
            raise TaskError(f"CustomTask takes a CustomTaskConfig, got {type(config).__name__}")
        masked = "{mask}" in config.template
        super().__init__(
            name=config.name,
            kind=config.kind,
            model_kinds=("masked",) if masked else ("causal",),
            label_words=tuple((config.label_words or {}).values()),
            protocols=("paper-causal",),
        )
        self.config = config

    # -- rendering -----------------------------------------------------------------------------
    def render(self, record: dict, model_kind: str = "causal") -> Instance:
        self.check_model_kind(model_kind)
        c = self.config
        values = {}
        for name in c.template_fields:
            if name not in record:
                raise TaskError(f"template field {name!r} is missing (available: {', '.join(map(str, record))})")
            values[name] = record[name] if isinstance(record[name], str) else json.dumps(record[name])
        values["mask"] = MASK
        prompt = c.template.format_map(values)
        if c.kind == "classification":
            return Instance(prompt, self.label_words, self._label(record, list(c.label_words)))
        if c.kind == "multiple_choice":
            options = self._field(record, c.options_field)
            if isinstance(options, str):
                try:
                    options = json.loads(options)
                except json.JSONDecodeError:
                    options = None
            if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
                raise TaskError(
                    f"options field {c.options_field!r} must be a list of at least two strings "
                    f"(in CSV: a JSON list), got {self._field(record, c.options_field)!r}"
                )
            label = self._label(record, [_key(i) for i in range(len(options))], options)
            return Instance(prompt, tuple(c.option_prefix + o for o in options), label)
        answers = self._field(record, c.target_field)
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            raise TaskError(
                f"target field {c.target_field!r} must be a non-empty string or list of strings, "
                f"got {self._field(record, c.target_field)!r}"
            )
        return Instance(prompt, target=c.option_prefix + answers[0], answers=tuple(answers))

    @staticmethod
    def _field(record: dict, name: str):
        if name not in record:
            raise TaskError(f"field {name!r} is missing (available: {', '.join(map(str, record))})")
        return record[name]

    def _label(self, record: dict, keys: list[str], texts: list[str] = ()) -> int | None:
        field = self.config.label_field
        if record.get(field) is None:
            return None
        value = record[field]
        if _key(value) in keys:
            return keys.index(_key(value))
        if value in texts:
            return list(texts).index(value)
        raise TaskError(
            f"label {value!r} in field {field!r} is not a known label (known: {', '.join(map(repr, keys))})"
        )

    # -- data ----------------------------------------------------------------------------------
    def load(self, path, data_dir=None) -> list[dict]:
        """Read one file and check every record renders (errors name its file and line)."""
        path = Path(path)
        if data_dir is not None and not path.is_absolute():
            path = Path(data_dir) / path
        rows: Rows = read_rows(path)
        labelled = self.kind != "generation"
        for i, record in enumerate(rows):
            try:
                instance = self.render(record, self.model_kinds[0])
            except TaskError as err:
                raise TaskError(f"{rows.where(i)}: {err}") from None
            if labelled and instance.label is None:
                raise TaskError(f"{rows.where(i)}: label field {self.config.label_field!r} is missing or empty")
        return list(rows)

    def splits(
        self,
        data_dir=None,
        *,
        seed: int = 0,
        train: int | None = None,
        validation: int | None = None,
        test: int | None = None,
        protocol: str | None = None,
        k: int = 16,
    ) -> Splits:
        """The files' records: train/test sampled down to ``train``/``test`` (None: all); validation
        from its file, or drawn from the train file (``validation`` of them, default none)."""
        if protocol not in (None, "paper-causal"):
            raise TaskError(f"custom tasks sample their files by 'paper-causal' only, got protocol {protocol!r}")
        c = self.config
        rng = random.Random(seed)
        pools = {
            split: self.load(getattr(c, split), data_dir) if getattr(c, split) else []
            for split in ("train", "validation", "test")
        }
        notes = [f"custom task {c.name!r}, seed {seed}"]
        if c.validation:
            train_rows = _take(pools["train"], train, rng, "train", notes)
            val_rows = _take(pools["validation"], validation, rng, "validation", notes)
        else:
            pool = pools["train"]
            n_val = validation or 0
            n_train = max(len(pool) - n_val, 0) if train is None else train
            n_train, n_val = shrink(len(pool), (n_train, n_val))
            idx = rng.sample(range(len(pool)), n_train + n_val)
            train_rows, val_rows = [pool[i] for i in idx[:n_train]], [pool[i] for i in idx[n_train:]]
            notes.append(f"train {n_train}, validation {n_val} drawn disjointly from {c.train} ({len(pool)})")
        test_rows = _take(pools["test"], test, rng, "test", notes)
        return Splits(train_rows, val_rows, test_rows, note="; ".join(notes))


def _take(rows: list, n: int | None, rng: random.Random, name: str, notes: list) -> list:
    if n is None or n >= len(rows):
        return rows
    if n < 0:
        raise TaskError(f"{name} must be a non-negative integer, got {n}")
    notes.append(f"{name}: {n} of {len(rows)} drawn")
    return [rows[i] for i in rng.sample(range(len(rows)), n)]
