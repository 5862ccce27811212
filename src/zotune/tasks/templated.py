"""Your own prompt for a registered classification task: ``task.template`` and ``task.label_words``.

A registered task renders the paper's prompt; a small model may read another one far better (on
the bundled SST-2 sample, SmolLM2-135M-Instruct scores 51.6 zero-shot with the paper's
``<sentence> It was`` / " terrible", " great" and 79.6 with ``Movie review: <sentence>\\nSentiment:``
/ " negative", " positive"; benchmarks/RESULTS.md). :class:`Retemplated` keeps the task's data,
splits and labels and replaces the prompt, the label words, or both::

    task:
      name: sst2
      template: "Movie review: {sentence}\\nSentiment:"   # {field}s of the task's records
      label_words: [" negative", " positive"]             # in the task's label order (labels 0, 1)

For a masked LM put ``{mask}`` where the label word goes. The fields a task's records have are
listed in the error a wrong placeholder raises (SST-2: ``sentence``; RTE: ``premise``,
``hypothesis``). Multiple-choice and generation tasks have no single prompt to replace: define a
custom task (``zotune.tasks.custom``) for those.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Sequence

from zotune.tasks.base import MASK, Instance, Splits, Task, TaskError
from zotune.tasks.custom import template_fields

__all__ = ["Retemplated"]


class Retemplated(Task):
    """``task`` with ``template`` (``{field}`` placeholders) and/or ``label_words`` of its own."""

    def __init__(self, task: Task, template: str | None = None, label_words: Sequence[str] | None = None):
        if task.kind != "classification":
            raise TaskError(
                f"task.template and task.label_words apply to classification tasks; {task.name} is "
                f"{task.kind.replace('_', '-')}: define a custom task (task.name: custom) for its prompt"
            )
        if template is None and label_words is None:
            raise TaskError("Retemplated needs a template, label words, or both")
        if template is not None:
            names = template_fields(template)
            if names.count("mask") > 1 or template.count("{mask}") > 1:
                raise TaskError("task.template may hold {mask} once (where a masked LM's label word goes)")
            self.fields = [n for n in names if n != "mask"]
            model_kinds = ("masked",) if "mask" in names else ("causal",)
        else:
            self.fields = []
            model_kinds = task.model_kinds
        words = tuple(label_words) if label_words is not None else tuple(task.label_words)
        if len(words) != len(task.label_words):
            known = ", ".join(f"{label} = {word!r}" for label, word in zip(task.labels, task.label_words))
            raise TaskError(
                f"task.label_words has {len(words)} words; {task.name} has {len(task.label_words)} "
                f"labels, in this order: {known}"
            )
        super().__init__(
            name=task.name, kind=task.kind, model_kinds=model_kinds, label_words=words, protocols=task.protocols
        )
        self.task, self.template = task, template

    def splits(self, data_dir, **options) -> Splits:
        return self.task.splits(data_dir, **options)

    def render(self, record: dict, model_kind: str = "causal") -> Instance:
        self.check_model_kind(model_kind)
        if self.template is None:  # the task's own prompt, other words
            return replace(self.task.render(record, model_kind), options=self.label_words)
        values = {}
        for name in self.fields:
            if name not in record:
                fields = ", ".join(str(k) for k in record if k != "label")
                raise TaskError(
                    f"task.template names {{{name}}}, which {self.name}'s records do not have (they have: {fields})"
                )
            value = record[name]
            values[name] = value if isinstance(value, str) else json.dumps(value)
        values["mask"] = MASK
        return Instance(self.template.format_map(values), self.label_words, self.task.label_index(record))
