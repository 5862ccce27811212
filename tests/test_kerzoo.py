"""KerZOO (arXiv 2505.18886): the keyed scale r, the kernels' moments, the step against an explicit reference,
the bias it removes, replay and resume, and what it refuses."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_interrupt_restores, assert_resume_matches, mse_closure, steps_with_a_skip, ulp32

from zotune import KerZOO, MeZO, replay, rng
from zotune.config import ConfigError, OptimConfig
from zotune.optim import estimators, make_optimizer
from zotune.trajectory import read_trajectory


def test_the_radius_is_keyed_symmetric_and_uniform_on_minus_one_one():
    r = np.array([rng.radius(rng.step_seed(7, t)) for t in range(20000)])
    assert rng.radius(rng.step_seed(7, 3)) == r[3]  # a pure function of the seed
    assert np.all(np.abs(r) < 1) and np.all(r != 0)
    assert r.dtype == np.float64 and np.all(r.astype(np.float32) == r)  # float32 values
    # U(-1, 1): mean 0 (sd 0.577 / sqrt(20000) = 0.004), E[r^2] = 1/3 (sd 0.3 / sqrt(20000) = 0.002); 4 sd each
    assert abs(r.mean()) < 0.017 and abs((r**2).mean() - 1 / 3) < 0.009
    # the cells' midpoints: r = (k + 1/2) 2^-23 - 1 for an integer k < 2^24
    k = (r + 1) * 2**23 - 0.5
    assert np.all(k == np.round(k)) and k.min() >= 0 and k.max() < 2**24


@pytest.mark.parametrize("name, third", [("kerzoo", 0.0), ("kerzoo-linear", 3 / 5)])
def test_the_kernels_keep_the_mean_and_cancel_or_shrink_the_eps_squared_bias(name, third):
    """E[r K(r)] = 1 and E[r^3 K(r)] (0 for the cubic kernel, 3/5 for 3r) under r ~ U(-1, 1), by Gauss-Legendre
    quadrature, exact for these polynomials (degree <= 6 with 8 nodes)."""
    kernel = estimators.KerZOO.KERNELS[estimators.ESTIMATORS[name].kernel]
    x, w = np.polynomial.legendre.leggauss(8)
    mean = lambda f: float(np.sum(w * f(x)) / 2)  # noqa: E731  (the density of U(-1, 1) is 1/2)
    assert mean(lambda r: r * kernel(r)) == pytest.approx(1.0, abs=1e-12)
    assert mean(lambda r: r**3 * kernel(r)) == pytest.approx(third, abs=1e-12)


def _explicit_z(name, shape, seed):
    return rng.gaussian(seed, rng.param_key(name), 0, math.prod(shape)).astype(np.float64).reshape(shape)


@pytest.mark.parametrize("kernel", ["cubic", "linear"])
def test_a_step_probes_at_eps_r_z_and_moves_along_k_r_times_the_difference(toy_model, regression_data, kernel):
    """The explicit reference in float64: the losses at theta +- eps r z, c = K(r) (L+ - L-) / 2 eps, theta - lr c z."""
    model, ref = toy_model(), toy_model()
    opt = KerZOO(model.named_parameters(), lr=1e-2, eps=1e-2, seed=4, kernel=kernel)
    x, y = regression_data
    for t in range(3):
        seed = rng.step_seed(4, t)
        r = rng.radius(seed)
        zs = {n: torch.from_numpy(_explicit_z(n, p.shape, seed)).float() for n, p in ref.named_parameters()}

        def loss_at(sign):
            with torch.no_grad():
                moved = toy_model()
                for (n, q), (_, p) in zip(moved.named_parameters(), ref.named_parameters()):
                    q.copy_(p.double() + sign * 1e-2 * r * zs[n].double())
                return float(mse_closure(moved, x, y)())

        k = estimators.KerZOO.KERNELS[kernel](r)
        c = k * (loss_at(1) - loss_at(-1)) / (2 * 1e-2)
        opt.step(mse_closure(model, x, y))
        # the optimizer's losses are at float32-rounded weights: its c differs from the float64 one by the
        # difference of two float32 losses over 2 eps, times K(r) (at most 7.5): a few ulp of the loss / eps
        assert opt.projected_grad == pytest.approx(c, abs=7.5 * 8 * ulp32(loss_at(1)) / 2e-2)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(p.double() - 1e-2 * opt.projected_grad * zs[n].double())
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            # float32: three sweeps and the update each round once, by <= half an ulp of |theta| + eps |z|
            bound = 4 * ulp32(float(q.detach().abs().max()) + 1e-2 * 6)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=bound * (t + 1))


def test_it_removes_the_eps_squared_bias_that_mezo_has():
    """f(x) = x^3 at x = 0, whose gradient is 0: MeZO's coefficient times z is eps^2 z^4 (mean 3 eps^2), KerZOO's
    eps^2 r^3 K(r) z^4 (mean 0). 20,000 keyed directions of one element, eps 0.1."""
    eps, n = 0.1, 20000
    est = {name: estimators.get(name) for name in ("two-sided", "kerzoo")}
    means = {}
    for name, e in est.items():
        total = []
        for t in range(n):
            seed = rng.step_seed(1, t)
            z = float(rng.gaussian(seed, 0, 0, 1)[0])
            r = e.radius(seed)
            losses = [(eps * r * z) ** 3, (-eps * r * z) ** 3]
            total.append(e.estimate(losses, 1, eps, [r])[0] * z)
        means[name] = (np.mean(total), np.std(total) / math.sqrt(n))
    mezo, ker = means["two-sided"], means["kerzoo"]
    assert mezo[0] == pytest.approx(3 * eps**2, abs=4 * mezo[1])  # the bias is there: 0.03
    assert abs(ker[0]) < 4 * ker[1] < 0.01  # and gone, within 4 standard errors that are themselves small


def test_replay_and_the_trajectory(tmp_path, toy_model, regression_data):
    model = toy_model()
    path = tmp_path / "k.zot"
    opt = KerZOO(model.named_parameters(), lr=1e-2, n_perturbations=2, trajectory=path, on_nonfinite="skip")
    steps_with_a_skip(opt, model, regression_data, 7, skip_at=3)
    opt.flush()
    traj = read_trajectory(path)
    assert traj.header["estimator"] == "kerzoo" and len(traj.steps) == 6  # r is derived, not recorded
    base = toy_model()
    replay(base, path)
    for (name, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("options", [dict(), dict(distribution="lowrank"), dict(kernel="linear")])
def test_resume_continues_bit_for_bit(toy_model, regression_data, options):
    assert_resume_matches(lambda ps: KerZOO(ps, lr=1e-2, **options), toy_model, regression_data, 6, 3)


def test_an_interrupted_step_restores_the_weights(toy_model, regression_data):
    model = toy_model()
    assert_interrupt_restores(KerZOO(model.named_parameters(), lr=1e-2), model, regression_data)


def test_options_configs_and_refusals(toy_model):
    params = list(toy_model().named_parameters())
    with pytest.raises(ValueError, match="fuse_next"):
        KerZOO(params, lr=1e-3, fuse_next=True)
    with pytest.raises(ValueError, match="Invalid kernel"):
        KerZOO(params, lr=1e-3, kernel="quintic")
    with pytest.raises(TypeError, match="kernel="):
        KerZOO(params, lr=1e-3, estimator="two-sided")
    opt = make_optimizer(params, OptimConfig(estimator="kerzoo"))  # the config's fuse_next: on, dropped here
    assert isinstance(opt, MeZO) and opt.estimator == "kerzoo" and not opt.fuse_next
    assert opt._estimator.passes(1) == 2
    with pytest.raises(ConfigError, match="estimator must be one of"):
        OptimConfig(estimator="kerzo")
