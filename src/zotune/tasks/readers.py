"""Readers for the task data formats, each read as its source wrote it.

Every reader returns :class:`Rows`: a list of dicts that also remembers where each record came
from (``rows.where(i)`` -> ``"path:line"``), so later checks can name the file and line. Every
failure is a :class:`TaskError` naming the path (and the line, and what is wrong):

=========================  ===============================================================
``read_tsv``               tab-separated, with a header row or with ``fieldnames`` given
                           (SST-2 ``alps_*``/``dpt_sentlevel_*``/LM-BFF, SST-5 ``dpt_*.tsv``)
``read_csv``               comma-separated with CSV quoting, header or ``fieldnames``
                           (SST-5 / TREC ``label,text``)
``read_label_text``        ``label<space>text`` lines (SST-2 ``dpt_sentlevel_test.tsv``,
                           TREC ``dpt_TREC.*.all``)
``read_json_records``      one JSON object keyed by index, or a JSON list
                           (``ppft_glue_pretrain_*.json``)
``read_jsonl``             one JSON object per line (SuperGLUE, gennli, SQuAD, DROP)
``read_multirc``           MultiRC passages flattened to one record per (question, answer)
``read_record``            ReCoRD passages flattened to one record per query
=========================  ===============================================================
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from zotune.tasks.base import TaskError

__all__ = [
    "Rows",
    "read_csv",
    "read_json_records",
    "read_jsonl",
    "read_label_text",
    "read_multirc",
    "read_record",
    "read_rows",
    "read_tsv",
]


class Rows(list):
    """A list of record dicts that knows the file and the location of each record."""

    def __init__(self, path, records=(), locations=()):
        super().__init__(records)
        self.path = Path(path)
        self.locations = list(locations)  # one per record: a line number or a JSON key

    def append_at(self, record: dict, location) -> None:
        self.append(record)
        self.locations.append(location)

    def where(self, i: int) -> str:
        """``"path:line"`` (or ``"path[key]"`` for JSON objects keyed by index) of record ``i``."""
        loc = self.locations[i] if i < len(self.locations) else "?"
        return f"{self.path}:{loc}" if isinstance(loc, int) else f"{self.path}[{loc}]"


def _read_text(path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"data file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise TaskError(f"cannot read {path}: {err.strerror or err}") from None


def _nonempty(rows: Rows) -> Rows:
    if not rows:
        raise TaskError(f"{rows.path}: no records (the file is empty)")
    return rows


def _lines(text: str):
    """(line number, line) for the non-blank lines, line endings removed."""
    # split on "\n" only: str.splitlines would also break at U+2028 and friends inside texts
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def read_tsv(path, *, fieldnames=None, ragged_last: bool = False) -> Rows:
    """Tab-separated rows, no quoting (GLUE style: quotes are ordinary characters).

    Args:
        fieldnames: the column names when the file has no header row; None reads the header.
        ragged_last: accept rows with more columns than the header and give the last header field
            the row's last column (SNLI's files list a variable number of annotator labels before
            ``gold_label``). Otherwise every row must have exactly the header's columns.
    """
    lines = _lines(_read_text(path))
    if fieldnames is None:
        first = next(lines, None)
        if first is None:
            raise TaskError(f"{path}: no records (the file is empty)")
        fieldnames = first[1].split("\t")
    fieldnames = list(fieldnames)
    rows = Rows(path)
    for number, line in lines:
        cells = line.split("\t")
        if len(cells) != len(fieldnames):
            if ragged_last and len(cells) > len(fieldnames):
                cells = cells[: len(fieldnames) - 1] + cells[-1:]
            else:
                raise TaskError(
                    f"{path}:{number}: expected {len(fieldnames)} tab-separated columns "
                    f"({', '.join(fieldnames)}), got {len(cells)}"
                )
        rows.append_at(dict(zip(fieldnames, cells)), number)
    return _nonempty(rows)


def read_csv(path, *, fieldnames=None) -> Rows:
    """Comma-separated rows with standard CSV quoting (a quoted field may hold commas and newlines).

    Args:
        fieldnames: the column names when the file has no header row; None reads the header.
    """
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows = Rows(path)
    start = 1
    try:
        for cells in reader:
            number, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if fieldnames is None:
                fieldnames = cells
                continue
            if len(cells) != len(fieldnames):
                raise TaskError(
                    f"{path}:{number}: expected {len(fieldnames)} comma-separated columns "
                    f"({', '.join(fieldnames)}), got {len(cells)}"
                )
            rows.append_at(dict(zip(fieldnames, cells)), number)
    except csv.Error as err:
        raise TaskError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return _nonempty(rows)


def read_label_text(path, *, fieldnames=("label", "text")) -> Rows:
    """``label<space>text`` lines: the label is everything before the first space."""
    rows = Rows(path)
    for number, line in _lines(_read_text(path)):
        label, sep, text = line.partition(" ")
        if not sep or not text.strip():
            raise TaskError(f"{path}:{number}: expected 'label text', got {line[:60]!r}")
        rows.append_at(dict(zip(fieldnames, (label, text))), number)
    return _nonempty(rows)


def read_jsonl(path) -> Rows:
    """One JSON object per line; blank lines are skipped."""
    rows = Rows(path)
    for number, line in _lines(_read_text(path)):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise TaskError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        rows.append_at(record, number)
    return _nonempty(rows)


def read_json_records(path) -> Rows:
    """A JSON object keyed by index (``{"0": {...}, "1": {...}}``, in key order) or a JSON list."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict):
        try:
            keys = sorted(data, key=int)
        except ValueError:
            raise TaskError(f'{path}: expected a JSON object keyed by index ("0", "1", ...)') from None
        items = [(key, data[key]) for key in keys]
    elif isinstance(data, list):
        items = list(enumerate(data))
    else:
        raise TaskError(f"{path}: expected a JSON object keyed by index or a list, got {type(data).__name__}")
    rows = Rows(path)
    for key, record in items:
        if not isinstance(record, dict):
            raise TaskError(f"{path}[{key}]: expected a JSON object, got {type(record).__name__}")
        rows.append_at(record, str(key))
    return _nonempty(rows)


def _field(record, key, path, number, what="passage"):
    if not isinstance(record, dict) or key not in record:
        raise TaskError(f"{path}:{number}: {what} has no {key!r} field")
    return record[key]


def _entries(record, key, path, number, what="passage") -> list[dict]:
    """The list of objects under ``key`` (questions, answers, entities, qas)."""
    value = _field(record, key, path, number, what)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise TaskError(f"{path}:{number}: {what}'s {key!r} must be a list of JSON objects, got {str(value)[:60]}")
    return value


def read_multirc(path) -> Rows:
    """MultiRC's passage -> questions -> answers, flattened to one record per (question, answer).

    Each record: ``paragraph``, ``question``, ``answer`` (texts), ``label`` (1 if the answer is
    correct, absent in unlabelled files) and ``idx`` = {paragraph, question, answer}, like the
    flattened SuperGLUE release; its location is the passage's line.
    """
    rows = Rows(path)
    for number, passage_record in _located(read_jsonl(path)):
        passage = _field(passage_record, "passage", path, number, "record")
        paragraph = _field(passage, "text", path, number)
        for question in _entries(passage, "questions", path, number):
            q_text = _field(question, "question", path, number, "question")
            for answer in _entries(question, "answers", path, number, "question"):
                record = {
                    "paragraph": paragraph,
                    "question": q_text,
                    "answer": _field(answer, "text", path, number, "answer"),
                    "idx": {
                        "paragraph": passage_record.get("idx"),
                        "question": question.get("idx"),
                        "answer": answer.get("idx"),
                    },
                }
                if "label" in answer:
                    record["label"] = answer["label"]
                rows.append_at(record, number)
    return _nonempty(rows)


def read_record(path) -> Rows:
    """ReCoRD passages flattened to one record per query.

    Each record: ``passage`` (text, with its ``@highlight`` lines), ``query`` (with
    ``@placeholder``), ``entities`` (the distinct entity strings of the passage, sorted, as in the
    HF SuperGLUE release), ``answers`` (the distinct answer strings, in order; empty when
    unlabelled), ``idx`` and ``source``. Entity spans are inclusive: ``text[start:end + 1]``.
    """
    rows = Rows(path)
    for number, item in _located(read_jsonl(path)):
        passage = _field(item, "passage", path, number, "record")
        text = _field(passage, "text", path, number)
        if not isinstance(text, str):
            raise TaskError(f"{path}:{number}: the passage's 'text' must be a string")
        entities = set()
        for span in _entries(passage, "entities", path, number):
            start, end = span.get("start"), span.get("end")
            if not (isinstance(start, int) and isinstance(end, int)):
                raise TaskError(f"{path}:{number}: entity spans need integer 'start' and 'end'")
            entities.add(text[start : end + 1])
        for qa in _entries(item, "qas", path, number, "record"):
            answers = []
            for answer in _entries(qa, "answers", path, number, "qas entry") if "answers" in qa else ():
                a_text = _field(answer, "text", path, number, "answer")
                if a_text not in answers:
                    answers.append(a_text)
            rows.append_at(
                {
                    "passage": text,
                    "query": _field(qa, "query", path, number, "qas entry"),
                    "entities": sorted(entities),
                    "answers": answers,
                    "idx": qa.get("idx"),
                    "source": item.get("source"),
                },
                number,
            )
    return _nonempty(rows)


def _located(rows: Rows):
    return zip(rows.locations, rows)


_BY_SUFFIX = {".jsonl": read_jsonl, ".json": read_json_records, ".csv": read_csv, ".tsv": read_tsv}


def read_rows(path) -> Rows:
    """Read a headed file by its extension: ``.jsonl``, ``.json``, ``.csv`` or ``.tsv``."""
    reader = _BY_SUFFIX.get(Path(path).suffix.lower())
    if reader is None:
        raise TaskError(f"{path}: unsupported file type {Path(path).suffix!r}; use one of {', '.join(_BY_SUFFIX)}")
    return reader(path)
