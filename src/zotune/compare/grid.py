"""A comparison grid's configuration: the grid file and its overrides, and each cell's run config."""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from zotune.compare.methods import METHODS, _section
from zotune.config import ConfigError, RunConfig, override_pairs, read_yaml, section_classes

__all__ = ["TASK_TITLES", "CompareConfig", "cell_config", "load_compare_config"]


# -- the grid's configuration -------------------------------------------------------------------
TASK_TITLES = {
    "sst2": "SST-2",
    "sst5": "SST-5",
    "rte": "RTE",
    "cb": "CB",
    "boolq": "BoolQ",
    "wsc": "WSC",
    "wic": "WiC",
    "multirc": "MultiRC",
    "copa": "COPA",
    "record": "ReCoRD",
    "squad": "SQuAD",
    "drop": "DROP",
    "snli": "SNLI",
    "mnli": "MNLI",
    "trec": "TREC",
}


@dataclass
class CompareConfig:
    """A comparison grid (see :mod:`zotune.compare`)."""

    tasks: list[str] = field(default_factory=lambda: ["sst2"])  # registered task names (columns)
    methods: list[str] = field(
        default_factory=lambda: ["zero-shot", "icl", "lp", "mezo", "mezo-lora", "mezo-prefix", "ft"]
    )  # rows, in order
    seeds: list[int] = field(default_factory=lambda: [0])  # each seed: data sample, batch order, perturbations
    output_dir: str = "runs/compare"
    isolate: bool = True  # each cell in its own process: its own peak memory, nothing leaks between cells
    jobs: int = 1  # cells run at once (isolated cells only), each process's output in its cell's log.txt: on a GPU
    # that one small model leaves mostly idle, several cells together finish sooner (ten SmolLM2 MeZO cells on an
    # H100 stepped ~3x faster in all than one alone)
    run: dict = field(default_factory=dict)  # RunConfig sections (model, task, optimizer, train) for every cell
    method_overrides: dict = field(default_factory=dict)  # method -> RunConfig sections, over `run`
    task_overrides: dict = field(default_factory=dict)  # task -> RunConfig sections, over the method's
    icl: dict = field(default_factory=dict)  # zotune.baselines.icl.ICLConfig fields
    lp: dict = field(default_factory=dict)  # zotune.baselines.probe.ProbeConfig fields
    ft: dict = field(default_factory=dict)  # zotune.baselines.finetune.FinetuneConfig fields

    def __post_init__(self):
        from zotune.tasks import get_task

        for name in self.methods:
            if name not in METHODS:
                raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        for name in self.tasks:
            if name != "custom":
                get_task(name)  # an unknown task raises TaskError with suggestions
        if not (isinstance(self.jobs, int) and self.jobs >= 1):
            raise ConfigError(f"jobs must be an integer >= 1, got {self.jobs!r}")
        if self.jobs > 1 and not self.isolate:
            raise ConfigError("jobs > 1 runs cells in processes of their own: it needs isolate: true")
        if not self.tasks or not self.methods or not self.seeds:
            raise ConfigError("a comparison needs at least one task, one method and one seed")
        # Overrides may name methods and tasks outside this run's selection (--tasks sst2 on a 6-task
        # grid keeps the other tasks' overrides), but not ones that do not exist.
        for name in self.method_overrides:
            if name not in METHODS:
                raise ConfigError(
                    f"method_overrides names {name!r}, which is not a method; known: {', '.join(METHODS)}"
                )
        for name in self.task_overrides:
            if name != "custom":
                get_task(name)
        _check_run_sections(self.run, "run")
        from zotune.baselines.finetune import FinetuneConfig
        from zotune.baselines.icl import ICLConfig
        from zotune.baselines.probe import ProbeConfig

        for key, cls in (("icl", ICLConfig), ("lp", ProbeConfig), ("ft", FinetuneConfig)):
            _section(cls, getattr(self, key), key)  # a bad baseline setting fails before any cell runs
        for key in ("method_overrides", "task_overrides"):
            for name, sections in getattr(self, key).items():
                _check_run_sections(sections, f"{key}.{name}")


def _check_run_sections(raw, where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of config sections, got {raw!r}")
    sections = section_classes()
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"{where}: unknown section {section!r} (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}.{section} must be a mapping, got {values!r}")
        names = {f.name for f in dataclasses.fields(sections[section])}
        for key in values:
            if key not in names:
                raise ConfigError(f"{where}: unknown key {section}.{key}")


def load_compare_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> CompareConfig:
    """The grid from a YAML file, then ``--key value`` overrides (``--tasks sst2,rte``, ``--run.train.steps 10``)."""
    raw: dict = {}
    where = f"{path}: " if path is not None and not overrides else ""  # every value from the file: name it
    if path is not None:
        raw = read_yaml(path, "grid file") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with keys such as tasks, methods, seeds, run")
    names = {f.name: f for f in dataclasses.fields(CompareConfig)}
    for key, _, value in override_pairs(list(overrides or [])):
        keys = key.split(".")  # --run.train.steps 10 sets one nested value
        node = raw
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part!r} is not a mapping")
        node[keys[-1]] = value
    hints = typing.get_type_hints(CompareConfig)
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            import difflib

            near = difflib.get_close_matches(str(key), list(names), n=1)  # YAML keys may be numbers
            raise ConfigError(f"{where}unknown grid key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
        if typing.get_origin(hints[key]) is list:
            value = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
            if not isinstance(value, list):
                value = [value]
            if key == "seeds":
                try:
                    value = [int(v) for v in value]
                except (TypeError, ValueError):
                    raise ConfigError(f"{where}seeds must be integers, got {value!r}") from None
            elif not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}{key} must be a list of names, got {value!r}")
        elif hints[key] is dict and not isinstance(value, dict):
            raise ConfigError(f"{where}{key} must be a mapping, got {value!r}")
        elif hints[key] is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # --output_dir 2024 is a folder name, not a number
        elif hints[key] in (str, bool) and not isinstance(value, hints[key]):
            raise ConfigError(f"{where}{key} must be a {'path' if hints[key] is str else 'boolean'}, got {value!r}")
        kwargs[key] = value
    try:
        return CompareConfig(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{where}{err}") from None


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out.get(key, {}), value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else copy.deepcopy(value)
        )
    return out


# Under the grid's run: the paper's rows start from the model as loaded (train.init none, not zotune train's auto),
# so "MeZO" is the paper's MeZO and "LP-MeZO" (whose defaults say probe) the probe's; run: may still say otherwise.
CELL_BASE = {"train": {"init": "none"}}


def cell_config(grid: CompareConfig, method: str, task: str, seed: int) -> RunConfig:
    """The run configuration of one cell: run, then the method's defaults and overrides, then the task's."""
    from zotune.config import _build

    raw = _merge(_merge(CELL_BASE, grid.run), METHODS[method].defaults)
    raw = _merge(raw, grid.method_overrides.get(method, {}))
    raw = _merge(raw, grid.task_overrides.get(task, {}))
    raw = _merge(raw, {"task": {"name": task, "seed": seed}, "optimizer": {"seed": seed}})
    return _build(raw)


def _cell_dir(grid: CompareConfig, method: str, task: str, seed: int) -> Path:
    return Path(grid.output_dir) / task / method / f"seed{seed}"


def _cell_dirs(grid: CompareConfig):
    """Every cell's folder, in table order (tasks, then methods, then seeds)."""
    for task in grid.tasks:
        for method in grid.methods:
            for seed in grid.seeds:
                yield _cell_dir(grid, method, task, seed)
