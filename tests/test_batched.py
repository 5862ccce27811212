"""Batched steps (``MeZO(batched=True)``, FZOO's batched form): the points, the losses, replay, errors, the loop."""

import copy
import json
import warnings

import numpy as np
import pytest
import tiny
import torch

import zotune
from zotune import FZOO, BatchedClosure, HiZOO, KerZOO, MeZO, replay
from zotune.cli import main
from zotune.config import OptimConfig
from zotune.optim import make_optimizer
from zotune.trajectory import MultiStep, Skip, read_trajectory

_model, _X, _Y = tiny.mlp, tiny.MLP_X, tiny.MLP_Y


def _loss(model):
    return lambda: torch.nn.functional.cross_entropy(model(_X), _Y)


# (optimizer class, keyword arguments): every estimator, and sparse and low-rank directions
BUILDS = {
    "fzoo": (FZOO, dict(lr=1e-3, n_perturbations=4)),
    "two-sided n2": (MeZO, dict(lr=1e-2, n_perturbations=2)),
    "one-sided": (MeZO, dict(lr=1e-2, estimator="one-sided", n_perturbations=3)),
    "hizoo": (HiZOO, dict(lr=1e-2)),
    "kerzoo": (KerZOO, dict(lr=1e-2)),
    "sparse": (MeZO, dict(lr=1e-2, sparsity=0.5)),
    "lowrank": (MeZO, dict(lr=1e-2, distribution="lowrank", lowrank_every=2)),
}


class _Recording(BatchedClosure):
    """A BatchedClosure that keeps the stacks it was given and the parameters it saw."""

    def at(self, params, stacks):
        self.stacks = [s.clone() for s in stacks]
        self.params_then = [p.detach().clone() for p in params]
        return super().at(params, stacks)


def test_each_point_is_one_sweep_from_the_clean_weights_and_the_weights_never_move():
    model = _model()
    clean = [p.detach().clone() for p in model.parameters()]
    opt = FZOO(model.named_parameters(), lr=1e-3, n_perturbations=4, seed=3, batched=True)
    closure = _Recording(model, _loss(model))
    opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(closure.params_then, clean))  # nothing perturbed in place
    assert all(s.shape[0] == 5 for s in closure.stacks)  # l_0 and N = 4 perturbed points
    assert all(torch.equal(s[0], c) for s, c in zip(closure.stacks, clean))  # point 0: theta itself
    eps = float(np.float32(1e-3))
    for j in range(4):  # point j + 1: theta + eps u_j, u_j the run's Rademacher direction j (from the keyed stream)
        for (name, p), s, c in zip(model.named_parameters(), closure.stacks, clean):
            seed = zotune.rng.step_seed(3, 0, j)
            z = zotune.rng.z("rademacher", seed, zotune.rng.param_key(name), 0, p.numel())
            expected = (c.double() + eps * torch.from_numpy(z).reshape(p.shape).double()).float()
            # float32 theta + eps * (+-1) rounds once in both: equal bit for bit
            assert torch.equal(s[j + 1], expected), (name, j)


def test_the_first_perturbed_point_is_the_sequential_steps_bit_for_bit():
    """Sequential and batched FZOO reach theta + eps u_0 by the same single sweep from clean weights."""
    seen = []
    model = _model()
    opt = FZOO(model.named_parameters(), lr=1e-3, n_perturbations=3, seed=1)

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        return _loss(model)()

    opt.step(closure)
    model_b = _model()
    opt_b = FZOO(model_b.named_parameters(), lr=1e-3, n_perturbations=3, seed=1, batched=True)
    rec = _Recording(model_b, _loss(model_b))
    opt_b.step(rec)
    assert all(torch.equal(s[1], q) for s, q in zip(rec.stacks, seen[1]))


@pytest.mark.parametrize("build", list(BUILDS))
def test_batched_losses_are_the_losses_at_each_point(build):
    cls, kwargs = BUILDS[build]
    model = _model()
    opt = cls(model.named_parameters(), seed=2, batched=True, **kwargs)
    closure = _Recording(model, _loss(model))
    opt.step(closure)
    probe = copy.deepcopy(model)
    expected = []
    for k in range(closure.stacks[0].shape[0]):
        with torch.no_grad():
            for p, s in zip(probe.parameters(), closure.stacks):
                p.copy_(s[k])
            expected.append(float(_loss(probe)()))
    # vmap runs the same float32 arithmetic batched (other summation orders): a few ulps of a loss near 1
    assert np.allclose(opt.last_losses, expected[:2], rtol=1e-6, atol=0)
    assert opt.forward_passes == len(expected)


@pytest.mark.parametrize("build", list(BUILDS))
def test_a_batched_run_replays_bit_for_bit_skips_included(build, tmp_path):
    cls, kwargs = BUILDS[build]
    model = _model()
    base = copy.deepcopy(model)
    path = tmp_path / "run.zot"
    opt = cls(model.named_parameters(), seed=4, batched=True, trajectory=path, on_nonfinite="skip", **kwargs)
    for t in range(6):
        closure = BatchedClosure(model, _loss(model))
        if t == 2:  # a NaN at the second point: the step is skipped, nothing moved
            before = [p.detach().clone() for p in model.parameters()]
            at = closure.at
            closure.at = lambda params, stacks: at(params, stacks).index_fill(0, torch.tensor([1]), float("nan"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step(closure)
            assert opt.last_step_skipped
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        else:
            opt.step(closure)
    traj = read_trajectory(path)
    assert traj.header["batched"] is True and traj.header["fuse_next"] is False
    skips = [r for r in traj.records if isinstance(r, Skip)]
    assert [(r.step, r.phase) for r in skips] == [(2, 2)]
    replay(base, path)
    for (name, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name


def test_batched_and_sequential_fzoo_take_the_same_step_up_to_rounding():
    """The same directions and estimator; only where the losses are taken differs (copies, not in place)."""
    runs = []
    lr, n = 1e-4, 4
    for batched in (False, True):
        model = _model()
        opt = FZOO(model.named_parameters(), lr=lr, n_perturbations=n, seed=5, batched=batched)
        closure = _loss(model)
        opt.step(BatchedClosure(model, closure) if batched else closure)
        runs.append((model, np.array(opt.projected_grads)))
    (a, ga), (b, gb) = runs
    # the coefficients divide loss differences of ~1e-3 by their spread, so float32 losses that differ in the
    # last bits (the sequential sweeps' rounding residue, vmap's summation order) move them by up to ~1e-3
    assert np.allclose(ga, gb, rtol=1e-2)
    # each weight moves by lr/N sum_j c_j u_j with u_j = +-1, so the two steps differ by at most
    # lr/N sum_j |dc_j|, plus the residue the sequential sweeps leave (a few ulps of weights below 4: 1e-6)
    bound = lr / n * float(np.abs(ga - gb).sum()) + 1e-6
    assert all(float((p - q).detach().abs().max()) <= bound for p, q in zip(a.parameters(), b.parameters()))


def test_bad_uses_are_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="fuse_next=False"):
        MeZO(model.named_parameters(), lr=1e-3, batched=True, fuse_next=True)
    opt = FZOO(model.named_parameters(), lr=1e-3, batched=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="BatchedClosure"):
        opt.step(_loss(model))
    other = _model(1)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.step(BatchedClosure(other, _loss(other)))
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(BatchedClosure(model, lambda: torch.nn.functional.cross_entropy(model(_X), _Y, reduction="none")))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing moved by the failures
    assert opt.state_dict()["mezo"]["step"] == 0


def test_a_state_saved_batched_does_not_load_into_a_sequential_optimizer():
    model = _model()
    opt = FZOO(model.named_parameters(), lr=1e-3, batched=True)
    opt.step(BatchedClosure(model, _loss(model)))
    state = opt.state_dict()
    with pytest.raises(ValueError, match="variant options"):
        FZOO(model.named_parameters(), lr=1e-3).load_state_dict(state)
    again = FZOO(model.named_parameters(), lr=1e-3, batched=True)
    again.load_state_dict(state)


def test_the_config_builds_a_batched_optimizer_without_fuse_next():
    model = _model()
    opt = make_optimizer(
        model.named_parameters(), OptimConfig(lr=1e-3, estimator="fzoo", n_perturbations=2, batched=True)
    )
    assert opt.batched and not opt.fuse_next


@pytest.mark.parametrize("tuning", ["full", "lora", "prefix"])
def test_the_training_loop_runs_batched_fzoo_and_replays_it(model_dir, tmp_path, capsys, tuning):
    """The loop wraps its closure in a BatchedClosure; PEFT's LoRA and the prefix run under vmap unchanged."""
    out = tmp_path / "run"
    args = [
        "train",
        "--model.name",
        str(model_dir),
        "--model.tuning",
        tuning,
        "--steps",
        "3",
        "--eval_every",
        "3",
        "--train",
        "24",
    ]
    args += ["--validation", "8", "--test", "8", "--batch_size", "4", "--lr", "1e-4", "--progress", "false"]
    args += ["--save_best", "false", "--output_dir", str(out), "--optimizer.estimator", "fzoo"]
    args += ["--optimizer.distribution", "rademacher", "--optimizer.n_perturbations", "3"]
    args += ["--optimizer.batched", "true"]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "forward_passes" in m]
    assert steps[-1]["forward_passes"] == 3 * 4  # N + 1 points a step, counted as forward passes
    traj = read_trajectory(out / "trajectory.zot")
    assert traj.header["batched"] is True
    assert all(isinstance(r, MultiStep) for r in traj.records[1:])
    # base + trajectory reproduces the run's test accuracy (the final weights: save_best is off)
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--config", str(out / "config.yaml"), "--trajectory", str(out / "trajectory.zot")]) == 0
    assert f"accuracy {100 * summary['test']['accuracy']:.2f}" in capsys.readouterr().out
