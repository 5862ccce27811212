"""ZO-Muon (arXiv 2602.17155): the subspace directions, msign, a step against an explicit reference, replay,
resume and what it refuses."""

import numpy as np
import pytest
import torch
from conftest import assert_resume_matches, mse_closure, steps_with_a_skip, ulp32

from zotune import MeZO, MeZOAdam, ZOMuon, replay, rng
from zotune.config import ConfigError, OptimConfig
from zotune.optim import functional, make_optimizer
from zotune.optim.step import LOWRANK_V_INDEX, Directions


def _explicit_factors(name, shape, seeds, rank):
    """(P, Psi) in float64 by the definition: P = the QR of the Gaussian m x r of seeds[1] with R's diagonal made
    positive, Psi = the transpose of the Gaussian n x r of seeds[0]."""
    m, n = shape
    key = rng.param_key(name)
    g = rng.gaussian(seeds[1], key, 0, m * rank).astype(np.float64).reshape(m, rank)
    q, r = np.linalg.qr(g)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    psi = rng.gaussian(seeds[0], key, 0, n * rank).astype(np.float64).reshape(n, rank).T
    return q, psi


def test_the_subspace_sweep_adds_c_times_p_psi_with_p_orthonormal():
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (37, 23), "b": (23,)}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    before = {k: p.double().numpy().copy() for k, p in params.items()}
    terms = [((11, 12), 0.3), ((13, 12), -0.7)]
    functional.sweep_(
        list(params.values()), [rng.param_key(k) for k in shapes], terms, distribution="subspace:3", backend="reference"
    )
    q, _ = _explicit_factors("w", shapes["w"], (11, 12), 3)
    np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-12)  # float64 QR: orthonormal to ~1e-15
    expected = before["w"] + sum(c * np.matmul(*_explicit_factors("w", shapes["w"], s, 3)) for s, c in terms)
    # float32: P rounded once, then 3 multiply-adds per term, each rounding once: a few ulp of the largest value
    bound = 2 * (1 + 2 * 3 * len(terms)) * ulp32(float(np.abs(expected).max()) + 3)
    assert np.abs(params["w"].double().numpy() - expected).max() <= bound
    assert np.array_equal(params["b"].numpy(), before["b"].astype(np.float32))  # vectors have no part in it


def test_a_step_shares_p_across_its_directions_and_redraws_it_every_lowrank_every_steps():
    d = Directions([torch.zeros(4, 3)], [1], seed=5, distribution="subspace", lowrank_rank=2, lowrank_every=3)
    assert d.zdist == "subspace:2"
    assert d.seed(4, 0)[1] == d.seed(4, 1)[1] == d.seed(5, 3)[1] == rng.step_seed(5, 1, LOWRANK_V_INDEX)
    assert d.seed(4, 0)[0] != d.seed(4, 1)[0] and d.seed(2, 0)[1] != d.seed(3, 0)[1]


def test_msign_is_the_polar_factor():
    g = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 7)))
    o = functional.msign(g)
    u, _, vh = np.linalg.svd(g.numpy(), full_matrices=False)
    # float64 on a 3 x 7 matrix: the SVD and msign agree to ~1e-15; a Newton-Schulz approximation is off by ~1e-2
    np.testing.assert_allclose(o.numpy(), u @ vh, atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(o.numpy(), compute_uv=False), np.ones(3), atol=1e-12)
    assert torch.equal(functional.msign(torch.zeros(2, 5)), torch.zeros(2, 5))


def test_a_step_against_the_explicit_reference(toy_model, regression_data):
    """Two two-sided queries: c_i from the losses at theta +- eps P Psi_i (float64), G = mean c_i Psi_i, then
    theta - lr P msign(G) on each matrix; the vectors keep their bits."""
    model, ref = toy_model(), toy_model()
    x, y = regression_data
    lr, eps, rank = 1e-2, 1e-2, 2
    opt = ZOMuon(model.named_parameters(), lr=lr, eps=eps, seed=3, n_perturbations=2, lowrank_rank=rank)
    for t in range(2):
        seeds = [(rng.step_seed(3, t, j), rng.step_seed(3, t // 50, LOWRANK_V_INDEX)) for j in range(2)]
        factors = {
            n: [_explicit_factors(n, p.shape, s, rank) for s in seeds]
            for n, p in ref.named_parameters()
            if p.dim() == 2
        }

        def loss_at(j, sign):
            with torch.no_grad():
                moved = toy_model()
                for (n, q), (_, p) in zip(moved.named_parameters(), ref.named_parameters()):
                    u = np.matmul(*factors[n][j]) if p.dim() == 2 else 0.0
                    q.copy_(p.double() + sign * eps * torch.as_tensor(u))
                return float(mse_closure(moved, x, y)())

        c = [(loss_at(j, 1) - loss_at(j, -1)) / (2 * eps) for j in range(2)]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step(mse_closure(model, x, y))
        # float32 losses at float32-rounded weights: a few ulp of the loss over 2 eps
        np.testing.assert_allclose(opt.projected_grads, c, rtol=0, atol=8 * ulp32(loss_at(0, 1)) / (2 * eps))
        cs = opt.projected_grads  # the update is a function of the recorded coefficients: use them
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if p.dim() != 2:
                    continue
                (proj, _), g = factors[n][0], sum(ci * f[1] for ci, f in zip(cs, factors[n])) / 2
                u, _, vh = np.linalg.svd(g, full_matrices=False)
                p.copy_(p.double() - lr * torch.as_tensor(proj @ (u @ vh)))
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            if p.dim() != 2:
                assert torch.equal(p.detach(), before[n]), n
                continue
            # float32: 2 probes per query, the restore and r multiply-adds of the update, each within half an ulp
            bound = 12 * ulp32(float(q.detach().abs().max()) + eps * 3)
            torch.testing.assert_close(p.detach(), q.detach().float(), rtol=0, atol=bound * (t + 1))


@pytest.mark.parametrize(
    "options", [dict(), dict(estimator="one-sided", n_perturbations=3), dict(weight_decay=0.1, lowrank_every=2)]
)
def test_replay_rebuilds_the_weights_bit_for_bit(tmp_path, toy_model, regression_data, options):
    model = toy_model()
    path = tmp_path / "m.zot"
    opt = ZOMuon(model.named_parameters(), lr=1e-2, lowrank_rank=2, trajectory=path, on_nonfinite="skip", **options)
    steps_with_a_skip(opt, model, regression_data, 6, skip_at=3)
    opt.flush()
    base = toy_model()
    replay(base, path)
    for (name, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name


def test_resume_continues_bit_for_bit(toy_model, regression_data):
    assert_resume_matches(
        lambda ps: ZOMuon(ps, lr=1e-2, lowrank_rank=2, lowrank_every=2), toy_model, regression_data, 5, 3
    )


def test_it_lowers_the_loss_of_a_toy_regression(toy_model, regression_data):
    model = toy_model()
    closure = mse_closure(model, *regression_data)
    start = float(closure().detach())
    opt = ZOMuon(model.named_parameters(), lr=1e-2, eps=1e-2, lowrank_rank=2)
    for _ in range(40):
        opt.step(closure)
    # the seeded run reaches 0.89 of the start in 40 steps (each moves a matrix by lr sqrt(r), whatever the loss)
    assert float(closure().detach()) < 0.95 * start


def test_options_configs_and_refusals(toy_model):
    params = list(toy_model().named_parameters())
    with pytest.raises(ValueError, match="fuse_next=False"):
        ZOMuon(params, lr=1e-3, fuse_next=True)
    with pytest.raises(TypeError, match="distribution"):
        ZOMuon(params, lr=1e-3, distribution="gaussian")
    with pytest.raises(ValueError, match="low-rank directions work with"):
        MeZOAdam(params, lr=1e-3, distribution="subspace")
    sgd = MeZO(params, lr=1e-3, distribution="subspace")  # plain SGD along P Psi composes
    assert sgd.rule.name == "sgd"
    config = OptimConfig(variant="muon")
    assert config.distribution == "subspace"
    with pytest.raises(ConfigError, match="needs distribution 'subspace'"):
        OptimConfig(variant="muon", distribution="lowrank")
    with pytest.raises(ConfigError, match="works with variant sgd, history momentum or muon"):
        OptimConfig(variant="adam", distribution="subspace")
    opt = make_optimizer(params, OptimConfig(variant="muon", lowrank_rank=4, n_perturbations=2))
    assert isinstance(opt, ZOMuon) and not opt.fuse_next and opt.lowrank_rank == 4 and opt.rule.name == "muon"
