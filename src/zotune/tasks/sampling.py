"""The paper's two sampling protocols, and the base class of the tasks that read ``shared/data``.

``"paper-causal"`` (MeZO's OPT experiments, §E.2 and ``large_models/run.py``): 1,000 training and
500 validation examples drawn disjointly from the official train split, 1,000 test examples from the
official validation split (all of it when smaller). Where a task has a single labelled pool (BoolQ
here), test, train and validation are drawn disjointly from it. Where a pool is short, the sizes
shrink in proportion and ``Splits.note`` says so.

``"kshot"`` (MeZO's RoBERTa experiments, following LM-BFF): ``k`` examples per class for training
and another ``k`` per class for validation, drawn from the train split; test is the full test set.
For k = 16 and the seeds 13, 21, 42, 87, 100 the LM-BFF split files (``lmbff_kshot/16-{seed}_*``)
are used as they are. Here ``train``/``validation``/``test`` are upper bounds (MeZO's
``k-shot-1k-test`` data caps test at 1,000: pass ``test=1000`` to match it).

All randomness comes from ``random.Random(seed)``; the global random state is never touched.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zotune.tasks.base import PROTOCOLS, Splits, Task, TaskError
from zotune.tasks.readers import Rows

__all__ = ["LMBFF_SEEDS", "PAPER_SIZES", "FileTask", "kshot", "paper_causal", "shrink"]

PAPER_SIZES = (1000, 500, 1000)  # train, validation, test of the paper-causal protocol
LMBFF_SEEDS = (13, 21, 42, 87, 100)


def shrink(available: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """``sizes`` if they fit in ``available``, else scaled in proportion (largest remainders)."""
    wanted = sum(sizes)
    if wanted <= available:
        return tuple(sizes)
    exact = [available * s / wanted for s in sizes]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (out[i] - exact[i], i))
    for i in by_remainder[: available - sum(out)]:
        out[i] += 1
    return tuple(out)


def _sizes(train, validation, test) -> tuple[int, int, int]:
    sizes = tuple(default if n is None else n for n, default in zip((train, validation, test), PAPER_SIZES))
    for name, n in zip(("train", "validation", "test"), sizes):
        if not isinstance(n, int) or n < 0:
            raise TaskError(f"{name} must be a non-negative integer, got {n!r}")
    return sizes


def paper_causal(
    train_pool: Sequence[dict],
    test_pool: Sequence[dict] | None,
    *,
    seed: int,
    train: int | None = None,
    validation: int | None = None,
    test: int | None = None,
    train_source: str = "the train split",
    test_source: str = "the validation split",
) -> Splits:
    """The paper-causal protocol. ``test_pool=None``: draw all three splits from ``train_pool``."""
    n_train, n_val, n_test = _sizes(train, validation, test)
    rng = random.Random(seed)
    notes = []
    if test_pool is None:
        order = rng.sample(range(len(train_pool)), len(train_pool))
        sizes = shrink(len(order), (n_test, n_train, n_val))
        if sizes != (n_test, n_train, n_val):
            notes.append(
                f"only {len(order)} labelled examples for {n_train}+{n_val}+{n_test} requested: "
                f"scaled down in proportion"
            )
        n_test, n_train, n_val = sizes
        test_idx, train_idx = order[:n_test], order[n_test : n_test + n_train]
        val_idx = order[n_test + n_train : n_test + n_train + n_val]
        notes.insert(
            0,
            f"test {n_test}, train {n_train}, validation {n_val} drawn disjointly from "
            f"{train_source} ({len(train_pool)}) with seed {seed}",
        )
        pick = [train_pool[i] for i in train_idx], [train_pool[i] for i in val_idx], [train_pool[i] for i in test_idx]
        return Splits(*pick, note="; ".join(notes))
    sizes = shrink(len(train_pool), (n_train, n_val))
    if sizes != (n_train, n_val):
        notes.append(
            f"only {len(train_pool)} training examples for {n_train}+{n_val} requested: scaled down in proportion"
        )
    n_train, n_val = sizes
    idx = rng.sample(range(len(train_pool)), n_train + n_val)
    if n_test >= len(test_pool):
        test_rows = list(test_pool)
        test_note = f"test: all {len(test_pool)} of {test_source}"
    else:
        test_rows = [test_pool[i] for i in rng.sample(range(len(test_pool)), n_test)]
        test_note = f"test {n_test} drawn from {test_source} ({len(test_pool)})"
    notes.insert(
        0,
        f"train {n_train}, validation {n_val} drawn disjointly from {train_source} "
        f"({len(train_pool)}) with seed {seed}; {test_note}",
    )
    return Splits(
        [train_pool[i] for i in idx[:n_train]], [train_pool[i] for i in idx[n_train:]], test_rows, note="; ".join(notes)
    )


def _cap(rows: list, n: int | None, rng: random.Random, name: str, notes: list) -> list:
    if n is None or n >= len(rows):
        return rows
    if not isinstance(n, int) or n < 0:
        raise TaskError(f"{name} must be a non-negative integer, got {n!r}")
    notes.append(f"{name} capped at {n} of {len(rows)}")
    return [rows[i] for i in rng.sample(range(len(rows)), n)]


def kshot(
    pool: Sequence[dict] | None,
    test_rows: Sequence[dict],
    label_of: Callable[[dict], int],
    *,
    k: int,
    seed: int,
    fixed: tuple[Sequence[dict], Sequence[dict]] | None = None,
    train: int | None = None,
    validation: int | None = None,
    test: int | None = None,
    source: str = "the train split",
) -> Splits:
    """The kshot protocol: ``fixed`` = the LM-BFF (train, validation) files, else sample ``pool``."""
    if not isinstance(k, int) or k < 1:
        raise TaskError(f"k must be a positive integer (16 or 512 in the paper), got {k!r}")
    rng = random.Random(seed)
    notes = []
    if fixed is not None:
        train_rows, val_rows = list(fixed[0]), list(fixed[1])
        notes.append(f"LM-BFF {k}-shot split files for seed {seed}")
    else:
        by_label: dict[int, list[int]] = {}
        for i, record in enumerate(pool):
            by_label.setdefault(label_of(record), []).append(i)
        train_idx, val_idx = [], []
        for label in sorted(by_label):
            idx = by_label[label]
            rng.shuffle(idx)
            train_idx += idx[:k]
            val_idx += idx[k : 2 * k]
            if len(idx) < 2 * k:
                notes.append(f"class {label} has only {len(idx)} examples for 2x{k}")
        rng.shuffle(train_idx)
        rng.shuffle(val_idx)
        train_rows, val_rows = [pool[i] for i in train_idx], [pool[i] for i in val_idx]
        notes.insert(
            0,
            f"{k} per class for train and for validation drawn disjointly from {source} ({len(pool)}) with seed {seed}",
        )
    if test is None or test >= len(test_rows):
        notes.append(f"test: the full test set ({len(test_rows)})")
    train_rows = _cap(train_rows, train, rng, "train", notes)
    val_rows = _cap(val_rows, validation, rng, "validation", notes)
    test_rows = _cap(list(test_rows), test, rng, "test", notes)
    return Splits(train_rows, val_rows, test_rows, note="; ".join(notes))


@dataclass(frozen=True)
class Source:
    """One data file of a task: its name in the task folder, how to read it, how to normalise a row."""

    file: str
    read: Callable[..., Rows]
    convert: Callable[[dict], dict] | None = None
    options: tuple = ()  # keyword arguments for ``read``, as (name, value) pairs
    part: str = ""  # which part of the file ``read`` keeps, for notes (e.g. "origin drop_dataset_dev")


@dataclass
class FileTask(Task):
    """A task whose data lives in ``data_dir/<folder>/``, sampled by the paper's protocols.

    Subclasses set ``folder``, ``labels`` (the raw label values in option order) and
    implement ``render`` plus ``paper_sources`` and, when ``"kshot"`` is among ``protocols``,
    ``kshot_sources``.
    """

    folder: str = ""  # subfolder of data_dir, e.g. "SST-2"
    labels: tuple[str, ...] = ()  # raw label values (as strings, bools as "true"/"false") in option order

    # -- what subclasses provide -------------------------------------------------------------
    def paper_sources(self) -> tuple[list[Source], list[Source] | None]:
        """(train-pool files, test-pool files or None when the train pool also gives the test)."""
        raise NotImplementedError

    def kshot_sources(self, k: int, seed: int) -> tuple[list[Source], list[Source], tuple | None]:
        """(train-pool files, test files, fixed) where fixed = (LM-BFF train file, LM-BFF dev file,
        LM-BFF test file or None) for this ``k`` and ``seed``, or None to sample from the pool."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------
    def label_index(self, record: dict) -> int | None:
        """The option index of ``record["label"]`` (None when the record has no label)."""
        if "label" not in record or record["label"] is None:
            return None
        value = record["label"]
        key = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            return self.labels.index(key)
        except ValueError:
            raise TaskError(
                f"unknown label {value!r} for task {self.name!r} (expected one of {', '.join(map(repr, self.labels))})"
            ) from None

    def load(self, data_dir, sources: Sequence[Source]) -> list[dict]:
        """Read, normalise and check (by rendering) the records of ``sources``, concatenated."""
        records = []
        for source in sources:
            path = self._path(data_dir, source.file)
            rows = source.read(path, **dict(source.options))
            for i, row in enumerate(rows):
                try:
                    record = source.convert(row) if source.convert else row
                    instance = self.render(record, self.model_kinds[0])
                except KeyError as err:
                    raise TaskError(
                        f"{rows.where(i)}: record has no field {err.args[0]!r} (task {self.name!r} needs it)"
                    ) from None
                except (TypeError, AttributeError, IndexError) as err:
                    raise TaskError(
                        f"{rows.where(i)}: record does not fit task {self.name!r} ({type(err).__name__}: {err})"
                    ) from None
                except TaskError as err:
                    raise TaskError(f"{rows.where(i)}: {err}") from None
                if instance.label is None and self.kind != "generation":
                    raise TaskError(f"{rows.where(i)}: record has no label")
                records.append(record)
        return records

    def _path(self, data_dir, file: str) -> Path:
        folder = Path(data_dir) / self.folder
        path = folder / file
        if not path.is_file():
            where = "folder is missing" if not folder.is_dir() else "file is missing"
            raise TaskError(
                f"task {self.name!r} expects {file} in {folder} ({where}; "
                f"lay data_dir out like shared/data: one subfolder per task)"
            )
        return path

    def _describe(self, sources: Sequence[Source]) -> str:
        return "+".join(f"{self.folder}/{s.file}" + (f" ({s.part})" if s.part else "") for s in sources)

    def _protocol(self, protocol: str | None) -> str:
        protocol = self.protocols[0] if protocol is None else protocol
        if protocol not in PROTOCOLS:
            raise TaskError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if protocol not in self.protocols:
            raise TaskError(
                f"task {self.name!r} has no {protocol!r} protocol (it supports: {', '.join(self.protocols)})"
            )
        return protocol

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
        protocol = self._protocol(protocol)
        if data_dir is None:
            raise TaskError(
                f"task {self.name!r} needs data_dir (a folder laid out like shared/data); "
                f"bundled data exists only for sst2 with the paper-causal protocol"
            )
        if protocol == "paper-causal":
            train_sources, test_sources = self.paper_sources()
            pool = self.load(data_dir, train_sources)
            test_pool = None if test_sources is None else self.load(data_dir, test_sources)
            return paper_causal(
                pool,
                test_pool,
                seed=seed,
                train=train,
                validation=validation,
                test=test,
                train_source=self._describe(train_sources),
                test_source=self._describe(test_sources or ()),
            )
        pool_sources, test_sources, fixed_sources = self.kshot_sources(k, seed)
        note = ""
        if fixed_sources is not None:  # LM-BFF's files where present, else sample as for any k
            missing = [s.file for s in fixed_sources if s and not (Path(data_dir) / self.folder / s.file).is_file()]
            if missing:
                fixed_sources, note = None, f"; LM-BFF file {missing[0]} not found, sampled instead"
        fixed = pool = None
        if fixed_sources is not None:
            fixed = (self.load(data_dir, fixed_sources[:1]), self.load(data_dir, fixed_sources[1:2]))
            test_sources = [fixed_sources[2]] if fixed_sources[2] else test_sources
        else:
            pool = self.load(data_dir, pool_sources)
        splits = kshot(
            pool,
            self.load(data_dir, test_sources),
            self.label_index,
            k=k,
            seed=seed,
            fixed=fixed,
            train=train,
            validation=validation,
            test=test,
            source=self._describe(pool_sources),
        )
        splits.note += note
        return splits
