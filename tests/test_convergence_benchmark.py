"""benchmarks/convergence.py: the budget arithmetic, tuning's choice, the table's "reached at", and the three
phases end to end on a tiny model (resumable: finished cells are skipped, a partial one continues)."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

from zotune.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("convergence_benchmark", ROOT / "benchmarks" / "convergence.py")
conv = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = conv  # dataclasses look their module up while the file runs
_spec.loader.exec_module(conv)

QUIET = lambda message: None  # noqa: E731
TINY_DATA = ["--", "--task.train", "16", "--task.validation", "8", "--task.test", "8", "--train.batch_size", "4"]


def _points(*pairs):
    return [conv.Point(step=passes // 2, passes=passes, minutes=passes / 100, value=value) for passes, value in pairs]


def _curve(*values):
    """A tuning run's validations: the start (step 0), then steps 1, 2, ..."""
    return conv.Curve([conv.Point(i, 2 * i, None, v) for i, v in enumerate(values)], None, False)


def test_budget_arithmetic_whole_steps_never_over_budget():
    assert conv.steps_for(2000, 2) == 1000  # tuned MeZO's 1,000 steps
    assert conv.steps_for(2000, 9) == 222  # FZOO, N = 8: 1,998 forward passes
    assert conv.steps_for(2000, 5) == 400  # one-sided n-SPSA, n = 4
    assert conv.eval_every_for(200, 2) == 100 and conv.eval_every_for(200, 9) == 22 and conv.eval_every_for(4, 5) == 1
    with pytest.raises(ConfigError, match="less than one step"):
        conv.steps_for(4, 5)


def test_each_cell_config_takes_its_methods_settings_and_its_budget_in_steps(tmp_path):
    plan = conv.Plan(
        methods=["mezo", "one-sided-4"],
        tasks=["sst2"],
        seeds=[0, 1],
        budget=2000,
        tune_budget=400,
        eval_passes=200,
        model="tiny",
        out=str(tmp_path),
        overrides=["--task.validation", "8"],
    )
    final = conv.cell_config(plan, "sst2", "one-sided-4", {"lr": 1e-4}, phase="final", seed=1, run_dir=tmp_path / "r")
    o, t = final.optimizer, final.train
    assert (o.estimator, o.n_perturbations, o.lr, o.seed) == ("one-sided", 4, 1e-4, 1)
    assert (t.steps, t.eval_every, t.output_dir, t.save_best) == (400, 40, str(tmp_path / "r"), True)
    assert (final.task.name, final.task.seed, final.task.validation, final.task.data_dir) == ("sst2", 1, 8, None)
    tune = conv.cell_config(plan, "sst2", "mezo", {"lr": 2e-5}, phase="tune", seed=0, run_dir=tmp_path / "t")
    assert (tune.train.steps, tune.train.eval_every, tune.task.test, tune.train.save_best) == (200, 100, 0, False)
    assert (tune.optimizer.estimator, tune.optimizer.n_perturbations, tune.optimizer.distribution) == (
        "two-sided",
        1,
        "gaussian",
    )


@pytest.mark.parametrize("name", sorted(conv.METHODS))
def test_every_method_is_a_valid_run_config_costing_the_passes_its_entry_says(name, tmp_path):
    import torch

    from zotune.optim import estimators
    from zotune.optim.factory import make_optimizer

    plan = conv.Plan(
        methods=["mezo", name], tasks=["sst2"], seeds=[0], budget=200, tune_budget=40, eval_passes=20,
        model="tiny", out=str(tmp_path), overrides=["--task.train", "16", "--train.batch_size", "4"],
    )  # fmt: skip
    for point in conv.grid_points(name):
        o = conv.cell_config(plan, "sst2", name, point, phase="tune", seed=0, run_dir=tmp_path / "r").optimizer
        sweeps = estimators.get(o.estimator).sweeps(o.n_perturbations)
        assert len(sweeps) == conv.METHODS[name].passes_per_step  # the budget arithmetic counts these
        assert o.lr == point["lr"]
        model = torch.nn.Sequential(torch.nn.Linear(4, 8))  # GRZO hooks a model's layers; the others take its tensors
        make_optimizer(list(model.named_parameters()), o, model=model)  # the options compose


def test_a_probe_first_method_spends_its_features_out_of_the_budget_and_its_curve_counts_them(tmp_path):
    plan = conv.Plan(
        methods=["mezo", "lp-mezo"], tasks=["sst2"], seeds=[0], budget=1000, tune_budget=200, eval_passes=100,
        model="tiny", out=str(tmp_path),
    )  # fmt: skip
    final = conv.cell_config(plan, "sst2", "lp-mezo", {"lr": 1e-5}, phase="final", seed=0, run_dir=tmp_path / "r")
    # the probe's features of 1,000 training examples are 62.5 batches of 16: 937 passes left, 468 steps of two
    assert final.train.init == "probe" and conv.setup_passes("lp-mezo", final) == 62.5
    assert final.train.steps == 468 and final.train.eval_every == 50
    plain = conv.cell_config(plan, "sst2", "mezo", {"lr": 1e-5}, phase="final", seed=0, run_dir=tmp_path / "m")
    assert plain.train.steps == 500 and conv.setup_passes("mezo", plain) == 0
    assert plain.train.init == "none"  # every other method from the model as loaded, not zotune train's auto
    with pytest.raises(ConfigError, match="lp-mezo applies to sst2 only, not copa"):
        conv.Plan(**{**plan.__dict__, "tasks": ["sst2", "copa"], "data_dir": str(tmp_path)})
    # the run's first line records the probe's cost: every point is shifted by it, the start included
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": 0, "init": "probe", "init_forward_passes": 62.5, "init_seconds": 90.0, "zero_shot_validation_accuracy": 0.8},
        {"step": 50, "loss": 0.3, "forward_passes": 100, "elapsed": 120.0},
        {"step": 50, "validation_accuracy": 0.85},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    curve = conv.read_curve(run, 2)
    assert [(p.step, p.passes, p.minutes, p.value) for p in curve.points] == [
        (0, 62.5, 1.5, 0.8),
        (50, 162.5, 3.5, 0.85),
    ]


def test_plans_that_cannot_be_fair_are_refused(tmp_path, monkeypatch):
    common = dict(tasks=["sst2"], seeds=[0], budget=100, tune_budget=20, eval_passes=10, model="m", out=str(tmp_path))
    with pytest.raises(ConfigError, match="must include 'mezo'"):
        conv.Plan(methods=["one-sided-4"], **common)
    monkeypatch.setitem(conv.METHODS, "wide", conv.Method(2, {}, {"lr": [1e-5, 2e-5, 5e-5, 1e-4]}))
    with pytest.raises(ConfigError, match="same tuning budget"):
        conv.Plan(methods=["mezo", "wide"], **common)
    with pytest.raises(ConfigError, match="less than one step"):
        conv.Plan(methods=["mezo", "one-sided-4"], **{**common, "tune_budget": 4})
    with pytest.raises(ConfigError, match="--extend must be a whole number >= 0, got -1"):
        conv.Plan(methods=["mezo"], extend=-1, **common)
    with pytest.raises(ConfigError, match="needs its data"):
        conv.Plan(methods=["mezo"], **{**common, "tasks": ["sst2", "copa"]})


def test_a_grid_of_rates_and_eps_is_every_combination(monkeypatch):
    monkeypatch.setitem(conv.METHODS, "both", conv.Method(2, {}, {"lr": [1e-5, 2e-5], "eps": [1e-3, 1e-2]}))
    points = conv.grid_points("both")
    assert points == [
        {"lr": 1e-5, "eps": 1e-3},
        {"lr": 1e-5, "eps": 1e-2},
        {"lr": 2e-5, "eps": 1e-3},
        {"lr": 2e-5, "eps": 1e-2},
    ]
    assert [conv.point_name(p) for p in points][1] == "lr1e-05-eps0.01"  # each point's folder


def test_tuning_takes_the_best_validation_after_the_start():
    # the start (first value) is the same for every point and never decides
    assert conv.choose([_curve(0.9, 0.6, 0.7), _curve(0.5, 0.8, 0.6), _curve(0.5, 0.7, 0.75)]) == 1
    assert conv.choose([_curve(0.5, 0.8, 0.6), _curve(0.5, 0.7, 0.8)]) == 1  # tie on the best: the better last
    assert conv.choose([_curve(0.5, 0.8), _curve(0.5, 0.8)]) == 0  # a full tie: the grid's order
    diverged = conv.Curve([conv.Point(0, 0, None, 0.9)], None, False)  # stopped before its first validation
    assert conv.choose([diverged, _curve(0.5, 0.6)]) == 1
    assert conv.trained_score(diverged) == (-math.inf, -math.inf)


def test_reached_at_is_the_first_validation_at_or_above_the_target():
    points = _points((0, 0.50), (200, 0.60), (400, 0.70), (600, 0.65), (800, 0.72))
    assert conv.reached_at(points, 0.65).passes == 400  # not 600, where it fell back to it
    assert conv.reached_at(points, 0.70).passes == 400  # equal counts
    assert conv.reached_at(points, 0.72).passes == 800
    assert conv.reached_at(points, 0.50).passes == 0  # the start already had it
    assert conv.reached_at(points, 0.73) is None
    assert conv.reached_at(list(reversed(points)), 0.65).passes == 400  # by forward passes, not file order


def _fake_run(folder: Path, pps: int, values, test: float, seed: int):
    """A finished run: a validation every 2 steps, forward passes not recorded (steps x passes per step)."""
    folder.mkdir(parents=True)
    rows = [{"step": 0, "zero_shot_validation_accuracy": values[0]}]  # the start, as train.py logs it
    for i, value in enumerate(values[1:], 1):
        rows += [{"step": 2 * i, "loss": 0.5, "elapsed": 60.0 * i}, {"step": 2 * i, "validation_accuracy": value}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(range(len(values)), key=lambda i: values[i])
    summary = {
        "metric": "accuracy",
        "steps": 2 * (len(values) - 1),
        "stopped": "steps",
        "test": {"accuracy": test},
        "best_validation": {"step": 2 * best, "metric": values[best]},
        "peak_memory_mb": 100.0,
        "trainable_parameters": 1000,
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def _choose_1e5(plan, out: Path) -> None:
    """Tuning's choice, as chosen.json records it: lr 1e-5 for every method on SST-2."""
    point = {"point": {"lr": 1e-5}, "grid": [{"point": {"lr": 1e-5}, "best_trained": 0.6, "last": 0.6}]}
    (out / "chosen.json").write_text(json.dumps({"sst2": {m: point for m in plan.methods}}))


def test_the_table_reports_reached_at_per_seed_and_a_method_that_loses(tmp_path):
    plan = conv.Plan(
        methods=["mezo", "one-sided-4"],
        tasks=["sst2"],
        seeds=[0, 1, 2],
        budget=40,
        tune_budget=20,
        eval_passes=10,
        model="tiny",
        out=str(tmp_path),
        isolate=False,
    )
    final = tmp_path / "final" / "sst2"
    _fake_run(final / "mezo" / "seed0" / "run", 2, [0.5, 0.6, 0.7], 0.70, 0)  # target 0.7 (its last validation)
    _fake_run(final / "mezo" / "seed1" / "run", 2, [0.5, 0.8, 0.6], 0.75, 1)  # target 0.6 (the last, not the best)
    _fake_run(final / "one-sided-4" / "seed0" / "run", 5, [0.5, 0.7, 0.6], 0.65, 0)  # 0.7 at step 2: 10 passes
    _fake_run(final / "one-sided-4" / "seed1" / "run", 5, [0.5, 0.55, 0.58], 0.60, 1)  # never 0.6
    _fake_run(final / "one-sided-4" / "seed2" / "run", 5, [0.5, 0.6, 0.9], 0.80, 2)  # MeZO's seed 2 is not done
    _choose_1e5(plan, tmp_path)
    inference = {"peak_memory_mb": 90.0, "memory_measured": True, "validation": {"accuracy": 0.5}}
    (tmp_path / "inference" / "sst2").mkdir(parents=True)
    (tmp_path / "inference" / "sst2" / "result.json").write_text(json.dumps({**inference, "test": {"accuracy": 0.8}}))
    table = conv.phase_table(plan, QUIET)
    final_rows = table.split("Tuning on")[0].splitlines()
    start = next(line for line in final_rows if line.startswith("| the model as loaded |")).split(" | ")
    # its validation on MeZO's seeds (step 0), its test from the inference cell, above MeZO's test by 7.5
    assert start[6:10] == ["50.0 (50.0 / 50.0)", "80.0", "+7.5", "90 MB (1.00x) |"]
    assert "(positive: MeZO ended below its start on test)" in table
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in final_rows
        if line.startswith("| mezo |") or line.startswith("| one-sided-4 |")
    }
    assert "Target (tuned MeZO's last validation, seeds 0 / 1 / 2): 70.0 / 60.0 / –." in table
    assert rows["mezo"][4] == "6 (0.15x): 8 / 4"  # step 4 x 2 passes on seed 0, step 2 x 2 on seed 1
    assert rows["mezo"][5] == "2.0 / 1.0"  # minutes: the training time recorded at that step
    assert rows["one-sided-4"][4] == "not reached (seeds 1): 10 / no / –"  # seed 2: no target to reach
    assert rows["one-sided-4"][6] == "72.7 (70.0 / 58.0 / 90.0)"
    assert rows["one-sided-4"][7] == "68.3 (65.0 / 60.0 / 80.0)"
    assert rows["one-sided-4"][8] == "-10.0, loses (higher on 0/2 seeds)"  # over the seeds MeZO has
    assert "- mezo: seeds 2 not finished yet (left out of its row)" in table
    assert "forward passes counted as steps x passes per step" in table
    assert (tmp_path / "curves-sst2.png").read_bytes()[:4] == b"\x89PNG"


def test_a_tuned_rate_that_diverges_in_the_final_run_steps_down_for_both_seeds(tmp_path):
    plan = conv.Plan(
        methods=["mezo"], tasks=["sst2"], seeds=[0, 1], budget=40, tune_budget=20, eval_passes=10, model="tiny",
        out=str(tmp_path), isolate=False,
    )  # fmt: skip
    grid = conv.grid_points("mezo")  # 5e-5, 1e-4, 2e-4
    folder = tmp_path / "final" / "sst2" / "mezo"
    _fake_run(folder / "seed0" / "run", 2, [0.5, 0.7, 0.5], 0.70, 0)
    summary = json.loads((folder / "seed0" / "run" / "summary.json").read_text())
    (folder / "seed0" / "run" / "summary.json").write_text(json.dumps({**summary, "stopped": "diverged"}))
    _fake_run(folder / "seed1" / "run", 2, [0.5, 0.7, 0.72], 0.71, 1)  # held: it moves all the same
    entry = {"point": grid[1], "grid": [{"point": p, "best_trained": 0.6, "last": 0.6} for p in grid]}
    chosen = {"sst2": {"mezo": entry}}
    messages = []
    assert conv.step_down(plan, chosen, messages.append)
    assert entry["point"] == grid[0] and entry["diverged_in_final"] == [{"point": grid[1], "steps": {"0": 4}}]
    assert not (folder / "seed0").exists() and not (folder / "seed1").exists()  # both seeds run again
    assert (folder / "diverged" / "lr0.0001" / "seed0" / "run" / "summary.json").is_file()
    assert (folder / "diverged" / "lr0.0001" / "seed1" / "run" / "summary.json").is_file()
    assert "mezo at lr0.0001 diverged in its final run (seed 0); running it at lr5e-05" in messages[0]
    assert not conv.step_down(plan, chosen, QUIET)  # nothing diverged at the new rate (not run yet)
    # the table says why, and the tuning table marks the rate that diverged
    (tmp_path / "chosen.json").write_text(json.dumps(chosen))
    _fake_run(folder / "seed0" / "run", 2, [0.5, 0.68, 0.69], 0.69, 0)
    table = conv.phase_table(plan, QUIET)
    assert "- mezo: lr0.0001 diverged in its final run (seed 0 at step 4), so both seeds ran at" in table
    assert "| mezo | lr0.0001 | 60.0 | 60.0 | diverged in the final run |" in table
    assert "| mezo | lr5e-05 | 60.0 | 60.0 | chosen |" in table
    # at the grid's bottom there is no smaller rate: the method stays (its row notes the divergence)
    summary = json.loads((folder / "seed0" / "run" / "summary.json").read_text())
    (folder / "seed0" / "run" / "summary.json").write_text(json.dumps({**summary, "stopped": "diverged"}))
    assert not conv.step_down(plan, chosen, QUIET) and entry["point"] == grid[0]
    assert "mezo seed 0 stopped early: diverged at step 4" in conv.phase_table(plan, QUIET)
    assert conv.lower_point(grid, grid[2]) == grid[1] and conv.lower_point(grid, grid[0]) is None


@pytest.mark.parametrize("isolate", [False, True])
def test_a_final_run_that_diverges_skips_its_methods_other_seeds_at_that_rate(tmp_path, monkeypatch, isolate):
    """The rate moves down for every seed once one diverges, so the other seeds' runs at it are not started."""
    plan = conv.Plan(
        methods=["mezo", "fzoo"], tasks=["sst2"], seeds=[0, 1], budget=40, tune_budget=20, eval_passes=10,
        model="tiny", out=str(tmp_path), isolate=isolate,
    )  # fmt: skip
    grid = conv.grid_points("mezo")  # 5e-5, 1e-4, 2e-4
    mezo = {"point": grid[1], "grid": [{"point": p, "best_trained": 0.6, "last": 0.6} for p in grid]}
    fzoo = {"point": {"lr": 5e-6}, "grid": [{"point": {"lr": 5e-6}, "best_trained": 0.6, "last": 0.6}]}
    (tmp_path / "chosen.json").write_text(json.dumps({"sst2": {"mezo": mezo, "fzoo": fzoo}}))
    ran = []

    def fake_cell(cell_dir, kind):  # a finished run; MeZO at 1e-4 diverges on any seed
        cell_dir = Path(cell_dir)
        if kind == "inference":
            (cell_dir / "result.json").write_text("{}")
            return
        method, seed = cell_dir.parent.name, int(cell_dir.name.removeprefix("seed"))
        lr = conv.yaml.safe_load((cell_dir / "cell.yaml").read_text())["optimizer"]["lr"]
        ran.append((method, seed, lr))
        _fake_run(cell_dir / "run", 2, [0.5, 0.6], 0.6, seed)
        if (method, lr) == ("mezo", 1e-4):
            summary = json.loads((cell_dir / "run" / "summary.json").read_text())
            (cell_dir / "run" / "summary.json").write_text(json.dumps({**summary, "stopped": "diverged"}))

    if isolate:

        class FakeProcess:  # the cell's process, finished as soon as it starts
            returncode = 0

            def __init__(self, args, **kwargs):
                fake_cell(args[3], args[4])

            def poll(self):
                return 0

            def wait(self, timeout=None):
                return 0

        monkeypatch.setattr(conv.subprocess, "Popen", FakeProcess)
        monkeypatch.setattr(conv.time, "sleep", lambda seconds: None)
    else:
        monkeypatch.setattr(conv, "run_cell", lambda cell_dir, kind, **kwargs: fake_cell(cell_dir, kind))
    messages = []
    assert conv.phase_final(plan, None, messages.append) == []
    assert ran == [("mezo", 0, 1e-4), ("fzoo", 0, 5e-6), ("fzoo", 1, 5e-6), ("mezo", 0, 5e-5), ("mezo", 1, 5e-5)]
    assert "SST-2: mezo seed 0 diverged: its rate moves down for every seed, so SST-2: mezo seed 1 will not run" in (
        "\n".join(messages)
    )
    chosen = json.loads((tmp_path / "chosen.json").read_text())["sst2"]["mezo"]
    assert chosen["point"] == grid[0] and chosen["diverged_in_final"] == [{"point": grid[1], "steps": {"0": 2}}]


def test_runs_set_aside_twice_at_one_rate_are_all_kept(tmp_path):
    folder = tmp_path / "final" / "sst2" / "mezo"
    for attempt in (1, 2):
        _fake_run(folder / "seed0" / "run", 2, [0.5, 0.6], 0.6 + attempt / 100, 0)
        assert conv.set_aside(folder, [0, 1], folder / "diverged" / "lr5e-05").name == (
            "lr5e-05" if attempt == 1 else "lr5e-05-2"
        )
    tests = [
        json.loads((folder / "diverged" / name / "seed0" / "run" / "summary.json").read_text())["test"]["accuracy"]
        for name in ("lr5e-05", "lr5e-05-2")
    ]
    assert tests == [0.61, 0.62] and not (folder / "seed0").exists()


def test_a_best_rate_at_the_grids_edge_tunes_one_more_past_it_spaced_as_the_grid():
    grid = conv.grid_points("mezo")  # 5e-5, 1e-4, 2e-4
    assert conv.beyond_edge("mezo", grid, 0, 2) == {"lr": 2.5e-5}  # 5e-5 x (5e-5 / 1e-4)
    assert conv.beyond_edge("mezo", grid, 2, 2) == {"lr": 4e-4}
    assert conv.beyond_edge("mezo", grid, 1, 2) is None  # inside: tuned
    assert conv.beyond_edge("mezo", grid, 0, 0) is None  # --extend 0: the grid alone
    once = [*grid, {"lr": 2.5e-5}]
    assert conv.beyond_edge("mezo", once, 3, 2) == {"lr": 1.25e-5}
    assert conv.beyond_edge("mezo", [*once, {"lr": 1.25e-5}], 4, 2) is None  # two past the bottom: enough
    assert conv.beyond_edge("mezo", once, 2, 2) == {"lr": 4e-4}  # the other side has its own two
    both = [{"lr": 1e-5, "eps": 1e-3}, {"lr": 2e-5, "eps": 1e-3}]
    assert conv.beyond_edge("mezo", both, 0, 2) is None  # only grids of rates alone extend


def test_tuning_grows_past_the_edge_until_the_best_is_inside_and_moves_finals_it_displaced(tmp_path, monkeypatch):
    plan = conv.Plan(
        methods=["mezo"], tasks=["sst2"], seeds=[0, 1], budget=40, tune_budget=20, eval_passes=10, model="tiny",
        out=str(tmp_path), isolate=False,
    )  # fmt: skip
    peak = math.log(2.5e-5)  # validation falls with the distance (in log rate) from 2.5e-5
    ran = []

    def fake_cells(cells, plan, deadline, log):
        for cell in cells:
            if not cell.done:
                ran.append(cell.point["lr"])
                value = 0.8 - 0.05 * abs(math.log(cell.point["lr"]) - peak)
                _fake_run(cell.dir / "run", 2, [0.5, value - 0.01, value], value, 0)
        return []

    monkeypatch.setattr(conv, "run_cells", fake_cells)
    old = {"point": {"lr": 5e-5}, "grid": [], "diverged_in_final": [{"point": {"lr": 1e-4}, "steps": {"0": 9}}]}
    (tmp_path / "chosen.json").write_text(json.dumps({"sst2": {"mezo": old}}))
    folder = tmp_path / "final" / "sst2" / "mezo"
    _fake_run(folder / "seed0" / "run", 2, [0.5, 0.7, 0.7], 0.7, 0)
    messages = []
    chosen, failures = conv.phase_tune(plan, None, messages.append)
    assert ran == [5e-5, 1e-4, 2e-4, 2.5e-5, 1.25e-5] and failures == []  # 2.5e-5 won, 1.25e-5 lost: inside
    entry = chosen["sst2"]["mezo"]
    assert entry["point"] == {"lr": 2.5e-5} and len(entry["grid"]) == 5
    assert entry["diverged_in_final"] == old["diverged_in_final"]  # the history of the final runs stays
    assert (folder / "superseded" / "lr5e-05" / "seed0" / "run" / "summary.json").is_file()
    assert not (folder / "seed0").exists()  # every seed runs again at the new rate
    assert "mezo's best rate, lr5e-05, is at its grid's edge: tuning lr2.5e-05 too" in messages[0]
    assert "lr2.5e-05, is at its grid's edge: tuning lr1.25e-05 too" in messages[1]
    assert "now tuned to lr2.5e-05, not lr5e-05: its final runs at that rate moved to" in messages[2]
    assert json.loads((tmp_path / "chosen.json").read_text()) == chosen
    # a step down after tuning is kept when tuning is run again and finds nothing new
    entry.update(point={"lr": 1.25e-5}, diverged_in_final=[{"point": {"lr": 2.5e-5}, "steps": {"1": 3}}])
    (tmp_path / "chosen.json").write_text(json.dumps(chosen))
    ran.clear()
    again, _ = conv.phase_tune(plan, None, QUIET)
    assert ran == [] and again["sst2"]["mezo"]["point"] == {"lr": 1.25e-5}
    rows = [row for row in conv.tuning_table(plan, "sst2", again) if row.startswith("| mezo |")]
    assert rows[3] == "| mezo | lr2.5e-05 | 80.0 | 80.0 | past the grid's edge, diverged in the final run |"
    assert rows[4] == "| mezo | lr1.25e-05 | 76.5 | 76.5 | past the grid's edge, chosen |"


def _validations(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation accuracy) of a run, the start's (logged as zero_shot_validation_accuracy) included."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["step"], r.get("validation_accuracy", r.get("zero_shot_validation_accuracy")))
        for r in rows
        if "validation_accuracy" in r or "zero_shot_validation_accuracy" in r
    ]


def test_three_phases_end_to_end_then_skipped_resumed_and_guarded(model_dir, tmp_path, monkeypatch):
    import zotune.train

    real_run = zotune.train.run
    grids = {"mezo": [3e-2, 1e-3], "one-sided-4": [1e-3, 3e-2]}  # rates a tiny model moves at; the larger wins,
    for name, lrs in grids.items():  # first in one grid and last in the other
        method = conv.METHODS[name]
        monkeypatch.setitem(conv.METHODS, name, conv.Method(method.passes_per_step, method.overrides, {"lr": lrs}))
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    argv = [
        "--no-isolate",
        "--methods",
        "mezo,one-sided-4",
        "--tasks",
        "sst2",
        "--seeds",
        "0,1",
        "--budget",
        "12",
        "--tune-budget",
        "10",
        "--eval-passes",
        "4",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--append",
        str(results),
        *TINY_DATA,
    ]
    assert conv.main(argv, log=QUIET) == 0

    chosen = json.loads((out / "chosen.json").read_text())["sst2"]
    for method, pps in (("mezo", 2), ("one-sided-4", 5)):
        scores = []
        for lr in grids[method]:  # the rule, from the runs' own metrics: best after the start, then last, then order
            trained = [v for s, v in _validations(out / "tune" / "sst2" / method / f"lr{lr:g}" / "run") if s > 0]
            scores.append((max(trained), trained[-1]))
        assert chosen[method]["point"] == {"lr": grids[method][scores.index(max(scores))]}
        for seed in (0, 1):
            run = out / "final" / "sst2" / method / f"seed{seed}" / "run"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["steps"] == 12 // pps and summary.get("forward_passes", 12 // pps * pps) <= 12
            assert [s for s, _ in _validations(run)] == list(range(0, 12 // pps + 1, max(1, 4 // pps)))
    table = (out / "table.md").read_text()
    assert "| mezo | 2 |" in table and "| one-sided-4 | 5 |" in table and (out / "curves-sst2.png").is_file()
    inference = json.loads((out / "inference" / "sst2" / "result.json").read_text())
    assert set(inference) >= {"peak_memory_mb", "validation", "test"}  # the model as loaded, tested for the table
    assert f"| {100 * inference['test']['accuracy']:.1f} |" in next(
        line for line in table.splitlines() if line.startswith("| the model as loaded |")
    )
    appended = results.read_text()
    assert "forward passes to tuned MeZO's accuracy" in appended and "- machine: " in appended
    assert "- command: `python benchmarks/convergence.py --no-isolate --methods mezo,one-sided-4" in appended

    def no_run(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(zotune.train, "run", no_run)
    assert conv.main(argv[: -len(TINY_DATA) - 2] + TINY_DATA, log=QUIET) == 0  # every cell done: nothing runs
    assert (out / "table.md").read_text() == table

    partial = out / "final" / "sst2" / "mezo" / "seed1"  # stopped after its state, before its summary
    (partial / "run" / "summary.json").unlink()
    calls = []

    def spy(config=None, **kwargs):
        calls.append((config, kwargs.get("resume")))
        return real_run(config, **kwargs)

    monkeypatch.setattr(zotune.train, "run", spy)
    assert conv.main(["--resume", str(out), "--phase", "final"], log=QUIET) == 0  # the plan's options, from plan.json
    assert calls == [(None, partial / "run")] and (partial / "run" / "summary.json").is_file()

    plan = (out / "plan.json").read_text()
    assert conv.main(["--resume", str(out), "--budget", "20"], log=QUIET) == 2  # other steps: refused, not mixed
    assert (out / "plan.json").read_text() == plan


def test_a_cell_started_before_a_config_field_was_added_still_resumes(tmp_path):
    """cell.yaml written by an older zotune lacks later fields: at their defaults they are the same config."""
    import yaml

    from zotune.config import RunConfig

    config = RunConfig()
    cell = conv.Cell("tune", "sst2", "mezo", 0, {"lr": 1e-5}, tmp_path, config)
    older = config.to_dict()
    del older["optimizer"]["lowrank_rank"]  # a field this version added, at its default
    (tmp_path / "cell.yaml").write_text(yaml.safe_dump(older))
    assert conv._check(cell) is True
    older["optimizer"]["lr"] = 2e-5  # a real difference is still refused
    (tmp_path / "cell.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(ConfigError, match="another config"):
        conv._check(cell)


def test_a_cell_runs_in_one_process_at_a_time(tmp_path):
    """A second runner of a cell (a restart begun before the stopped one saved) is refused; a stale lock is not."""
    import subprocess
    import sys as _sys

    cell = tmp_path / "cell"
    _fake_run(cell / "run", 2, [0.5, 0.6], 0.6, 0)  # a finished cell: run_cell returns once it holds the lock
    (cell / "cell.yaml").write_text("{}\n")
    (cell / "lock").write_text(str(os.getpid()))  # this process is alive: someone runs the cell
    with pytest.raises(ConfigError, match="is being run by process"):
        conv.run_cell(cell, "final", isolated=False, log=QUIET)
    gone = subprocess.run([_sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cell / "lock").write_text(gone.stdout.strip())  # a runner that has exited
    conv.run_cell(cell, "final", isolated=False, log=QUIET)
    assert not (cell / "lock").exists()  # taken over, then released


def test_the_table_shows_a_probes_fractional_passes_as_they_are(tmp_path):
    plan = conv.Plan(
        methods=["mezo", "lp-mezo"], tasks=["sst2"], seeds=[0], budget=40, tune_budget=20, eval_passes=10,
        model="tiny", out=str(tmp_path), isolate=False,
    )  # fmt: skip
    final = tmp_path / "final" / "sst2"
    _fake_run(final / "mezo" / "seed0" / "run", 2, [0.5, 0.6, 0.7], 0.70, 0)  # target 0.7
    probe = final / "lp-mezo" / "seed0" / "run"
    _fake_run(probe, 2, [0.8, 0.75, 0.7], 0.78, 0)  # the start is above the target already
    lines = (probe / "metrics.jsonl").read_text().splitlines()
    first = {**json.loads(lines[0]), "init": "probe", "init_forward_passes": 2.5, "init_seconds": 6.0}
    (probe / "metrics.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    _choose_1e5(plan, tmp_path)
    table = conv.phase_table(plan, QUIET)
    row = next(line for line in table.splitlines() if line.startswith("| lp-mezo |")).split(" | ")
    assert row[4] == "2.5 (0.06x): 2.5"  # reached at the start: the probe's 2.5 batches' worth, not rounded to 2
