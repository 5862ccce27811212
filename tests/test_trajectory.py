"""Trajectory files, replay and exact resume."""

import json
import struct

import pytest
import torch
from conftest import mse_closure, ulp32

import zotune
from zotune import MeZO, TrajectoryError, read_trajectory, replay
from zotune.trajectory import Flush, Hyper, Skip, Step, TrajectoryWriter


def _train(model, data, steps, path=None, **kwargs):
    opt = MeZO(model.named_parameters(), lr=kwargs.pop("lr", 5e-3), trajectory=path, **kwargs)
    for _ in range(steps):
        opt.step(mse_closure(model, *data))
    opt.flush()
    return opt


def _assert_replayed(trained, replayed, atol=None):
    """Bit for bit, or (atol) within rounding."""
    for (name, p), q in zip(trained.named_parameters(), replayed.parameters()):
        if atol is None:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(q, p, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(weight_decay=0.1, distribution="rademacher"),
        dict(fuse_next=True, seed=9),
        dict(fuse_next=True, distribution="gaussian-fast"),
    ],
)
def test_replay_rebuilds_the_trained_weights(tmp_path, toy_model, regression_data, options):
    trained = toy_model()
    path = tmp_path / "run.zot"
    _train(trained, regression_data, 40, path, **options)
    base = toy_model()
    assert not torch.equal(base[0].weight, trained[0].weight)
    replay(base, path)
    _assert_replayed(trained, base)


def test_fast_replay_is_within_rounding(tmp_path, toy_model, regression_data):
    trained = toy_model()
    _train(trained, regression_data, 40, tmp_path / "run.zot", weight_decay=0.1)
    base = toy_model()
    replay(base, tmp_path / "run.zot", exact=False)
    # exact=False applies a step as one float32 sweep theta (1 - lr wd) - lr g z; training took three (+eps z,
    # -2 eps z, then back and the update), whose roundings it does not repeat: <= 4 half-ulps a step of
    # |theta| + 2 eps |z| < 2 (|theta| <= 1.31 here), 40 steps: 40 * 2 ulp(1) ~ 1e-5 (measured 6e-7). Decay on
    # the biases too ends 1.4e-2 off; the first step left out, 3e-3.
    assert max(float(p.detach().abs().max()) for p in trained.parameters()) < 1.5
    _assert_replayed(trained, base, atol=40 * 2 * ulp32(1.0))


def test_fast_replay_of_a_fused_run_with_flushes(tmp_path, toy_model, regression_data):
    """A flush record in single-sweep replay removes nothing (no perturbation was fused in there)."""
    trained = toy_model()
    path = tmp_path / "run.zot"
    opt = MeZO(trained.named_parameters(), lr=5e-3, fuse_next=True, trajectory=path)
    for t in range(20):
        opt.step(mse_closure(trained, *regression_data))
        if t % 7 == 6:
            opt.flush()  # an evaluation mid-run
    opt.flush()
    assert sum(isinstance(r, Flush) for r in read_trajectory(path).records) == 3
    base = toy_model()
    replay(base, path, exact=False)
    # as test_fast_replay_is_within_rounding: <= 4 half-ulps of |theta| + 2 eps |z| < 2 a step, 20 steps
    assert max(float(p.detach().abs().max()) for p in trained.parameters()) < 1.5
    _assert_replayed(trained, base, atol=20 * 2 * ulp32(1.0))


def test_replay_with_schedule_skips_and_flushes(tmp_path, toy_model, regression_data):
    trained = toy_model()
    path = tmp_path / "run.zot"
    opt = MeZO(trained.named_parameters(), lr=1e-2, fuse_next=True, on_nonfinite="skip", trajectory=path)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=30)
    closure = mse_closure(trained, *regression_data)
    for t in range(30):
        if t == 7:
            with pytest.warns(RuntimeWarning):
                opt.step(lambda: torch.tensor(float("nan")))
        else:
            opt.step(closure)
        if t % 10 == 3:
            with opt.unperturbed():  # an evaluation between steps
                closure()
        sched.step()
    opt.eps = 2e-3  # a change of eps is recorded too
    opt.step(closure)
    opt.flush()
    kinds = {type(r) for r in read_trajectory(path).records}
    assert kinds == {Hyper, Step, Skip, Flush}
    base = toy_model()
    replay(base, path)
    _assert_replayed(trained, base)


@pytest.mark.parametrize(
    "cls,options", [(MeZO, dict(fuse_next=True)), (zotune.MeZOAdam, dict(state="stored"))], ids=["fused", "adam"]
)
def test_replay_of_the_first_steps_gives_the_weights_held_then(tmp_path, toy_model, regression_data, cls, options):
    """``steps=k`` rebuilds, bit for bit, the weights the run held after k steps (what it validated there),
    with a skipped step and evaluations (flushes) among them."""
    trained = toy_model()
    path = tmp_path / "run.zot"
    opt = cls(trained.named_parameters(), lr=1e-2, on_nonfinite="skip", trajectory=path, **options)
    closure = mse_closure(trained, *regression_data)
    held = {}
    for t in range(12):
        if t == 2:
            with pytest.warns(RuntimeWarning):
                opt.step(lambda: torch.tensor(float("nan")))
        else:
            opt.step(closure)
        if t + 1 in (3, 4, 9):  # validate after 3, 4 and 9 steps, as zotune train does
            with opt.unperturbed():
                held[t + 1] = [p.detach().clone() for p in trained.parameters()]
    opt.flush()
    assert read_trajectory(path).n_steps == 12
    for k, weights in held.items():
        base = toy_model()
        replay(base, path, steps=k)
        assert all(torch.equal(p, q) for p, q in zip(base.parameters(), weights)), k
    base = toy_model()
    replay(base, path, steps=0)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), toy_model().parameters()))
    with pytest.raises(TrajectoryError, match="cannot replay 13 steps: this trajectory holds 12"):
        replay(toy_model(), path, steps=13)


def test_twenty_thousand_steps_fit_in_half_a_megabyte(tmp_path, toy_model):
    model = toy_model()
    opt = MeZO(model.named_parameters(), lr=1e-3, weight_decay=0.1, trajectory=tmp_path / "t.zot")
    assert len(opt.param_groups) == 2
    header = opt._header()
    writer = TrajectoryWriter(tmp_path / "big.zot", header)
    writer.append(Hyper(1e-3, (0.1, 0.0)))
    for t in range(20_000):
        writer.append(Step(t, 0.5, (1e-3, 1e-3)))
    writer.close()
    size = (tmp_path / "big.zot").stat().st_size
    assert size < 500_000, size
    assert len(read_trajectory(tmp_path / "big.zot").steps) == 20_000


def _recorded(tmp_path, toy_model, regression_data, steps=5):
    path = tmp_path / "run.zot"
    _train(toy_model(), regression_data, steps, path)
    return path


def test_truncated_file_names_the_record(tmp_path, toy_model, regression_data):
    path = _recorded(tmp_path, toy_model, regression_data)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(TrajectoryError, match=r"truncated trajectory: record 5 \(byte \d+\) is incomplete"):
        read_trajectory(path)
    path.write_bytes(data[:20])
    with pytest.raises(TrajectoryError, match="header is incomplete"):
        read_trajectory(path)


def test_corrupted_file_names_the_record(tmp_path, toy_model, regression_data):
    path = _recorded(tmp_path, toy_model, regression_data)
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x40  # a flipped bit inside the last record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match=r"corrupted trajectory: record 5 .* fails its checksum"):
        read_trajectory(path)
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x40
    data[-15] = ord("Q")  # an unknown record type
    path.write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match=r"record \d+ .* unknown type b'Q'"):
        read_trajectory(path)
    path.write_bytes(b"PK\x03\x04 not a trajectory at all")
    with pytest.raises(TrajectoryError, match="bad magic"):
        read_trajectory(path)
    with pytest.raises(TrajectoryError, match="cannot read trajectory"):
        read_trajectory(tmp_path / "missing.zot")


def test_header_is_documented_json(tmp_path, toy_model, regression_data):
    path = _recorded(tmp_path, toy_model, regression_data)
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<6sHI", data)
    header = json.loads(data[12 : 12 + length])
    assert (magic, version) == (b"ZOTRAJ", 1)
    assert header["format"] == "zotune-trajectory" and header["zotune_version"] == zotune.__version__
    assert [p["name"] for p in header["params"]] == [n for n, _ in toy_model().named_parameters()]


def test_replay_onto_another_model_fails_before_modifying(tmp_path, toy_model, regression_data):
    path = _recorded(tmp_path, toy_model, regression_data)
    other = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.LayerNorm(9), torch.nn.Linear(9, 3))
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(
        TrajectoryError,
        match=r"parameter '0.weight' is float32 \[9, 6\] in the model but "
        r"float32 \[8, 6\] in the trajectory",
    ):
        replay(other, path)
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), before))
    renamed = torch.nn.ModuleDict({"encoder": toy_model()})
    with pytest.raises(TrajectoryError, match="has no parameter named 0.weight"):
        replay(renamed, path)
    with pytest.raises(TrajectoryError, match="is bfloat16"):
        replay(toy_model(dtype=torch.bfloat16), path)


def test_unnamed_parameters_replay_by_position(tmp_path, toy_model, regression_data):
    trained, base = toy_model(), toy_model()
    opt = MeZO(trained.parameters(), lr=5e-3, trajectory=tmp_path / "u.zot")
    for _ in range(10):
        opt.step(mse_closure(trained, *regression_data))
    with pytest.raises(TrajectoryError, match="unnamed parameters"):
        replay(base, tmp_path / "u.zot")
    replay(list(base.parameters()), tmp_path / "u.zot")
    _assert_replayed(trained, base)


def _checkpoint(model, opt):
    """What a checkpoint holds: the model's tensors and the optimizer's JSON state (no pickle)."""
    state = json.loads(json.dumps(opt.state_dict()))
    return {k: v.clone() for k, v in model.state_dict().items()}, state


@pytest.mark.parametrize("fuse_next", [False, True])
def test_resume_is_bitwise_identical(tmp_path, toy_model, regression_data, fuse_next):
    steps, k = 30, 12
    # The uninterrupted run (it saves at step k, as the interrupted one did).
    full = toy_model()
    opt = MeZO(
        full.named_parameters(),
        lr=5e-3,
        weight_decay=0.1,
        fuse_next=fuse_next,
        seed=5,
        trajectory=tmp_path / "full.zot",
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for t in range(steps):
        if t == k:
            _checkpoint(full, opt)
        opt.step(mse_closure(full, *regression_data))
        sched.step()
    opt.flush()

    # The interrupted run: k steps, a checkpoint, a few more steps that are lost, then a crash.
    part = toy_model()
    opt = MeZO(
        part.named_parameters(),
        lr=5e-3,
        weight_decay=0.1,
        fuse_next=fuse_next,
        seed=5,
        trajectory=tmp_path / "part.zot",
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(k):
        opt.step(mse_closure(part, *regression_data))
        sched.step()
    weights, opt_state = _checkpoint(part, opt)
    sched_state = sched.state_dict()
    for _ in range(3):
        opt.step(mse_closure(part, *regression_data))

    # Resume in fresh objects from the checkpoint.
    resumed = toy_model(seed=99)
    resumed.load_state_dict(weights)
    opt = MeZO(
        resumed.named_parameters(),
        lr=5e-3,
        weight_decay=0.1,
        fuse_next=fuse_next,
        seed=0,
        trajectory=tmp_path / "part.zot",
    )
    opt.load_state_dict(opt_state)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    sched.load_state_dict(sched_state)
    for _ in range(steps - k):
        opt.step(mse_closure(resumed, *regression_data))
        sched.step()
    opt.flush()
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # The resumed trajectory lost the three steps after the checkpoint and replays to the same weights.
    assert [r.step for r in read_trajectory(tmp_path / "part.zot").steps] == list(range(steps))
    base = toy_model()
    replay(base, tmp_path / "part.zot")
    _assert_replayed(full, base)


def test_state_dict_rejects_another_optimizer(toy_model, regression_data):
    model = toy_model()
    opt = MeZO(model.named_parameters(), lr=1e-3)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="distribution='gaussian'"):
        MeZO(model.named_parameters(), lr=1e-3, distribution="rademacher").load_state_dict(state)
    with pytest.raises(ValueError, match="saved for other parameters"):
        MeZO(list(model.named_parameters())[:2], lr=1e-3).load_state_dict(state)
    with pytest.raises(ValueError, match="not a MeZO optimizer state"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=1).state_dict())


def test_trajectory_started_mid_run_cannot_replay_from_base(tmp_path, toy_model, regression_data):
    model = toy_model()
    opt = _train(model, regression_data, 3)
    state = opt.state_dict()
    opt = MeZO(model.named_parameters(), lr=5e-3, trajectory=tmp_path / "late.zot")
    opt.load_state_dict(state)
    opt.step(mse_closure(model, *regression_data))
    with pytest.raises(TrajectoryError, match="starts at step 3"):
        replay(toy_model(), tmp_path / "late.zot")
