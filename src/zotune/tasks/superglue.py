"""SuperGLUE tasks for causal LMs: CB, BoolQ, WSC, WiC, MultiRC (classification), COPA, ReCoRD (multiple choice).

Templates are MeZO's (``large_models/templates.py``, from PromptSource; paper Appendix E.2, Table 15).
The classification prompts end in a newline, so the options carry no leading space. Options are
listed in label order: ``Instance.label`` indexes them.

======== ===================================================================== ========================
task     prompt                                                                options (label order)
======== ===================================================================== ========================
cb       ``Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or     "Yes", "No", "Maybe"
         Maybe?\\n``                                                            (entailment, contradiction,
                                                                               neutral)
boolq    ``<passage> <Question>?\\n`` (question capitalised, "?" added if       "Yes", "No" (true, false)
         missing)
wsc      ``<text>\\nIn the previous sentence, does the pronoun "<span2>" refer  "No", "Yes" (false, true)
         to <span1>? Yes or No?\\n`` (span2 lowercased, as MeZO does)
wic      ``Does the word "<word>" have the same meaning in these two           "No", "Yes" (false, true)
         sentences? Yes, No?\\n<s1>\\n<s2>\\n``
multirc  ``<paragraph>\\nQuestion: <question>\\nI found this answer "<answer>".   "No", "Yes" (0, 1)
         Is that correct? Yes or No?\\n``
copa     ``<premise without final "."> so`` (effect) / ``because`` (cause)     " <choice1>", " <choice2>"
                                                                               (first word lowercased
                                                                               unless it is "I")
record   ``<passage, "@highlight\\n" -> "- ">\\n-``                              " <query with @placeholder
                                                                               = entity>" per entity
======== ===================================================================== ========================

Deviations from MeZO's strings: COPA's and ReCoRD's separating space moves from the end of the
prompt to the start of each option (MeZO: ``premise + " because "`` then ``choice``; the
concatenated text is identical and the option tokenises as a word with its space). ReCoRD's
entities are the distinct entity strings sorted (the HF SuperGLUE convention MeZO used); the label
is the first entity that is an answer (different answer strings for one query are rare).

Data (``data_dir/<folder>/``): the ``mice_*``/``jiant_*`` SuperGLUE jsonl files. Paper-causal
protocol: train/validation from the train file, test from the validation file, except BoolQ (only
its labelled validation file is here: all three splits drawn disjointly from it) and ReCoRD (only
FewGLUE's 32 training and 32 dev queries: train/validation split the 32 training queries 2:1, test =
the 32 dev queries). Records are the jsonl objects as they are; MultiRC and ReCoRD are flattened (see
:func:`zotune.tasks.readers.read_multirc` / :func:`~zotune.tasks.readers.read_record`).
"""

from __future__ import annotations

from dataclasses import dataclass

from zotune.tasks.base import Instance, TaskError
from zotune.tasks.readers import read_jsonl, read_multirc, read_record
from zotune.tasks.sampling import FileTask, Source

__all__ = ["TASKS", "BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "WSC", "WiC"]


@dataclass
class _SuperGLUE(FileTask):
    """Paper-causal only, causal LMs only; ``train_file``/``test_file`` in ``folder``."""

    model_kinds: tuple = ("causal",)
    protocols: tuple = ("paper-causal",)
    train_file: str = "mice_train.jsonl"
    test_file: str | None = "mice_val.jsonl"  # None: the train file is the only labelled pool

    def paper_sources(self):
        test = None if self.test_file is None else [Source(self.test_file, read_jsonl)]
        return [Source(self.train_file, read_jsonl)], test

    def render(self, record, model_kind="causal"):
        self.check_model_kind(model_kind)
        return Instance(self.prompt(record), tuple(self.label_words), self.label_index(record))

    def prompt(self, record: dict) -> str:
        """The classification prompt of ``record``."""
        raise NotImplementedError


@dataclass
class CB(_SuperGLUE):
    """CommitmentBank: 0 entailment ("Yes"), 1 contradiction ("No"), 2 neutral ("Maybe")."""

    name: str = "cb"
    folder: str = "CB"
    label_words: tuple = ("Yes", "No", "Maybe")
    labels: tuple = ("entailment", "contradiction", "neutral")

    def prompt(self, record):
        return f'Suppose {record["premise"]} Can we infer that "{record["hypothesis"]}"? Yes, No, or Maybe?\n'


@dataclass
class BoolQ(_SuperGLUE):
    """BoolQ: 0 true ("Yes"), 1 false ("No"). All splits come from the labelled validation file."""

    name: str = "boolq"
    folder: str = "BoolQ"
    label_words: tuple = ("Yes", "No")
    labels: tuple = ("true", "false")
    train_file: str = "mice_val.jsonl"
    test_file: str | None = None

    def prompt(self, record):
        question = record["question"].strip()
        if not question.endswith("?"):
            question += "?"
        question = question[:1].upper() + question[1:]
        return f"{record['passage']} {question}\n"  # MeZO BoolQTemplateV3, its default


@dataclass
class WSC(_SuperGLUE):
    """Winograd schema: 0 false ("No"), 1 true ("Yes")."""

    name: str = "wsc"
    folder: str = "WSC"
    label_words: tuple = ("No", "Yes")
    labels: tuple = ("false", "true")
    train_file: str = "jiant_train.jsonl"
    test_file: str | None = "jiant_val.jsonl"

    def prompt(self, record):
        target = record["target"]
        return (
            f"{record['text']}\nIn the previous sentence, does the pronoun "
            f'"{target["span2_text"].lower()}" refer to {target["span1_text"]}? Yes or No?\n'
        )


@dataclass
class WiC(_SuperGLUE):
    """Word in context: 0 false ("No"), 1 true ("Yes")."""

    name: str = "wic"
    folder: str = "WiC"
    label_words: tuple = ("No", "Yes")
    labels: tuple = ("false", "true")

    def prompt(self, record):
        return (
            f'Does the word "{record["word"]}" have the same meaning in these two sentences? Yes, No?\n'
            f"{record['sentence1']}\n{record['sentence2']}\n"
        )


@dataclass
class MultiRC(_SuperGLUE):
    """MultiRC, one record per (question, answer): 0 incorrect ("No"), 1 correct ("Yes")."""

    name: str = "multirc"
    folder: str = "MultiRC"
    label_words: tuple = ("No", "Yes")
    labels: tuple = ("0", "1")
    train_file: str = "mice_train_original.jsonl"
    test_file: str | None = "mice_val_original.jsonl"

    def paper_sources(self):
        return [Source(self.train_file, read_multirc)], [Source(self.test_file, read_multirc)]

    def prompt(self, record):
        return (
            f"{record['paragraph']}\nQuestion: {record['question']}\n"
            f'I found this answer "{record["answer"]}". Is that correct? Yes or No?\n'
        )


def _copa_choice(choice: str) -> str:
    # MeZO CopaTemplate(capitalization="correct"): lowercase the first word unless it is "I"
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " " + " ".join(words)


@dataclass
class COPA(_SuperGLUE):
    """COPA, multiple choice between two continuations; label 0 = choice1, 1 = choice2."""

    name: str = "copa"
    folder: str = "COPA"
    kind: str = "multiple_choice"
    labels: tuple = ("0", "1")

    def render(self, record, model_kind="causal"):
        self.check_model_kind(model_kind)
        conjunction = {"effect": " so", "cause": " because"}.get(record["question"])
        if conjunction is None:
            raise TaskError(f"COPA question must be 'cause' or 'effect', got {record['question']!r}")
        premise = record["premise"].rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        options = (_copa_choice(record["choice1"]), _copa_choice(record["choice2"]))
        return Instance(premise + conjunction, options, self.label_index(record))


@dataclass
class ReCoRD(_SuperGLUE):
    """ReCoRD, multiple choice over the passage's entities filling the query's @placeholder."""

    name: str = "record"
    folder: str = "ReCoRD"
    kind: str = "multiple_choice"
    train_file: str = "ptuning_fewglue32dev_train.jsonl"
    test_file: str | None = "ptuning_fewglue32dev_dev32.jsonl"

    def paper_sources(self):
        return [Source(self.train_file, read_record)], [Source(self.test_file, read_record)]

    def render(self, record, model_kind="causal"):
        self.check_model_kind(model_kind)
        entities = list(record["entities"])
        if not entities:
            raise TaskError("ReCoRD record has no entities to choose from")
        # MeZO ReCoRDTemplateGPT3: passage with "@highlight\n" -> "- ", then "\n- " + filled query
        prompt = record["passage"].replace("@highlight\n", "- ") + "\n-"
        options = tuple(" " + record["query"].replace("@placeholder", entity) for entity in entities)
        answers = record.get("answers") or ()
        label = next((i for i, entity in enumerate(entities) if entity in answers), None)
        if answers and label is None:
            raise TaskError(f"none of the answers {list(answers)!r} is among the passage's entities")
        return Instance(prompt, options, label)


TASKS = (CB(), BoolQ(), WSC(), WiC(), MultiRC(), COPA(), ReCoRD())
