"""`zotune compare`: the grid runs every cell once, resumes, isolates cells, and tabulates them."""

import json
import re

import pytest
import torch
import yaml

from zotune import compare as cmp
from zotune import read_trajectory
from zotune.cli import main
from zotune.config import ConfigError

QUIET = lambda message: None  # noqa: E731


def _grid(model_dir, out, **extra):
    raw = {
        "tasks": ["sst2"],
        "methods": ["zero-shot", "icl", "mezo", "mezo-lora"],
        "seeds": [0],
        "output_dir": str(out),
        "isolate": False,
        "run": {
            "model": {"name": str(model_dir)},
            "task": {"train": 16, "validation": 4, "test": 6},
            "train": {"steps": 2, "eval_every": 2, "batch_size": 4, "progress": False},
        },
        "icl": {"k": 2},
    }
    raw.update(extra)
    return raw


def test_a_grid_runs_every_cell_and_writes_the_table(model_dir, tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(_grid(model_dir, tmp_path / "out")))
    table = cmp.compare(cmp.load_compare_config(path), log=QUIET)
    lines, notes = table.split("\n\n")
    lines = lines.splitlines()
    assert lines[0].startswith("| Task | SST-2 | peak memory |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| Zero-shot", "| ICL", "| MeZO", "| MeZO (LoRA)"]
    assert re.search(r"- ICL: [12] demonstrations; 1 cells in", notes) and "- MeZO: 2 steps; 1 cells in" in notes
    for line in lines[2:]:
        value = float(line.split(" | ")[1])
        assert 0.0 <= value <= 100.0
    assert (tmp_path / "out" / "table.md").read_text().strip() == table
    result = json.loads((tmp_path / "out" / "sst2" / "mezo-lora" / "seed0" / "result.json").read_text())
    assert result["steps"] == 2 and result["trainable_parameters"] < 10_000  # LoRA, not the whole model
    assert result["beat_start"] is (result["best_step"] != 0)  # the start is validated and a candidate
    zero = json.loads((tmp_path / "out" / "sst2" / "zero-shot" / "seed0" / "result.json").read_text())
    assert set(zero) >= {"validation", "test", "cell_time_s"} and zero["peak_memory_mb"] is None


def test_the_baselines_run_as_cells(model_dir, tmp_path):
    grid = cmp.CompareConfig(
        **_grid(
            model_dir,
            tmp_path / "out",
            methods=["lp", "ft", "ft-prefix"],
            lp={"Cs": [1.0]},
            ft={"steps": 2, "batch_size": 4},
        )
    )
    lines = cmp.compare(grid, log=QUIET).split("\n\n")[0].splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| LP", "| FT", "| FT (prefix)"]
    ft = json.loads((tmp_path / "out" / "sst2" / "ft" / "seed0" / "result.json").read_text())
    prefix = json.loads((tmp_path / "out" / "sst2" / "ft-prefix" / "seed0" / "result.json").read_text())
    assert ft["steps"] == 2 and prefix["trainable_parameters"] < ft["trainable_parameters"]
    with pytest.raises(ConfigError, match="lp: unknown key 'C'"):
        cmp.compare(cmp.CompareConfig(**_grid(model_dir, tmp_path / "bad", methods=["lp"], lp={"C": 1.0})), log=QUIET)


def test_cells_already_done_are_skipped(model_dir, tmp_path, monkeypatch):
    grid = cmp.load_compare_config(
        None, [f"--{k}={json.dumps(v)}" for k, v in _grid(model_dir, tmp_path / "out", methods=["zero-shot"]).items()]
    )
    cmp.compare(grid, log=QUIET)
    calls = []
    monkeypatch.setattr(cmp, "run_cell", lambda *a, **k: calls.append(a))
    cmp.compare(grid, log=QUIET)
    assert calls == []


def test_a_mezo_cell_stopped_after_its_run_takes_the_runs_summary(model_dir, tmp_path, monkeypatch):
    """Killed between the run's summary.json and the cell's result.json: the rerun neither trains nor tests."""
    grid = cmp.CompareConfig(**_grid(model_dir, tmp_path / "out", methods=["mezo"]))
    cmp.compare(grid, log=QUIET)
    path = tmp_path / "out" / "sst2" / "mezo" / "seed0" / "result.json"
    first = json.loads(path.read_text())
    path.unlink()
    import zotune.train

    def no_run(*args, **kwargs):
        raise AssertionError("the finished run was run again")

    monkeypatch.setattr(zotune.train, "run", no_run)
    cmp.compare(grid, log=QUIET)
    again = json.loads(path.read_text())
    for key in ("test", "validation", "best_step", "steps", "trajectory_bytes"):
        assert again[key] == first[key], key


def test_table_only_runs_nothing_and_counts_the_missing_cells(model_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(_grid(model_dir, tmp_path / "out", methods=["zero-shot", "icl"])))
    grid = cmp.load_compare_config(path, ["--methods", "zero-shot"])
    cmp.compare(grid, log=QUIET)  # one of the two cells done
    monkeypatch.setattr(cmp, "run_cell", lambda *a, **k: pytest.fail("--table-only ran a cell"))
    monkeypatch.setattr(cmp.subprocess, "run", lambda *a, **k: pytest.fail("--table-only ran a cell"))
    assert main(["compare", "--config", str(path), "--table-only"]) == 0
    out = capsys.readouterr().out
    assert "| Zero-shot |" in out and "| ICL |" in out and "not run yet: 1 of 2 cells" in out
    assert "not run yet: 1 of 2 cells" in (tmp_path / "out" / "table.md").read_text()


def test_isolated_cells_report_their_own_peak_memory(model_dir, tmp_path):
    raw = _grid(model_dir, tmp_path / "out", methods=["zero-shot"], isolate=True)
    grid = cmp.CompareConfig(**raw)
    table = cmp.compare(grid, log=QUIET)
    result = json.loads((tmp_path / "out" / "sst2" / "zero-shot" / "seed0" / "result.json").read_text())
    peak = result["peak_memory_mb"]
    if torch.cuda.is_available():  # the cell's model ran on the GPU: the CUDA allocator's peak, small for a tiny model
        assert peak > 0
    else:
        assert peak > 50  # the cell process's peak RSS: a whole Python process with torch loaded
    assert table.splitlines()[2].endswith(" GB |")


def test_cell_configs_layer_run_method_and_task_overrides(model_dir, tmp_path):
    grid = cmp.CompareConfig(
        **_grid(
            model_dir,
            tmp_path,
            methods=["mezo", "mezo-prefix"],
            method_overrides={"mezo-prefix": {"optimizer": {"lr": 0.5}}},
            task_overrides={"sst2": {"train": {"batch_size": 2}}},
        )
    )
    config = cmp.cell_config(grid, "mezo-prefix", "sst2", 7)
    assert config.model.tuning == "prefix" and config.optimizer.lr == 0.5
    assert config.optimizer.eps == cmp.METHODS["mezo-prefix"].defaults["optimizer"]["eps"]
    assert config.train.batch_size == 2 and config.train.steps == 2
    assert config.task.seed == 7 and config.optimizer.seed == 7
    assert cmp.cell_config(grid, "mezo", "sst2", 0).model.tuning == "full"
    assert cmp.cell_config(grid, "lp-mezo", "sst2", 0).train.init == "probe"
    # the paper's rows start from the model as loaded, not from zotune train's default (auto: a probe first)
    assert cmp.cell_config(grid, "mezo", "sst2", 0).train.init == "none"
    assert cmp.cell_config(grid, "fzoo", "sst2", 0).train.init == "none"
    probed = cmp.CompareConfig(
        **{**grid.__dict__, "run": {**grid.run, "train": {**grid.run["train"], "init": "probe"}}}
    )
    assert cmp.cell_config(probed, "mezo", "sst2", 0).train.init == "probe"  # the grid's run: may still say otherwise
    fzoo = cmp.cell_config(grid, "fzoo", "sst2", 0).optimizer  # a method per estimator
    assert (fzoo.estimator, fzoo.distribution, fzoo.n_perturbations, fzoo.fuse_next) == ("fzoo", "rademacher", 8, False)
    hizoo = cmp.cell_config(grid, "hizoo", "sst2", 0).optimizer
    assert (hizoo.estimator, hizoo.variant, hizoo.n_perturbations) == ("hizoo", "hizoo", 1)
    kerzoo = cmp.cell_config(grid, "kerzoo", "sst2", 0).optimizer
    assert (kerzoo.estimator, kerzoo.lr) == ("kerzoo", 2e-5)
    assert cmp.cell_config(grid, "sparse-mezo", "sst2", 0).optimizer.sparsity == 0.75
    assert cmp.cell_config(grid, "subzero", "sst2", 0).optimizer.distribution == "subzero"
    muon = cmp.cell_config(grid, "zo-muon", "sst2", 0).optimizer
    assert (muon.variant, muon.distribution, muon.lowrank_rank) == ("muon", "subspace", 8)
    grzo = cmp.cell_config(grid, "grzo", "sst2", 0).optimizer
    assert (grzo.estimator, grzo.variant, grzo.lr) == ("grzo", "grzo", 1e-5)
    sparse = cmp.cell_config(grid, "sparse-grzo", "sst2", 0).optimizer
    assert (sparse.estimator, sparse.sparsity) == ("grzo", 0.75)
    assert cmp.cell_config(grid, "grzo-raw", "sst2", 0).optimizer.variant == "grzo"


def test_an_fzoo_cell_runs_and_reports_its_forward_passes(model_dir, tmp_path):
    grid = cmp.CompareConfig(**_grid(model_dir, tmp_path, methods=["fzoo"]))
    config = cmp.cell_config(grid, "fzoo", "sst2", 0)
    config.optimizer.n_perturbations = 2
    config.train.output_dir = str(tmp_path / "run")  # not a timestamped folder under the working directory
    from zotune.train import run

    summary = run(config, log=lambda *a: None).summary
    assert summary["forward_passes"] == 3 * summary["steps"]  # N + 1 a step


def test_a_grzo_cell_runs_two_passes_a_step(model_dir, tmp_path):
    grid = cmp.CompareConfig(**_grid(model_dir, tmp_path, methods=["grzo"]))
    from zotune.train import run

    config = cmp.cell_config(grid, "grzo", "sst2", 0)
    config.train.output_dir = str(tmp_path / "run")  # not a timestamped folder under the working directory
    summary = run(config, log=lambda *a: None).summary
    assert summary["forward_passes"] == 2 * summary["steps"]


def test_several_seeds_show_mean_and_deviation():
    grid = cmp.CompareConfig(tasks=["sst2"], methods=["mezo"], seeds=[0, 1])
    results = [
        {"method": "mezo", "task": "sst2", "seed": s, "test": {"accuracy": a}, "peak_memory_mb": 1024.0}
        for s, a in ((0, 0.8), (1, 0.9))
    ]
    row = cmp.format_table(grid, results).splitlines()[2]
    assert row == "| MeZO | 85.0 ± 7.1 | 1.00 GB |"


def test_the_notes_say_which_cells_no_step_beat_the_start_in():
    grid = cmp.CompareConfig(tasks=["sst2", "rte"], methods=["mezo"], seeds=[0, 1])
    results = [
        {"method": "mezo", "task": t, "seed": s, "test": {"accuracy": 0.6}, "beat_start": t == "sst2" or s == 0}
        for t in ("sst2", "rte")
        for s in (0, 1)
    ]
    notes = cmp.format_table(grid, results).split("\n\n")[1]
    assert (
        "no step beat the starting weights on validation in 1 of 4 cells (RTE seed 1): their test is of the "
        "starting weights"
    ) in notes
    for r in results:
        r["beat_start"] = True
    assert "no step beat" not in cmp.format_table(grid, results)


def test_the_memory_table_compares_each_cell_with_the_same_tasks_zero_shot():
    grid = cmp.CompareConfig(tasks=["sst2", "rte"], methods=["zero-shot", "mezo", "ft"], seeds=[0])
    peaks = {
        ("zero-shot", "sst2"): 1000.0,
        ("zero-shot", "rte"): 2000.0,
        ("mezo", "sst2"): 1010.0,
        ("mezo", "rte"): 2100.0,
        ("ft", "sst2"): 3072.0,
    }
    results = [
        {"method": m, "task": t, "seed": 0, "test": {"accuracy": 0.5}, "peak_memory_mb": mb}
        for (m, t), mb in peaks.items()
    ]
    text = cmp.format_table(grid, results)
    assert "| MeZO | 50.0 | 50.0 | 2.05 GB |" in text  # the main column: the max over tasks
    memory = text.split("zero-shot, i.e. inference):")[1].strip().splitlines()
    assert memory[0] == "| Peak memory | SST-2 | RTE |"
    assert memory[2:] == [
        "| Zero-shot | 0.98 GB | 1.95 GB |",
        "| MeZO | 0.99 GB (1.01×) | 2.05 GB (1.05×) |",
        "| FT | 3.00 GB (3.07×) | – |",
    ]
    no_memory = [dict(r, peak_memory_mb=None) for r in results]
    assert "Peak memory" not in cmp.format_table(grid, no_memory)  # cells run in-process measure nothing


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"methods": ["mezzo"]}, "unknown method 'mezzo'"),
        ({"tasks": ["sst3"]}, "did you mean 'sst2'"),
        ({"method": ["mezo"]}, "unknown grid key 'method'; did you mean 'methods'?"),
        ({"seeds": ["a"]}, "seeds must be integers"),
        ({"methods": ["mezo"], "method_overrides": {"fft": {}}}, "method_overrides names 'fft', which is not a method"),
        ({"task_overrides": {"sst3": {}}}, "did you mean 'sst2'"),
        ({"run": {"optimiser": {}}}, "unknown section 'optimiser'"),
        ({"run": {"train": {"stepz": 3}}}, "unknown key train.stepz"),
        ({"tasks": []}, "at least one task"),
    ],
)
def test_bad_grids_are_one_line_errors(tmp_path, raw, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises((ConfigError, ValueError), match=message.replace("(", r"\(").replace("?", r"\?")):
        cmp.load_compare_config(path)


def test_overrides_may_name_methods_and_tasks_outside_the_selection(model_dir, tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            _grid(
                model_dir,
                tmp_path / "out",
                task_overrides={"rte": {"train": {"steps": 1}}},
                method_overrides={"ft": {"train": {"steps": 1}}},
            )
        )
    )
    grid = cmp.load_compare_config(path, ["--tasks", "sst2", "--methods", "zero-shot"])
    assert grid.tasks == ["sst2"] and grid.methods == ["zero-shot"]


def test_the_cli_runs_a_grid_and_reports_bad_ones(model_dir, tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(_grid(model_dir, tmp_path / "out", methods=["zero-shot"])))
    assert main(["compare", "--config", str(path), "--run.task.test", "4"]) == 0
    assert "| Zero-shot |" in capsys.readouterr().out
    assert main(["compare", "--config", str(path), "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_a_failed_cell_is_recorded_and_the_grid_goes_on(model_dir, tmp_path, monkeypatch):
    def broken(config, grid, cell_dir, log):
        raise ValueError("no such thing")

    monkeypatch.setitem(cmp.METHODS, "icl", cmp.Method("icl", "ICL", broken))
    grid = cmp.CompareConfig(**_grid(model_dir, tmp_path / "out", methods=["icl", "zero-shot"]))
    table = cmp.compare(grid, log=QUIET)
    failed = json.loads((tmp_path / "out" / "sst2" / "icl" / "seed0" / "failed.json").read_text())
    assert failed["error"] == "no such thing"
    assert "| ICL | – |" in table and "- failed: icl on sst2 (seed 0)" in table
    assert (tmp_path / "out" / "sst2" / "zero-shot" / "seed0" / "result.json").is_file()


def test_cells_run_several_at_a_time_give_the_results_of_one_at_a_time(model_dir, tmp_path):
    methods = ["zero-shot", "mezo", "mezo-lora"]
    # one at a time in this process (isolated or not, a cell's result is the same: the isolated single-job path
    # is the SIGTERM test's); each isolated cell costs a fresh interpreter importing torch, ~4 s here
    serial = cmp.CompareConfig(**_grid(model_dir, tmp_path / "serial", methods=methods))
    cmp.compare(serial, log=QUIET)
    lines = []
    parallel = cmp.CompareConfig(**_grid(model_dir, tmp_path / "parallel", methods=methods, isolate=True, jobs=3))
    cmp.compare(parallel, log=lines.append)
    assert sum("started (" in line for line in lines) == 3 and sum(": done in " in line for line in lines) == 3
    for method in methods:
        cell = tmp_path / "parallel" / "sst2" / method / "seed0"
        one = json.loads((tmp_path / "serial" / "sst2" / method / "seed0" / "result.json").read_text())
        many = json.loads((cell / "result.json").read_text())
        assert many["test"] == one["test"] and many.get("steps") == one.get("steps")
        assert (cell / "log.txt").is_file()  # the cell's own output, not interleaved on the terminal
    assert "run directory" in (tmp_path / "parallel" / "sst2" / "mezo" / "seed0" / "log.txt").read_text()


def test_a_failing_cell_among_parallel_ones_is_recorded(model_dir, tmp_path):
    grid = cmp.CompareConfig(
        **_grid(
            model_dir,
            tmp_path / "out",
            methods=["zero-shot", "mezo"],
            isolate=True,
            jobs=2,
            method_overrides={"mezo": {"model": {"name": str(tmp_path / "missing.gguf")}}},
        )
    )
    lines = []
    cmp.compare(grid, log=lines.append)
    failed = json.loads((tmp_path / "out" / "sst2" / "mezo" / "seed0" / "failed.json").read_text())
    assert "exit code" in failed["error"] and "log.txt" in failed["error"]
    assert (tmp_path / "out" / "sst2" / "zero-shot" / "seed0" / "result.json").is_file()


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"jobs": 0}, "jobs must be an integer >= 1"),
        ({"jobs": 2, "isolate": False}, "jobs > 1 runs cells in processes"),
    ],
)
def test_bad_jobs(model_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        cmp.CompareConfig(**_grid(model_dir, tmp_path / "out", **extra))


@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_the_grid_its_cells_save_and_the_grid_resumes(model_dir, tmp_path, jobs):
    import os
    import signal
    import threading
    import time

    steps = 400
    methods = ["mezo", "mezo-lora"][:jobs]
    raw = _grid(model_dir, tmp_path / "out", methods=methods, isolate=True, jobs=jobs)
    raw["run"]["train"].update(steps=steps, eval_every=steps)
    grid = cmp.CompareConfig(**raw)
    runs = [tmp_path / "out" / "sst2" / m / "seed0" / "run" for m in methods]

    started = []

    def terminate_once_every_cell_trains():
        deadline = time.monotonic() + 240  # each cell a fresh interpreter importing torch, on a busy 2-core runner
        while time.monotonic() < deadline:
            if all((r / "metrics.jsonl").is_file() and '"loss"' in (r / "metrics.jsonl").read_text() for r in runs):
                started.append(True)
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would: to the grid's process only

    watcher = threading.Thread(target=terminate_once_every_cell_trains)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            cmp.compare(grid, log=QUIET)
    finally:
        watcher.join()
    assert started, "the cells did not log a step within 240 s: the signal came before they trained"
    for r in runs:  # every cell finished its step, saved its state and stopped before its last step
        state = json.loads((r / "state.json").read_text())
        assert 0 < state["loop"]["step"] < steps
        assert not (r.parent / "result.json").exists()
    cmp.compare(grid, log=QUIET)  # run again: the cells continue from their state
    for r in runs:
        result = json.loads((r.parent / "result.json").read_text())
        assert result["steps"] == steps
        assert len(read_trajectory(r / "trajectory.zot").steps) == steps
