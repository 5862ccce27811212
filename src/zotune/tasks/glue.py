"""GLUE-style single-sentence and sentence-pair classification: SST-2, SST-5, TREC, SNLI, MNLI, RTE.

Templates (MeZO Appendix E.2; strings checked against princeton-nlp/MeZO ``large_models/templates.py``
for causal LMs and LM-BFF's ``run_experiment.sh`` templates, which MeZO's ``medium_models`` use, for
masked LMs). Options are listed in label order: ``Instance.label`` indexes them.

====== ====== ========================================================== =================================
task   model  prompt                                                     options (label order)
====== ====== ========================================================== =================================
sst2   causal ``<S> It was``                                             " terrible", " great" (0, 1)
sst2   masked ``<S> It was <mask>.``                                     " terrible", " great" (0, 1)
sst5   masked ``<S> It was <mask>.``                                     " terrible", " bad", " okay",
                                                                         " good", " great" (0 .. 4)
trec   masked ``<mask>: <S>``                                            " Description", " Entity",
                                                                         " Expression", " Human",
                                                                         " Location", " Number" (0 .. 5)
snli,  masked ``<S1 without final punctuation>? <mask>, <s2>``           " Yes", " Maybe", " No" (entailment,
mnli                                                                     neutral, contradiction)
rte    causal ``<S1>\\nDoes this mean that "<S2>" is true? Yes or No?\\n`` "Yes", "No" (entailment,
                                                                         not_entailment)
rte    masked ``<S1 without final punctuation>? <mask>, <s2>``           " Yes", " No" (same order)
====== ====== ========================================================== =================================

``<s2>`` is S2 with its first letter lowercased (LM-BFF's ``*+sentl_1*``). Deviations from LM-BFF:

- Spacing only: LM-BFF builds ``*sent_0*_It_was*mask*.`` -- the mask right after " was", the period
  right after the mask. We write ``It was <mask>.``; RoBERTa's ``<mask>`` absorbs the space on its
  left, so a RoBERTa tokenizer gives LM-BFF's tokens (the paper's table writes ``It was [MASK] .``
  for readability). The same holds for ``? <mask>,``.
- LM-BFF's ``*sent-_0*`` drops S1's last character whatever it is; we drop it only when it is
  ``.``, ``?`` or ``!``, so MNLI premises without final punctuation keep their last letter.

Data (``data_dir/<folder>/``): SST-2 ``alps_*.tsv`` (GLUE; ``alps_train`` + ``alps_dev`` = the GLUE
train split, ``alps_test`` = GLUE dev, the usual test set); SST-5 ``dpt_*.tsv`` (``label<TAB>text``);
TREC ``dpt_*.csv`` (``label,text``); SNLI/MNLI ``ppft_glue_pretrain_{train,dev}.json`` (both from
the official train split) and ``gennli_dev.jsonl`` (the official dev set, used as test); RTE
``jiant_{train,val}.jsonl``; and LM-BFF's 16-shot files in ``lmbff_kshot/``. Records are normalised
to ``{"sentence", "label"}`` (single sentence, integer label) or ``{"premise", "hypothesis", "label"}``
(pairs, label as its name).

With ``data_dir=None``, ``sst2`` returns the bundled sample in ``zotune/data/sst2`` (see its
PROVENANCE.txt): 1,000 train and 500 validation GLUE-train sentences and the 872-sentence GLUE dev.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from zotune.tasks.base import MASK, Instance, Splits, TaskError
from zotune.tasks.readers import read_csv, read_json_records, read_jsonl, read_tsv
from zotune.tasks.sampling import LMBFF_SEEDS, FileTask, Source, shrink

__all__ = ["MNLI", "RTE", "SNLI", "SST2", "SST5", "TASKS", "TREC", "build_sst2_bundle", "bundled_sst2_splits"]


def _int_label(value):
    """``"1"`` -> 1; anything else is left for ``label_index`` to reject by name."""
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else value


def _sentence(field: str):
    return lambda row: {"sentence": row[field].strip(), "label": _int_label(row["label"])}


def _pair(premise: str, hypothesis: str, label: str = "label"):
    return lambda row: {"premise": row[premise], "hypothesis": row[hypothesis], "label": row[label]}


def _without_final_punctuation(text: str) -> str:
    text = text.rstrip()
    return text[:-1] if text[-1:] in (".", "?", "!") else text


def _lower_first(text: str) -> str:
    text = text.strip()
    return text[:1].lower() + text[1:]


def _nli_masked(record: dict) -> str:
    # LM-BFF: *cls**sent-_0*?*mask*,*+sentl_1**sep+*
    return f"{_without_final_punctuation(record['premise'])}? {MASK}, {_lower_first(record['hypothesis'])}"


@dataclass
class _LmbffTask(FileTask):
    """Shared kshot sources: LM-BFF's 16-shot files for k=16 and its seeds, else the pool to sample."""

    lmbff_ext: str = "tsv"  # extension of the lmbff_kshot files
    lmbff_dev: str = "dev"  # name of the 16-shot dev file ("dev_matched" for MNLI)
    lmbff_read: tuple = ()  # read options of the lmbff files
    lmbff_test: bool = True  # whether lmbff_kshot has a 16-{seed}_test file

    def _lmbff(self, split: str, seed: int) -> str:
        return f"lmbff_kshot/16-{seed}_{split}.{self.lmbff_ext}"

    def kshot_sources(self, k, seed):
        pool, test, convert = self._kshot_pool()
        if k != 16 or seed not in LMBFF_SEEDS:
            return pool, test, None
        read, opts = (
            (read_csv, (("fieldnames", ("label", "text")),)) if self.lmbff_ext == "csv" else (read_tsv, self.lmbff_read)
        )
        fixed = [Source(self._lmbff(split, seed), read, convert, opts) for split in ("train", self.lmbff_dev)]
        fixed.append(Source(self._lmbff("test", seed), read, convert, opts) if self.lmbff_test else None)
        return pool, test, tuple(fixed)

    def _kshot_pool(self):
        """(train-pool sources, test sources, converter of the lmbff rows)."""
        raise NotImplementedError


_SST2_TSV = _sentence("sentence")


@dataclass
class SST2(_LmbffTask):
    """SST-2 sentiment. Label 0 = negative (" terrible"), 1 = positive (" great").

    With a data_dir, paper-causal draws train/validation from all of GLUE train (67,349 rows, mostly
    phrases), as MeZO did; the bundled sample (data_dir=None) keeps GLUE train's whole sentences.
    """

    name: str = "sst2"
    folder: str = "SST-2"
    label_words: tuple = (" terrible", " great")
    labels: tuple = ("0", "1")
    protocols: tuple = ("paper-causal", "kshot")

    def paper_sources(self):
        return [Source("alps_train.tsv", read_tsv, _SST2_TSV), Source("alps_dev.tsv", read_tsv, _SST2_TSV)], [
            Source("alps_test.tsv", read_tsv, _SST2_TSV)
        ]

    def _kshot_pool(self):
        train, test = self.paper_sources()
        return train, test, _SST2_TSV

    def render(self, record, model_kind="causal"):
        self.check_model_kind(model_kind)
        sentence = record["sentence"].strip()
        # MeZO: f"{text} It was" + " terrible"/" great"; LM-BFF: *cls**sent_0*_It_was*mask*.*sep+*
        prompt = f"{sentence} It was" if model_kind == "causal" else f"{sentence} It was {MASK}."
        return Instance(prompt, tuple(self.label_words), self.label_index(record))

    def splits(self, data_dir, *, seed=0, train=None, validation=None, test=None, protocol=None, k=16):
        if data_dir is None and self._protocol(protocol) == "paper-causal":
            return bundled_sst2_splits(seed=seed, train=train, validation=validation, test=test)
        return super().splits(
            data_dir, seed=seed, train=train, validation=validation, test=test, protocol=protocol, k=k
        )


_LABEL_TEXT = (("fieldnames", ("label", "text")),)


@dataclass
class SST5(_LmbffTask):
    """SST-5 fine-grained sentiment, labels 0-4 = very negative .. very positive."""

    name: str = "sst5"
    folder: str = "SST-5"
    model_kinds: tuple = ("masked",)
    label_words: tuple = (" terrible", " bad", " okay", " good", " great")
    labels: tuple = ("0", "1", "2", "3", "4")
    protocols: tuple = ("kshot",)
    lmbff_ext: str = "csv"

    def _kshot_pool(self):
        convert = _sentence("text")
        return (
            [Source("dpt_train.tsv", read_tsv, convert, _LABEL_TEXT)],
            [Source("dpt_test.tsv", read_tsv, convert, _LABEL_TEXT)],
            convert,
        )

    def render(self, record, model_kind="masked"):
        self.check_model_kind(model_kind)
        return Instance(f"{record['sentence'].strip()} It was {MASK}.", self.label_words, self.label_index(record))


@dataclass
class TREC(_LmbffTask):
    """TREC coarse question types: 0 DESC, 1 ENTY, 2 ABBR, 3 HUM, 4 LOC, 5 NUM (LM-BFF's numbering)."""

    name: str = "trec"
    folder: str = "TREC"
    model_kinds: tuple = ("masked",)
    # LM-BFF's mapping {0:'Description',1:'Entity',2:'Expression',3:'Human',4:'Location',5:'Number'}
    label_words: tuple = (" Description", " Entity", " Expression", " Human", " Location", " Number")
    labels: tuple = ("0", "1", "2", "3", "4", "5")
    protocols: tuple = ("kshot",)
    lmbff_ext: str = "csv"

    def _kshot_pool(self):
        convert = _sentence("text")
        return (
            [Source("dpt_train.csv", read_csv, convert, _LABEL_TEXT)],
            [Source("dpt_test.csv", read_csv, convert, _LABEL_TEXT)],
            convert,
        )

    def render(self, record, model_kind="masked"):
        self.check_model_kind(model_kind)
        # LM-BFF: *cls**mask*:*+sent_0**sep+*
        return Instance(f"{MASK}: {record['sentence'].strip()}", self.label_words, self.label_index(record))


_NLI_LABELS = ("entailment", "neutral", "contradiction")


@dataclass
class SNLI(_LmbffTask):
    """SNLI. Test = ``gennli_dev.jsonl`` (the official dev set): LM-BFF's test files are not here."""

    name: str = "snli"
    folder: str = "SNLI"
    model_kinds: tuple = ("masked",)
    label_words: tuple = (" Yes", " Maybe", " No")
    labels: tuple = _NLI_LABELS
    protocols: tuple = ("kshot",)
    lmbff_read: tuple = (("ragged_last", True),)  # gold_label is the last column after annotator labels
    lmbff_test: bool = False

    def _kshot_pool(self):
        ppft = _pair("text_a", "text_b")
        return (
            [
                Source("ppft_glue_pretrain_train.json", read_json_records, ppft),
                Source("ppft_glue_pretrain_dev.json", read_json_records, ppft),
            ],
            [Source("gennli_dev.jsonl", read_jsonl)],
            _pair("sentence1", "sentence2", "gold_label"),
        )

    def render(self, record, model_kind="masked"):
        self.check_model_kind(model_kind)
        return Instance(_nli_masked(record), self.label_words, self.label_index(record))


@dataclass
class MNLI(SNLI):
    """MNLI (matched). Test = ``gennli_dev.jsonl`` (dev_matched); no mismatched set here."""

    name: str = "mnli"
    folder: str = "MNLI"
    lmbff_dev: str = "dev_matched"


@dataclass
class RTE(_LmbffTask):
    """RTE. Label 0 = entailment ("Yes"), 1 = not_entailment ("No")."""

    name: str = "rte"
    folder: str = "RTE"
    label_words: tuple = ("Yes", "No")
    labels: tuple = ("entailment", "not_entailment")
    protocols: tuple = ("paper-causal", "kshot")

    def paper_sources(self):
        return [Source("jiant_train.jsonl", read_jsonl)], [Source("jiant_val.jsonl", read_jsonl)]

    def _kshot_pool(self):
        train, test = self.paper_sources()
        return train, test, _pair("sentence1", "sentence2")

    def render(self, record, model_kind="causal"):
        self.check_model_kind(model_kind)
        if model_kind == "causal":  # MeZO RTETemplate (PromptSource)
            prompt = f'{record["premise"]}\nDoes this mean that "{record["hypothesis"]}" is true? Yes or No?\n'
            return Instance(prompt, ("Yes", "No"), self.label_index(record))
        return Instance(_nli_masked(record), (" Yes", " No"), self.label_index(record))


TASKS = (SST2(), SST5(), TREC(), SNLI(), MNLI(), RTE())


# -- the bundled SST-2 sample --------------------------------------------------------------------

BUNDLE_SIZES = (1000, 500)  # train, validation drawn with random.Random(0)


def bundled_sst2_splits(
    *, seed: int = 0, train: int | None = None, validation: int | None = None, test: int | None = None
) -> Splits:
    """The SST-2 sample shipped in ``zotune/data/sst2`` (drawn once with seed 0, see PROVENANCE.txt).

    Asking for fewer examples than the bundle holds subsamples it with ``random.Random(seed)``;
    otherwise the bundle is returned whole, the same for every seed.
    """
    folder = resources.files("zotune").joinpath("data", "sst2")
    splits = {}
    for split in ("train", "validation", "test"):
        with resources.as_file(folder.joinpath(f"{split}.tsv")) as path:
            if not Path(path).is_file():
                raise TaskError(f"bundled SST-2 data missing: {path} (reinstall zotune with its package data)")
            splits[split] = [_SST2_TSV(row) for row in read_tsv(path)]
    rng = random.Random(seed)
    notes = ["bundled SST-2 sample drawn with seed 0 (zotune/data/sst2, see PROVENANCE.txt)"]
    for split, n in (("train", train), ("validation", validation), ("test", test)):
        rows = splits[split]
        if n is not None and n < len(rows):
            if n < 0:
                raise TaskError(f"{split} must be a non-negative integer, got {n!r}")
            splits[split] = [rows[i] for i in rng.sample(range(len(rows)), n)]
            notes.append(f"{split}: {n} of its {len(rows)} drawn with seed {seed}")
    return Splits(splits["train"], splits["validation"], splits["test"], note="; ".join(notes))


def build_sst2_bundle(data_dir) -> dict[str, list[dict]]:
    """Rebuild the bundled sample from ``data_dir`` (shared/data); the method of its PROVENANCE.txt.

    The train/validation pool is the GLUE-train rows (``alps_train`` + ``alps_dev``, GLUE's own
    tokenisation) that are whole sentences: those whose text, spaces removed, equals a sentence of
    SST-2's sentence-level train split (``dpt_sentlevel_train.tsv``), in that file's order, each text
    once. 1,500 are drawn with ``random.Random(0).sample``: the first 1,000 train, the rest
    validation. Test is GLUE dev (``alps_test.tsv``, 872), whole and in order.
    """
    task = SST2()
    glue_train = task.load(data_dir, task.paper_sources()[0])
    by_key = {}
    for record in glue_train:
        by_key.setdefault(record["sentence"].replace(" ", ""), record)
    pool, seen = [], set()
    for record in task.load(data_dir, [Source("dpt_sentlevel_train.tsv", read_tsv, _SST2_TSV)]):
        key = record["sentence"].replace(" ", "")
        if key in by_key and key not in seen:
            seen.add(key)
            pool.append(by_key[key])
    n_train, n_val = shrink(len(pool), BUNDLE_SIZES)
    idx = random.Random(0).sample(range(len(pool)), n_train + n_val)
    test = task.load(data_dir, task.paper_sources()[1])
    return {"train": [pool[i] for i in idx[:n_train]], "validation": [pool[i] for i in idx[n_train:]], "test": test}
