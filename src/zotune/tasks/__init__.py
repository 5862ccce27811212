"""Tasks: a registry of named tasks, their data readers, the paper's prompts and custom tasks.

>>> from zotune.tasks import get_task
>>> task = get_task("sst2")
>>> splits = task.splits(None)                       # the bundled SST-2 sample
>>> task.render(splits.test[0], "causal").prompt     # doctest: +ELLIPSIS
"it 's a charming and often affecting journey . It was"

Registered (``list_tasks()``), with their kind and the model kinds they have templates for:

========  ===============  ================  ===========================
name      kind             model kinds       protocols (first = default)
========  ===============  ================  ===========================
sst2      classification   causal, masked    paper-causal, kshot
sst5      classification   masked            kshot
trec      classification   masked            kshot
snli      classification   masked            kshot
mnli      classification   masked            kshot
rte       classification   causal, masked    paper-causal, kshot
cb        classification   causal            paper-causal
boolq     classification   causal            paper-causal
wsc       classification   causal            paper-causal
wic       classification   causal            paper-causal
multirc   classification   causal            paper-causal
copa      multiple_choice  causal            paper-causal
record    multiple_choice  causal            paper-causal
squad     generation       causal            paper-causal
drop      generation       causal            paper-causal
========  ===============  ================  ===========================

Tasks are registered explicitly, here, by :func:`register`; nothing is discovered by scanning.
A classification task's prompt and label words can be replaced (``task.template``,
``task.label_words``: :mod:`zotune.tasks.templated`); a task of one's own data is a custom task
(:mod:`zotune.tasks.custom`).
"""

from __future__ import annotations

import difflib
import re

from zotune.tasks import glue, qa, superglue
from zotune.tasks.base import KINDS, MASK, MODEL_KINDS, PROTOCOLS, Instance, Splits, Task, TaskError

__all__ = [
    "KINDS",
    "MASK",
    "MODEL_KINDS",
    "PROTOCOLS",
    "Instance",
    "Splits",
    "Task",
    "TaskError",
    "get_task",
    "list_tasks",
    "register",
]

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` under ``task.name`` (lowercase letters, digits, ``_``; not yet taken). Returns it."""
    if not isinstance(task, Task):
        raise TaskError(f"register() takes a Task instance, got {type(task).__name__}")
    name = task.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TaskError(
            f"task name {name!r} is malformed: use lowercase letters, digits and '_', starting with a letter"
        )
    if name in _REGISTRY:
        raise TaskError(f"task {name!r} is already registered")
    if task.kind not in KINDS:
        raise TaskError(f"task {name!r} has kind {task.kind!r}; use one of {', '.join(KINDS)}")
    if not task.model_kinds or any(kind not in MODEL_KINDS for kind in task.model_kinds):
        raise TaskError(f"task {name!r} has model kinds {task.model_kinds!r}; use some of {', '.join(MODEL_KINDS)}")
    _REGISTRY[name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``; an unknown name suggests the closest ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    wanted = str(name).lower()
    # the most similar name; ties go to the earliest registered (sst3 -> sst2, not sst5)
    score, best = max(
        ((difflib.SequenceMatcher(None, wanted, known).ratio(), -order), known) for order, known in enumerate(_REGISTRY)
    )
    hint = f" did you mean {best!r}?" if score[0] >= 0.6 else ""
    raise TaskError(f"unknown task {name!r};{hint} known: {', '.join(list_tasks())}")


def list_tasks() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_REGISTRY)


for _task in (*glue.TASKS, *superglue.TASKS, *qa.TASKS):
    register(_task)
del _task
