"""Low-rank directions (LOZO, arXiv 2410.07698): the sweep against explicit factors, the seeds, replay and resume."""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_resume_matches, mse_closure, steps_with_a_skip, ulp32

from zotune import MeZO, MeZOAdam, MeZOMomentum, replay, rng
from zotune.config import ConfigError, OptimConfig
from zotune.optim import functional, make_optimizer
from zotune.optim.step import LOWRANK_V_INDEX, Directions


def _explicit(name: str, shape, seeds, rank: int) -> np.ndarray:
    """u of one tensor in float64: U V^T / sqrt(rank) on a matrix (U, V from the reference stream), else Gaussian z."""
    key = rng.param_key(name)
    if len(shape) != 2:
        return rng.gaussian(seeds[0], key, 0, math.prod(shape)).astype(np.float64).reshape(shape)
    m, n = shape
    u = rng.gaussian(seeds[0], key, 0, m * rank).astype(np.float64).reshape(m, rank)
    v = rng.gaussian(seeds[1], key, 0, n * rank).astype(np.float64).reshape(n, rank)
    return u @ v.T / math.sqrt(rank)


@pytest.mark.parametrize("rank", [1, 3])
def test_the_sweep_adds_c_times_u_v_transposed_over_sqrt_rank(rank):
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (37, 23), "b": (23,)}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    before = {k: p.double().numpy().copy() for k, p in params.items()}
    terms = [((11, 12), 0.3), ((13, 14), -0.7)]
    keys = [rng.param_key(k) for k in shapes]
    functional.sweep_(
        list(params.values()), keys, terms, scale=0.9, distribution=f"lowrank:{rank}", backend="reference"
    )
    for k, shape in shapes.items():
        expected = 0.9 * before[k] + sum(c * _explicit(k, shape, seeds, rank) for seeds, c in terms)
        # float32: the scale and each of the rank multiply-adds per term round once (2 roundings each), at most
        # 2 (1 + 2 rank) ulp of the largest magnitude on the way; measured well below
        bound = 2 * (1 + 2 * rank * len(terms)) * ulp32(float(np.abs(expected).max()) + 3 * rank)
        assert np.abs(params[k].double().numpy() - expected).max() <= bound, k


def test_v_is_drawn_every_lowrank_every_steps_and_u_every_step():
    d = Directions([torch.zeros(4, 3)], [1], seed=5, distribution="lowrank", lowrank_rank=2, lowrank_every=3)
    seeds = [d.seed(t) for t in range(7)]
    assert len({u for u, _ in seeds}) == 7
    assert [v for _, v in seeds] == [rng.step_seed(5, t // 3, LOWRANK_V_INDEX) for t in range(7)]
    assert seeds[0][1] == seeds[2][1] != seeds[3][1]
    assert d.seed(4, 1)[1] == rng.step_seed(5, 1, LOWRANK_V_INDEX + 1)  # direction j of n-SPSA: its own V


def test_a_step_moves_the_weights_along_the_low_rank_direction(toy_model, regression_data):
    model = toy_model()
    before = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    opt = MeZO(model.named_parameters(), lr=1e-2, seed=3, distribution="lowrank", lowrank_rank=2, lowrank_every=4)
    opt.step(mse_closure(model, *regression_data))
    seeds = (rng.step_seed(3, 0), rng.step_seed(3, 0, LOWRANK_V_INDEX))
    for name, p in model.named_parameters():
        u = _explicit(name, tuple(p.shape), seeds, 2)
        expected = before[name] - 1e-2 * opt.projected_grad * u
        # three float32 sweeps (+eps u, -2 eps u, back and update), each within 2 (1 + 2 rank) ulp
        bound = 3 * 2 * 5 * ulp32(float(np.abs(before[name]).max()) + 1e-2 * abs(opt.projected_grad) * 10)
        assert np.abs(p.detach().double().numpy() - expected).max() <= bound, name
    # the matrices moved within a rank-2 subspace: past the sweeps' rounding residue (entries of a few ulp of
    # |theta|, so singular values below 8 ulp sqrt(m n)), the change has rank 2
    delta = model[0].weight.detach().double().numpy() - before["0.weight"]
    residue = 8 * ulp32(float(np.abs(before["0.weight"]).max())) * math.sqrt(delta.size)
    singular = np.linalg.svd(delta, compute_uv=False)
    assert (singular > residue).sum() == 2 and singular[1] > 1e3 * residue


@pytest.mark.parametrize("options", [dict(fuse_next=True), dict(n_perturbations=2), dict(estimator="one-sided")])
def test_replay_rebuilds_the_weights_bit_for_bit(tmp_path, toy_model, regression_data, options):
    model = toy_model()
    path = tmp_path / "lr.zot"
    opt = MeZO(
        model.named_parameters(),
        lr=1e-2,
        distribution="lowrank",
        lowrank_every=3,
        trajectory=path,
        on_nonfinite="skip",
        **options,
    )
    for t in range(8):
        closure = (lambda: torch.tensor(float("nan"))) if t == 4 else mse_closure(model, *regression_data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped step's warning
            opt.step(closure)
    opt.flush()
    base = toy_model()
    replay(base, path)
    for (name, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name


def test_resume_continues_bit_for_bit(tmp_path, toy_model, regression_data):
    kwargs = dict(lr=1e-2, distribution="lowrank", lowrank_rank=3, lowrank_every=2)
    straight = toy_model()
    opt = MeZO(straight.named_parameters(), **kwargs)
    for _ in range(6):
        opt.step(mse_closure(straight, *regression_data))
    first = toy_model()
    opt1 = MeZO(first.named_parameters(), **kwargs)
    for _ in range(3):
        opt1.step(mse_closure(first, *regression_data))
    state, weights = opt1.state_dict(), {k: v.clone() for k, v in first.state_dict().items()}
    resumed = toy_model()
    resumed.load_state_dict(weights)
    opt2 = MeZO(resumed.named_parameters(), **kwargs)
    opt2.load_state_dict(state)
    for _ in range(3):
        opt2.step(mse_closure(resumed, *regression_data))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="variant options"):  # another rank is another run
        MeZO(toy_model().named_parameters(), **{**kwargs, "lowrank_rank": 2}).load_state_dict(state)


def test_history_momentum_composes(toy_model, regression_data, tmp_path):
    model = toy_model()
    opt = MeZOMomentum(
        model.named_parameters(), lr=1e-2, beta=0.8, window=4, distribution="lowrank", trajectory=tmp_path / "m.zot"
    )
    for _ in range(5):
        opt.step(mse_closure(model, *regression_data))
    base = toy_model()
    replay(base, tmp_path / "m.zot")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


def test_what_does_not_compose_is_refused(toy_model):
    params = list(toy_model().named_parameters())
    with pytest.raises(ValueError, match="low-rank directions work with"):
        MeZOAdam(params, lr=1e-3, distribution="lowrank")
    with pytest.raises(ValueError, match="low-rank directions work with"):
        MeZOMomentum(params, lr=1e-3, distribution="lowrank", state="stored")
    with pytest.raises(ValueError, match="low-rank directions work with"):
        MeZO(params, lr=1e-3, distribution="lowrank", layerwise="param-norm")
    with pytest.raises(ValueError, match="lowrank_rank"):
        MeZO(params, lr=1e-3, distribution="lowrank", lowrank_rank=0)
    with pytest.raises(ConfigError, match="lowrank_every"):
        OptimConfig(distribution="lowrank", lowrank_every=0)
    opt = make_optimizer(params, OptimConfig(distribution="lowrank", lowrank_rank=4, lowrank_every=7))
    assert (opt.distribution, opt.lowrank_rank, opt.lowrank_every) == ("lowrank", 4, 7)


def _explicit_subzero(name, shape, seeds, rank):
    """SubZero's u in float64 by its definition: sqrt(m n) / r U Z V^T, U and V the sign-fixed QRs of the Gaussians
    of the window's seed (V: of rng.step_seed(seed, 0, 1)), Z the r x r Gaussian of the direction's seed."""
    m, n = shape
    key = rng.param_key(name)

    def orthonormal(rows, seed):
        q, r_ = np.linalg.qr(rng.gaussian(seed, key, 0, rows * rank).astype(np.float64).reshape(rows, rank))
        return q * np.where(np.diag(r_) < 0, -1.0, 1.0)

    u, v = orthonormal(m, seeds[1]), orthonormal(n, rng.step_seed(seeds[1], 0, 1))
    z = rng.gaussian(seeds[0], key, 0, rank * rank).astype(np.float64).reshape(rank, rank)
    return math.sqrt(m * n) / rank * u @ z @ v.T


def test_the_subzero_sweep_adds_c_u_z_v_transposed_with_unit_variance_entries():
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (40, 40), "b": (40,)}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    before = {k: p.double().numpy().copy() for k, p in params.items()}
    terms = [((11, 12), 0.3), ((13, 12), -0.7)]
    keys = [rng.param_key(k) for k in shapes]
    functional.sweep_(list(params.values()), keys, terms, distribution="subzero:3", backend="reference")
    expected = before["w"] + sum(c * _explicit_subzero("w", shapes["w"], s, 3) for s, c in terms)
    # float32: the factors and Z V^T rounded once each, then 3 multiply-adds per term: a few ulp of the largest value
    bound = 2 * (2 + 2 * 3 * len(terms)) * ulp32(float(np.abs(expected).max()) + 3)
    assert np.abs(params["w"].double().numpy() - expected).max() <= bound
    z_b = [rng.gaussian(s[0], keys[1], 0, 40).astype(np.float64) for s, _ in terms]  # vectors: LOZO's Gaussian z
    # float32 b (|b| + |c z| < 8, ulp 4.8e-7) after two multiply-adds: 1e-6 is two roundings; another z is off by O(1)
    np.testing.assert_allclose(
        params["b"].numpy(), before["b"] + sum(c * z for (_, c), z in zip(terms, z_b)), atol=1e-6
    )
    # the scale: E ||U Z V^T||^2 = r^2, so after sqrt(m n) / r the mean squared entry is 1 (over 200 draws, within 10%)
    mean_square = np.mean([np.mean(_explicit_subzero("w", (40, 40), (s, 12), 3) ** 2) for s in range(200)])
    assert mean_square == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("options", [dict(), dict(n_perturbations=2, estimator="one-sided")])
def test_subzero_replays_and_resumes_bit_for_bit(tmp_path, toy_model, regression_data, options):
    model = toy_model()
    path = tmp_path / "sz.zot"
    make = lambda ps, **kw: MeZO(ps, lr=1e-2, distribution="subzero", lowrank_every=2, **options, **kw)  # noqa: E731
    opt = make(model.named_parameters(), trajectory=path, on_nonfinite="skip")
    steps_with_a_skip(opt, model, regression_data, 6, skip_at=3)
    opt.flush()
    base = toy_model()
    replay(base, path)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    assert_resume_matches(make, toy_model, regression_data, 5, 2)
