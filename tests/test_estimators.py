"""The estimator registry and FZOO: layouts every estimator must keep, FZOO's coefficients, skips and replay."""

import math
import struct
import warnings

import numpy as np
import pytest
import torch

import zotune
from zotune import FZOO, MeZO, NonFiniteLossError, replay
from zotune.config import ConfigError, OptimConfig
from zotune.optim import estimators, make_optimizer
from zotune.trajectory import MultiStep, Skip, read_trajectory


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        ("a", torch.nn.Parameter(torch.randn(5, 3, generator=gen))),
        ("b", torch.nn.Parameter(torch.randn(4, generator=gen))),
    ]


def _scripted(values):
    """A closure returning ``values`` in turn (then repeating the last), counting its calls."""
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(values[min(len(calls), len(values)) - 1])

    closure.calls = calls
    return closure


@pytest.mark.parametrize("name", list(estimators.ESTIMATORS))
def test_every_estimator_carries_what_its_sweeps_add_up_to(name):
    """After sweep k the parameters hold exactly carry_after(k): the undo and the update rely on it."""
    est = estimators.ESTIMATORS[name]
    for n in range(est.min_n, (est.max_n or 5) + 1):
        held: dict[int, float] = {}
        for k, pairs in enumerate(est.sweeps(n)):
            for j, mult in pairs:
                held[j] = held.get(j, 0.0) + mult
            nonzero = {j: m for j, m in held.items() if m != 0.0}
            carry = est.carry_after(k)
            assert nonzero == ({} if carry is None else {carry[0]: carry[1]}), (name, n, k)
        assert est.passes(n) == len(est.sweeps(n))


@pytest.mark.parametrize("name", list(estimators.ESTIMATORS))
def test_the_first_sweeps_do_not_depend_on_n(name):
    """A skip record stores the failed evaluation, not n: replay lays the step out with n = phase."""
    est = estimators.ESTIMATORS[name]
    for n in range(est.min_n, (est.max_n or 5) + 1):
        for m in range(n, (est.max_n or 7) + 1):
            assert est.sweeps(m)[: est.passes(n)] == est.sweeps(n)


def test_fzoo_coefficients_are_the_one_sided_ones_over_the_std_of_the_perturbed_losses():
    losses = [1.0, 1.3, 0.9, 1.05, 1.2]  # l_0, then l_1..l_4
    opt = FZOO(_params(), lr=1e-6, eps=1e-3, n_perturbations=4)
    closure = _scripted(losses)
    first = opt.step(closure)
    assert len(closure.calls) == 5 and opt.forward_passes == 5
    l32 = [float(np.float32(x)) for x in losses]  # the closure's float32 tensors
    sigma = float(np.std(l32[1:], ddof=1))
    expected = [float(np.float32((x - l32[0]) / (float(np.float32(1e-3)) * sigma))) for x in l32[1:]]
    assert opt.projected_grads == expected
    assert float(first) == l32[0]


def test_fzoo_moves_the_weights_along_its_rademacher_directions_only():
    params = _params()
    before = [p.detach().clone() for _, p in params]
    opt = FZOO(params, lr=1e-6, eps=1e-3, n_perturbations=3, seed=5)
    opt.step(_scripted([2.0, 2.5, 1.5, 2.2]))
    grads = opt.projected_grads
    for (name, p), p0 in zip(params, before):
        zs = [
            torch.from_numpy(
                zotune.rng.z("rademacher", zotune.rng.step_seed(5, 0, j), zotune.rng.param_key(name), 0, p.numel())
            ).reshape(p.shape)
            for j in range(3)
        ]
        expected = p0 - 1e-6 / 3 * sum(g * z for g, z in zip(grads, zs))
        # float32: the probes' three sweeps and the update each round once, by <= half an ulp of |theta| + eps
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=4 * 2**-24 * (float(p0.abs().max()) + 1e-3))


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_fzoo_with_equal_perturbed_losses_skips_the_step_and_restores_the_weights(on_nonfinite):
    params = _params()
    before = [p.detach().clone() for _, p in params]
    opt = FZOO(params, lr=1e-6, n_perturbations=3, on_nonfinite=on_nonfinite)
    closure = _scripted([1.0, 2.0, 2.0, 2.0])  # sigma = 0: no direction
    if on_nonfinite == "raise":
        with pytest.raises(NonFiniteLossError, match="no finite estimate"):
            opt.step(closure)
    else:
        with pytest.warns(RuntimeWarning, match="no finite estimate"):
            opt.step(closure)
    assert opt.last_step_skipped and opt.step_count == 1
    for (_, p), p0 in zip(params, before):  # one-sided: +z0, -z0 +z1, -z1 +z2, then -z2: back to the start
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=4 * 2**-24 * float(p0.abs().max()))


def test_fzoo_needs_two_directions_and_clean_starts():
    with pytest.raises(ValueError, match="at least 2"):
        FZOO(_params(), lr=1e-6, n_perturbations=1)
    with pytest.raises(ValueError, match="fuse_next"):
        FZOO(_params(), lr=1e-6, fuse_next=True)
    with pytest.raises(ConfigError, match="n_perturbations must be from 2 to 100"):
        OptimConfig(estimator="fzoo")
    with pytest.raises(ConfigError, match="estimator must be one of two-sided, one-sided, fzoo, hizoo, kerzoo"):
        OptimConfig(estimator="fzo")
    with pytest.raises(ValueError, match="needs n_perturbations from 2"):  # a schedule that drops below 2
        MeZO(_params(), lr=1e-6, estimator="fzoo", n_perturbations=lambda t: 1).step(_scripted([1.0, 2.0]))


def test_make_optimizer_builds_fzoo_without_fuse_next():
    opt = make_optimizer(_params(), OptimConfig(estimator="fzoo", n_perturbations=8, distribution="rademacher"))
    assert isinstance(opt, MeZO) and opt.estimator == "fzoo" and not opt.fuse_next
    assert opt._estimator.passes(8) == 9


def test_fzoo_replays_and_records_its_coefficients(tmp_path):
    params = _params()
    base = [p.detach().clone() for _, p in params]
    path = tmp_path / "fzoo.zot"
    opt = FZOO(params, lr=1e-4, n_perturbations=4, trajectory=path, on_nonfinite="skip")
    rng = np.random.default_rng(0)
    for t in range(6):
        values = [1.0, 2.0, 2.0, 2.0, 2.0] if t == 3 else list(1.0 + 0.1 * rng.standard_normal(5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped step's warning
            opt.step(_scripted(values))
    traj = read_trajectory(path)
    assert traj.header["estimator"] == "fzoo"
    kinds = [type(r) for r in traj.records[1:]]
    assert kinds == [MultiStep] * 3 + [Skip] + [MultiStep] * 2
    assert traj.records[4].phase == 5  # all five losses finite, the estimate not: the last evaluation
    assert all(len(r.projected_grads) == 4 for r in traj.steps)
    # the records: a hyper-parameter one (tag, eps, one weight decay, check: 11 bytes), five steps of 4N + 13 bytes
    # (tag, step u32, n u16, N coefficients f32, one lr f32, check u16) and a skip (tag, step, phase u8, check)
    header = 12 + struct.unpack_from("<I", path.read_bytes(), 8)[0] + 4
    assert path.stat().st_size == header + 11 + 5 * (4 * 4 + 13) + 8
    tensors = [t.clone() for t in base]
    replay(tensors, path)
    for (_, p), q in zip(params, tensors):
        assert torch.equal(p.detach(), q)


def test_forward_passes_count_every_closure_call_and_survive_the_state():
    opt = MeZO(_params(), lr=1e-3, n_perturbations=2)
    for _ in range(3):
        opt.step(_scripted([1.0, 0.5, 0.7, 0.2]))
    assert opt.forward_passes == 3 * 4
    state = opt.state_dict()
    fresh = MeZO(_params(), lr=1e-3, n_perturbations=2)
    fresh.load_state_dict(state)
    assert fresh.forward_passes == 12
    del state["mezo"]["forward_passes"]  # a state written before the count: unknown, not zero
    fresh.load_state_dict(state)
    assert fresh.forward_passes is None
    fresh.step(_scripted([1.0, 0.5, 0.7, 0.2]))
    assert fresh.forward_passes is None and math.isfinite(fresh.projected_grad)


@pytest.mark.parametrize(
    "build",
    [
        'zotune.FZOO([("p", p)], lr=1e-9, n_perturbations=4)',
        'zotune.MeZO([("p", p)], lr=1e-9, distribution="lowrank", lowrank_rank=4, fuse_next=True)',
        'zotune.HiZOO([("p", p)], lr=1e-9)',  # its s (64 MB) is made in the warm-up step: nothing more after
    ],
)
def test_the_new_methods_allocate_nothing_parameter_sized_per_step(build):
    """A 64 MB matrix: after a warm-up step, further steps grow the peak by a few chunks at most (4 MB each, which
    glibc may keep after the first step), never by a parameter-sized tensor: < 32 MB."""
    from memory import rss_growth_mb

    setup = f"""
        import torch, zotune
        p = torch.nn.Parameter(torch.zeros(4096, 4096) + 0.5)
        opt = {build}
        closure = lambda: p[0, :1000].sum()
        opt.step(closure)  # warm-up: JIT compilation, chunk buffers, allocator pools, HiZOO's s
    """
    growth_mb = rss_growth_mb(setup, "opt.step(closure); opt.step(closure)")
    assert growth_mb < 32, f"peak memory grew by {growth_mb} MB during a step on a 64 MB parameter"
