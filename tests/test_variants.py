"""The MeZO variants of paper §2.2 / Appendix B: n-SPSA, one-sided, sphere, layerwise, momentum, Adam."""

import base64
import json
import math
import warnings

import pytest
import torch
from conftest import mse_closure, stopped_during_step, ulp32

import zotune
from zotune import FZOO, MeZO, MeZOAdam, MeZOMomentum, replay, rng
from zotune.config import ConfigError, OptimConfig
from zotune.optim import directions, make_optimizer
from zotune.optim import functional as F
from zotune.optim import variants as V
from zotune.optim.reference import ReferenceVariant
from zotune.trajectory import MultiStep, Skip, Step, TrajectoryWriter, read_trajectory

# name -> (class, keyword arguments, the reference's keyword arguments)
VARIANTS = {
    "nspsa": (MeZO, dict(n_perturbations=3), dict(n=3)),
    "one-sided": (MeZO, dict(n_perturbations=2, estimator="one-sided"), dict(n=2, estimator="one-sided")),
    "sphere": (MeZO, dict(distribution="sphere"), dict(distribution="sphere")),
    "param-norm": (MeZO, dict(layerwise="param-norm"), dict(layerwise="param-norm")),
    "grad-norm": (MeZO, dict(layerwise="grad-norm", grad_norm_every=4), dict(layerwise="grad-norm", grad_norm_every=4)),
    "grad-norm-adam": (
        MeZOAdam,
        dict(betas=(0.8, 0.9), state="stored", layerwise="grad-norm", grad_norm_probes=2, n_perturbations=2),
        dict(rule="adam", beta1=0.8, beta2=0.9, layerwise="grad-norm", grad_norm_probes=2, n=2),
    ),
    "grad-norm-momentum": (
        MeZOMomentum,
        dict(beta=0.8, window=50, layerwise="grad-norm", estimator="one-sided"),
        dict(rule="momentum", beta1=0.8, layerwise="grad-norm", estimator="one-sided"),
    ),
    "momentum-history": (MeZOMomentum, dict(beta=0.8, window=50), dict(rule="momentum", beta1=0.8)),
    "momentum-stored": (MeZOMomentum, dict(beta=0.8, state="stored"), dict(rule="momentum", beta1=0.8)),
    "adam-history": (MeZOAdam, dict(betas=(0.8, 0.9), window=50), dict(rule="adam", beta1=0.8, beta2=0.9)),
    "adam-stored": (MeZOAdam, dict(betas=(0.8, 0.9), state="stored"), dict(rule="adam", beta1=0.8, beta2=0.9)),
    "fzoo": (FZOO, dict(n_perturbations=4), dict(n=4, estimator="fzoo", distribution="rademacher")),
    "fzoo-momentum-sphere": (
        MeZOMomentum,
        dict(beta=0.8, window=50, estimator="fzoo", n_perturbations=3, distribution="sphere"),
        dict(rule="momentum", beta1=0.8, n=3, estimator="fzoo", distribution="sphere"),
    ),
    "everything": (
        MeZOAdam,
        dict(
            betas=(0.8, 0.9),
            state="stored",
            n_perturbations=2,
            estimator="one-sided",
            distribution="sphere",
            layerwise="param-norm",
        ),
        dict(
            rule="adam", beta1=0.8, beta2=0.9, n=2, estimator="one-sided", distribution="sphere", layerwise="param-norm"
        ),
    ),
}


def _lr(name):
    if name.startswith("fzoo"):  # its step is about lr / eps per element, whatever the loss's scale
        return 2e-6
    return 1e-3 if "adam" in name or name == "everything" else 2e-2


def _build(name, model, **extra):
    cls, kwargs, _ = VARIANTS[name]
    return cls(model.named_parameters(), lr=_lr(name), eps=1e-3, seed=3, **kwargs, **extra)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_the_explicit_reference_step_by_step(toy_model, regression_data, name):
    model, ref_model = toy_model(), toy_model()
    opt = _build(name, model)
    ref = ReferenceVariant(list(ref_model.named_parameters()), lr=_lr(name), eps=1e-3, seed=3, **VARIANTS[name][2])
    lr, rule = _lr(name), VARIANTS[name][2].get("rule", "sgd")
    # g_j: each loss is taken at weights a few ulp off the reference's and moves by <= 20 ulp of L (see
    # test_optim's test_losses_are_taken_at_plus_and_minus_eps; measured <= 4 ulp here), so two-sided g_j
    # agree to 2 * 20 ulp / 2 eps, one-sided ones to 2 * 20 ulp / eps.
    # Weights: theta' = theta - lr d with d the estimate (sgd) or a convex average of estimates (momentum),
    # and the estimate is 1/n sum_j g_j G_l u_j with G_l the layer's gain (grad-norm's c_l, param-norm's s_l,
    # else 1). So a step widens the gap by lr * 1/n sum_j (|dg_j| G + |g_j| dG) max|u_j| (the gaps seen, c_l's
    # too; s_l moves with the weights' gap), + lr |g| G max|u| 1e-6 (the numba Gaussian, test_kernels) + the
    # float32 sweeps' roundings (2n + 2 sweeps, 1 ulp each of |theta| + 2 eps max|u|/G). Adam's direction m/sqrt(v) is
    # scale-free: relative g gaps of 1e-4 move it by ~1e-4 of its size (<= 1/sqrt(1 - beta2) ~ 3), so
    # 8 steps * lr 1e-3 * 1e-4 * 3 ~ 3e-9 a step, below the roundings; 20 ulp(2) a step is given to it.
    # A lost term (n-SPSA), a wrong z, gain or moment moves a weight by ~lr |g| max|u| ~ 1e-2 in one step.
    one_sided = VARIANTS[name][2].get("estimator") in ("one-sided", "fzoo")
    w_tol, est_gap = 0.0, 0.0
    for t in range(8):
        theta = [p.detach().clone() for p in ref_model.parameters()]
        opt.step(mse_closure(model, *regression_data))
        ref.step(mse_closure(ref_model, *regression_data))
        g_tol = (2 if one_sided else 1) * 20 * ulp32(max(map(abs, opt.last_losses))) / opt.eps
        if ref.sigma is not None:  # FZOO: c_j = (l_j - l_0) / (eps sigma), and sigma is off by <= 2 * 20 ulp of L too
            dsigma = 2 * 20 * ulp32(max(map(abs, opt.last_losses)))
            g_tol = g_tol / ref.sigma + max(map(abs, ref.projected_grads)) * dsigma / ref.sigma
        assert opt.projected_grads == pytest.approx(ref.projected_grads, rel=0, abs=g_tol)
        n = len(ref.projected_grads)
        umax = [max(float(z.abs().max()) for z in ref.z(rng.step_seed(3, t, j))) for j in range(n)]
        if ref.norms is not None:  # grad-norm: updates along c_l z
            gain, dgain = max(ref.norms), max(abs(a - b) for a, b in zip(opt.layer_norms, ref.norms))
        elif ref.layerwise == "param-norm":
            gain, dgain = max(float(x.norm()) / math.sqrt(x.numel()) for x in theta), w_tol
        else:
            gain, dgain = 1.0, 0.0
        gap = (
            sum(
                (abs(a - b) * gain + abs(b) * dgain + 1e-6 * abs(b) * gain) * u
                for a, b, u in zip(opt.projected_grads, ref.projected_grads, umax)
            )
            / n
        )
        est_gap = gap if rule == "sgd" else max(est_gap, gap)
        theta_max = max(float(x.abs().max()) for x in theta)
        rounding = (2 * n + 2) * ulp32(theta_max + 2 * opt.eps * max(umax) * max(1.0, 1 / gain))
        w_tol += lr * est_gap + rounding if rule != "adam" else 20 * ulp32(2.0) + rounding
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q.float(), rtol=0, atol=w_tol)


def test_one_perturbation_is_plain_mezo_bit_for_bit(toy_model, regression_data):
    runs = []
    for kwargs in (dict(), dict(n_perturbations=1), dict(n_perturbations=lambda t: 1)):
        model = toy_model()
        opt = MeZO(model.named_parameters(), lr=1e-2, weight_decay=0.1, seed=2, fuse_next=True, **kwargs)
        for _ in range(5):
            opt.step(mse_closure(model, *regression_data))
        opt.flush()
        runs.append([p.detach().clone() for p in model.parameters()])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize(
    "estimator,n,calls", [("two-sided", 1, 2), ("two-sided", 4, 8), ("one-sided", 1, 2), ("one-sided", 4, 5)]
)
def test_closure_calls_per_step(toy_model, regression_data, estimator, n, calls):
    model = toy_model()
    opt = MeZO(model.named_parameters(), lr=1e-2, n_perturbations=n, estimator=estimator)
    loss, count = mse_closure(model, *regression_data), [0]

    def counting():
        count[0] += 1
        return loss()

    opt.step(counting)
    assert count[0] == calls
    assert len(opt.projected_grads) == n


def test_one_sided_returns_and_reuses_the_unperturbed_loss(toy_model, regression_data):
    model = toy_model()
    loss = mse_closure(model, *regression_data)
    with torch.no_grad():
        clean = float(loss())
    opt = MeZO(model.named_parameters(), lr=0.0, n_perturbations=3, estimator="one-sided")
    assert float(opt.step(loss)) == clean


def test_n_schedule_changes_the_perturbations_per_step(toy_model, regression_data):
    model = toy_model()
    opt = MeZO(model.named_parameters(), lr=1e-2, n_perturbations=V.linear_n(1, 4, 3))
    sizes = []
    for _ in range(5):
        opt.step(mse_closure(model, *regression_data))
        sizes.append(len(opt.projected_grads))
    assert sizes == [1, 2, 3, 4, 4]


def _perturbations(d, seeds):
    """z of the sphere distribution as the optimizer applies it: (theta + eps z - theta) / eps with theta = 0."""
    x = torch.nn.Parameter(torch.zeros(d))
    out = []
    for seed in seeds:
        opt = MeZO([("x", x)], lr=0.0, eps=1.0, seed=seed, distribution="sphere")
        seen = []
        opt.step(lambda: seen.append(x.detach().clone()) or torch.tensor(0.0))
        out.append(seen[0])
    return torch.stack(out).double()


def test_sphere_perturbations_have_norm_sqrt_d():
    z = _perturbations(1000, range(3))
    # float32 z: its norm to ~1e-7 relative (3.5e-8 here), far inside 1e-5 and far from a Gaussian's spread
    # (its norm is sqrt(d) within ~2%); the mean of 3,000 unit-variance entries has a standard error of 0.018
    torch.testing.assert_close(z.norm(dim=1), torch.full((3,), math.sqrt(1000), dtype=torch.float64), rtol=1e-5, atol=0)
    assert abs(float(z.mean())) < 0.1


def test_sphere_coordinates_are_those_of_a_uniform_sphere():
    # On the sphere of radius sqrt(d): E z_i = 0, E z_i^2 = 1, E z_i^4 = 3d / (d + 2) (a Gaussian has 3).
    d, n = 8, 3000
    x = torch.zeros(n, d, dtype=torch.float64)
    for s in range(n):
        seed = rng.step_seed(11, s)
        g = torch.from_numpy(rng.gaussian(seed, rng.param_key("x"), 0, d)).double()
        x[s] = g * rng.sphere_factor(F.gaussian_sumsq([torch.zeros(d)], [rng.param_key("x")], seed), d)
    # float32 draws and factor: each norm sqrt(d) to 1.4e-7 relative (1e-6); the mean of 24,000 unit-variance
    # entries has a standard error of 0.0065 (0.05 is 7.7 of them); every norm sqrt(d) makes E z^2 = 1 to rounding;
    # z^4's mean has a standard error of ~2% of 2.4 (1.2% off here), a Gaussian's 3 is 25% off
    torch.testing.assert_close(x.norm(dim=1), torch.full((n,), math.sqrt(d), dtype=torch.float64), rtol=1e-6, atol=0)
    assert abs(float(x.mean())) < 0.05
    assert float((x**2).mean()) == pytest.approx(1.0, rel=1e-6)
    assert float((x**4).mean()) == pytest.approx(3 * d / (d + 2), rel=0.05)


def test_sphere_leaves_gaussian_and_rademacher_bits_alone():
    assert rng.DISTRIBUTIONS == ("gaussian", "rademacher", "gaussian-fast")
    # the optimizer's directions: the element-wise streams, and kinds built on them
    assert tuple(directions.KINDS) == (
        "gaussian",
        "rademacher",
        "gaussian-fast",
        "sphere",
        "lowrank",
        "subspace",
        "subzero",
    )
    assert [k for k, v in directions.KINDS.items() if v.elementwise and not v.sphere] == list(rng.DISTRIBUTIONS)


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_history_equals_stored_when_the_window_holds_every_step(toy_model, regression_data, rule):
    models = [toy_model(), toy_model()]
    cls = MeZOMomentum if rule == "momentum" else MeZOAdam
    kwargs = dict(beta=0.9) if rule == "momentum" else dict(betas=(0.9, 0.99))
    opts = [
        cls(models[0].named_parameters(), lr=1e-3, window=12, state="history", **kwargs),
        cls(models[1].named_parameters(), lr=1e-3, window=12, state="stored", **kwargs),
    ]
    # Both forms sum the same estimates g z; they differ only where rounding makes the two runs' g differ
    # (losses taken at weights an ulp apart: |dg| of an ulp of L over eps, seen at a few steps). Momentum:
    # the m gap follows m_gap <- beta m_gap + (1 - beta) |dg| max|z|; Adam's direction m/sqrt(v) is
    # scale-free: a g off by |dg|/|g| moves it by <= ~3 |dg|/|g| (w1/sqrt(w2) = (1-beta1)/sqrt(1-beta2) = 1,
    # times the bias corrections) for every later step. Plus 4 float32 sweeps of 1 ulp of the weights' range
    # a step, and m's float32 sums in another order (12 ulp of |g| max|z|). A window one short (11) drops
    # beta^11 of the first estimate: ~2e-5 here, ~3x this bound (~6e-6, mostly the roundings).
    w_tol, m_gap, d_gap = 0.0, 0.0, 0.0
    for t in range(12):
        for model, opt in zip(models, opts):
            opt.step(mse_closure(model, *regression_data))
        g0, g1 = opts[0].projected_grad, opts[1].projected_grad
        zmax = max(
            float(abs(rng.gaussian(rng.step_seed(0, t), rng.param_key(n), 0, p.numel())).max())
            for n, p in models[1].named_parameters()
        )
        m_gap = 0.9 * m_gap + 0.1 * abs(g0 - g1) * zmax + 12 * ulp32(abs(g1) * zmax)
        d_gap += 3 * abs(g0 - g1) / abs(g1)
        theta_max = max(float(p.detach().abs().max()) for p in models[1].parameters())
        w_tol += 1e-3 * (m_gap if rule == "momentum" else d_gap) + 4 * ulp32(theta_max + 2e-3 * zmax)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=0, atol=w_tol)


def test_momentum_history_is_within_the_documented_bound():
    # Same estimates fed to both forms: |m_stored - m_history| <= beta^W max|ghat| per step, so after T
    # steps the weights differ by at most lr * T * beta^W * max|ghat|.
    d, beta, window, steps, lr = 64, 0.7, 3, 12, 0.1
    gen = torch.Generator().manual_seed(0)
    grads = [float(g) for g in torch.randn(steps, generator=gen)]
    thetas = [torch.zeros(d), torch.zeros(d)]
    rules = [V.MomentumRule(beta, 0.0, window, stored=False), V.MomentumRule(beta, 0.0, window, stored=True)]
    gmax = 0.0
    for t, g in enumerate(grads):
        seed = rng.step_seed(5, t)
        gmax = max(gmax, abs(g) * float(torch.from_numpy(rng.gaussian(seed, 1, 0, d)).abs().max()))
        for theta, rule in zip(thetas, rules):
            u = V.StepUpdate(t, [seed], [1.0], [g], None, None)
            rule.apply(
                [V.Group([theta], [1], [0], lr, 0.0)], u, distribution="gaussian", rounding_seed=None, backend=None
            )
    gap = float((thetas[0] - thetas[1]).abs().max())
    assert 0 < gap <= lr * steps * beta**window * gmax


def _nan_at(closure, calls):
    count = [0]

    def wrapped():
        count[0] += 1
        return torch.tensor(float("nan")) if count[0] in calls else closure()

    return wrapped


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_replays_bit_for_bit(tmp_path, toy_model, regression_data, name):
    model = toy_model()
    opt = _build(name, model, trajectory=tmp_path / "t.zot", on_nonfinite="skip", weight_decay=0.05)
    closure = _nan_at(mse_closure(model, *regression_data), {3, 10})  # two steps skipped mid-probe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(8):
            opt.step(closure)
    opt._writer.close()
    base = toy_model()
    replay(base, tmp_path / "t.zot")
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)
    fast = toy_model()
    replay(fast, tmp_path / "t.zot", exact=False)
    # exact=False skips the probe sweeps, whose float32 roundings (<= 2n + 2 a step, n <= 3, each <= 1 ulp
    # of |theta| + 2 eps |u| < 2 with grad-norm's 1/c_l) the run kept: <= 8 steps * 8 * ulp(2) ~ 1.5e-5.
    # A dropped update moves a weight by lr |g| |z| ~ 1e-2.
    for p, q in zip(model.parameters(), fast.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=8 * 8 * ulp32(2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_n_spsa_with_sphere_replays_bit_for_bit(tmp_path, toy_model, regression_data, dtype):
    model = toy_model(dtype=dtype)
    opt = MeZOMomentum(
        model.named_parameters(),
        lr=1e-2,
        n_perturbations=3,
        distribution="sphere",
        fuse_next=True,
        stochastic_rounding=True,
        window=4,
        trajectory=tmp_path / "t.zot",
    )
    for _ in range(6):
        opt.step(mse_closure(model, *regression_data))
    opt.flush()
    opt._writer.close()
    records = read_trajectory(tmp_path / "t.zot").records
    assert sum(isinstance(r, MultiStep) for r in records) == 6
    base = toy_model(dtype=dtype)
    replay(base, tmp_path / "t.zot")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


V1_TRAJECTORY = "".join(
    [
        "Wk9UUkFKAQDSAgAAeyJkaXN0cmlidXRpb24iOiAiZ2F1c3NpYW4iLCAiZmlyc3Rfc3RlcCI6IDAsICJmb3JtYXQiOiAiem90dW5l"
        "LXRyYWplY3RvcnkiLCAiZnVzZV9uZXh0IjogdHJ1ZSwgImdyb3VwcyI6IFtbMCwgMV0sIFsyLCAzLCA0LCA1XV0sICJuYW1lZCI6"
        "IHRydWUsICJwYXJhbXMiOiBbeyJkdHlwZSI6ICJmbG9hdDMyIiwgImtleSI6ICJjNjU1NTEwMTFlZTA3OGU2IiwgIm5hbWUiOiAi"
        "MC53ZWlnaHQiLCAic2hhcGUiOiBbOCwgNl19LCB7ImR0eXBlIjogImZsb2F0MzIiLCAia2V5IjogIjMxZGM4ZTQyMjk5NzE0MjYi"
        "LCAibmFtZSI6ICIzLndlaWdodCIsICJzaGFwZSI6IFszLCA4XX0sIHsiZHR5cGUiOiAiZmxvYXQzMiIsICJrZXkiOiAiYTA3Y2U4"
        "NGE3NDI5NjkxNSIsICJuYW1lIjogIjAuYmlhcyIsICJzaGFwZSI6IFs4XX0sIHsiZHR5cGUiOiAiZmxvYXQzMiIsICJrZXkiOiAi"
        "MDEwZmUxYWRjOTViNGY1NiIsICJuYW1lIjogIjIud2VpZ2h0IiwgInNoYXBlIjogWzhdfSwgeyJkdHlwZSI6ICJmbG9hdDMyIiwg"
        "ImtleSI6ICI1ZjRhMzUyYzMyNDI3ZjBhIiwgIm5hbWUiOiAiMi5iaWFzIiwgInNoYXBlIjogWzhdfSwgeyJkdHlwZSI6ICJmbG9h"
        "dDMyIiwgImtleSI6ICJmMGIxMzQ2ZTlhY2U1NzUxIiwgIm5hbWUiOiAiMy5iaWFzIiwgInNoYXBlIjogWzNdfV0sICJzZWVkIjog"
        "NywgInN0b2NoYXN0aWNfcm91bmRpbmciOiBmYWxzZSwgInpvdHVuZV92ZXJzaW9uIjogIjAuMS4wIn3lO7xzSG8SgzrNzMw9AAAA"
        "AJh3UwAAAAAIHIa/CtcjPArXIzxjy1MBAAAAP/7AvwrXIzwK1yM8+OhYAgAAAAJ1GVMDAAAAXwpMwArXIzwK1yM89lBGBAAAAKPN"
        "UwQAAABbz07ACtcjPArXIzzzw0YFAAAAxqo="
    ]
)  # written by zotune before the variants (plain MeZO, fuse_next, wd 0.1, seed 7, a NaN at call 6)


def test_v1_trajectories_still_read_and_replay(tmp_path, toy_model, regression_data):
    path = tmp_path / "v1.zot"
    path.write_bytes(base64.b64decode(V1_TRAJECTORY))
    # The same run today writes the same bytes and weights.
    model = toy_model()
    opt = MeZO(
        model.named_parameters(),
        lr=1e-2,
        weight_decay=0.1,
        fuse_next=True,
        seed=7,
        on_nonfinite="skip",
        trajectory=tmp_path / "now.zot",
    )
    closure = _nan_at(mse_closure(model, *regression_data), {6})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(4):
            opt.step(closure)
    opt.flush()
    opt.step(closure)
    opt.flush()
    opt._writer.close()
    stored, now = read_trajectory(path), read_trajectory(tmp_path / "now.zot")
    # The same run today writes the same header and the same records, in the same layout: today's writer
    # lays the stored records out byte for byte as the stored file.
    assert now.header == stored.header
    again = TrajectoryWriter(tmp_path / "again.zot", stored.header)
    for record in stored.records:
        again.append(record)
    again.close()
    assert (tmp_path / "again.zot").read_bytes() == path.read_bytes()
    # The projected gradients (L+ - L-) / 2 eps come from float losses whose last bits depend on the CPU and
    # the torch build (its kernels' summation order): equal structure, and g to 20 ulp of L per loss, over
    # eps (as in test_optim's reference comparisons; ~5e-3 here; an H100 machine's CPU differed by 1.1e-4
    # relative, ~0.5e-3). The weights the two files rebuild then differ by what those g gaps move: lr |dg|
    # max|z| a step (weight decay only shrinks a gap), plus the roundings of sweeps applied to differing
    # weights (<= 4 a step or skip: +eps, -2 eps, update or undo, flush; <= 2 ulp each of |theta| + 2 eps max|z|).
    assert [type(r) for r in now.records] == [type(r) for r in stored.records]
    g_tol = 20 * ulp32(max(map(abs, opt.last_losses))) / opt.eps
    w_tol = 0.0
    names = [n for n, _ in model.named_parameters()]
    theta_max = max(float(p.detach().abs().max()) for p in model.parameters())
    for got, want in zip(now.records, stored.records):
        if isinstance(want, Step):
            assert (got.step, got.lrs) == (want.step, want.lrs)
            assert got.projected_grad == pytest.approx(want.projected_grad, rel=0, abs=g_tol)
            zmax = max(
                float(abs(rng.gaussian(rng.step_seed(7, want.step), rng.param_key(n), 0, p.numel())).max())
                for n, p in zip(names, model.parameters())
            )
            w_tol += max(want.lrs) * abs(got.projected_grad - want.projected_grad) * zmax
        else:
            assert got == want
        if isinstance(want, (Step, Skip)):
            w_tol += 4 * 2 * ulp32(theta_max + 2 * opt.eps * 6.0)  # 6: above any |z| of these 91 elements
    # Replay is exact: today's file rebuilds today's weights bit for bit, and the stored file rebuilds them
    # bit for bit wherever its gradients are today's (as on the machine that wrote it), closely elsewhere.
    base = toy_model()
    replay(base, tmp_path / "now.zot")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    base = toy_model()
    replay(base, path)
    for p, q in zip(model.parameters(), base.parameters()):
        if now.records == stored.records:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(q, p, rtol=0, atol=w_tol)


def test_forward_gradient_trajectories_replay_as_plain_updates(tmp_path, toy_model):
    from zotune.trajectory import Hyper

    model = toy_model()
    named = list(model.named_parameters())
    header = {
        "format": "zotune-trajectory",
        "seed": 4,
        "distribution": "gaussian",
        "fuse_next": False,
        "stochastic_rounding": False,
        "named": True,
        "first_step": 0,
        "estimator": "forward-gradient",
        "params": [
            {"name": n, "key": f"{rng.param_key(n):016x}", "shape": list(p.shape), "dtype": "float32"} for n, p in named
        ],
        "groups": [list(range(len(named)))],
    }
    writer = TrajectoryWriter(tmp_path / "fg.zot", header)
    writer.append(Hyper(1e-3, (0.0,)))
    writer.append(Step(0, 0.5, (0.01,)))
    writer.append(MultiStep(1, (0.25, -1.0), (0.01,)))
    writer.close()
    expected = [p.detach().clone() for _, p in named]
    keys = [rng.param_key(n) for n, _ in named]
    F.sweep_(expected, keys, [(rng.step_seed(4, 0), -0.01 * 0.5)])
    F.sweep_(expected, keys, [(rng.step_seed(4, 1, 0), -0.005 * 0.25), (rng.step_seed(4, 1, 1), -0.005 * -1.0)])
    replay(model, tmp_path / "fg.zot")
    for p, q in zip(model.parameters(), expected):  # the same sweeps; the scalars rounded to float32 or not: 1 ulp
        torch.testing.assert_close(
            p, q, rtol=0, atol=2 * ulp32(1.5)
        )  # of |theta| < 1.5 a step; a lost step: lr |g| |z| ~ 5e-3


def _checkpoint(model, opt):
    return {k: v.clone() for k, v in model.state_dict().items()}, json.loads(json.dumps(opt.state_dict(flush=False)))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_resume_continues_bit_for_bit(tmp_path, toy_model, regression_data, name):
    steps, k = 10, 5
    full = toy_model()
    opt = _build(name, full)
    for _ in range(steps):
        opt.step(mse_closure(full, *regression_data))

    part = toy_model()
    opt = _build(name, part, trajectory=tmp_path / "part.zot")
    for _ in range(k):
        opt.step(mse_closure(part, *regression_data))
    _, state = _checkpoint(part, opt)
    for _ in range(2):  # lost after the checkpoint
        opt.step(mse_closure(part, *regression_data))
    opt._writer.close()

    # What `zotune train --resume` does: rebuild the weights by replay, then load the optimizer state.
    resumed = toy_model()
    with open(tmp_path / "part.zot", "r+b") as f:
        f.truncate(state["mezo"]["trajectory_bytes"])
    replay(resumed, read_trajectory(tmp_path / "part.zot"), finish=False)
    opt = _build(name, resumed, trajectory=tmp_path / "part.zot")
    opt.load_state_dict(state)
    for _ in range(steps - k):
        opt.step(mse_closure(resumed, *regression_data))
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_state_of_another_variant_is_rejected(toy_model, regression_data):
    model = toy_model()
    opt = MeZO(model.named_parameters(), lr=1e-2, n_perturbations=2)
    opt.step(mse_closure(model, *regression_data))
    other = MeZOMomentum(model.named_parameters(), lr=1e-2, n_perturbations=2)
    with pytest.raises(ValueError, match="variant options"):
        other.load_state_dict(opt.state_dict())


def test_stored_state_resume_without_trajectory_says_what_to_do(toy_model, regression_data):
    model = toy_model()
    opt = MeZOAdam(model.named_parameters(), lr=1e-3, state="stored")
    opt.step(mse_closure(model, *regression_data))
    again = MeZOAdam(model.named_parameters(), lr=1e-3, state="stored")
    with pytest.raises(ValueError, match="rebuilds m and v from the trajectory"):
        again.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_perturbations=0), "Invalid n_perturbations: 0"),
        (dict(n_perturbations=101), "Invalid n_perturbations: 101"),
        (dict(estimator="three-sided"), "Invalid estimator: 'three-sided'"),
        (dict(layerwise="gradient"), "Invalid layerwise: 'gradient'"),
        (dict(layerwise="grad-norm", grad_norm_every=-1), "Invalid grad_norm_every: -1"),
        (dict(layerwise="grad-norm", grad_norm_probes=0), "Invalid grad_norm_probes: 0"),
        (dict(layerwise="grad-norm", fuse_next=True), "fuse_next=True works with the two-sided"),
        (dict(distribution="ball"), "Invalid distribution: 'ball'"),
        (dict(estimator="one-sided", fuse_next=True), "fuse_next=True works with the two-sided"),
    ],
)
def test_bad_variant_arguments_raise_naming_the_value(toy_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeZO(toy_model().parameters(), lr=1e-3, **kwargs)


@pytest.mark.parametrize(
    "field,value",
    [
        ("n_perturbations", 0),
        ("n_perturbations_final", 500),
        ("n_schedule", "cosine"),
        ("n_ramp_steps", 0),
        ("estimator", "central"),
        ("variant", "lion"),
        ("beta1", 1.0),
        ("beta2", -0.1),
        ("adam_eps", 0.0),
        ("window", 0),
        ("state", "disk"),
        ("layerwise", "gradient"),
        ("distribution", "ball"),
        ("grad_norm_every", -1),
        ("grad_norm_probes", 0),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"optimizer.{field} "):
        OptimConfig(**{field: value})


@pytest.mark.parametrize(
    "config,cls,fuse",
    [
        (OptimConfig(), MeZO, True),
        (OptimConfig(estimator="one-sided", n_perturbations=3), MeZO, False),
        (OptimConfig(variant="momentum", window=8), MeZOMomentum, True),
        (OptimConfig(variant="adam", state="stored", layerwise="param-norm"), MeZOAdam, False),
        (OptimConfig(layerwise="grad-norm", grad_norm_every=50, grad_norm_probes=3), MeZO, False),
    ],
)
def test_make_optimizer_builds_the_configured_variant(toy_model, config, cls, fuse):
    opt = make_optimizer(toy_model().named_parameters(), config)
    assert type(opt) is cls and opt.fuse_next is fuse and opt.on_nonfinite == "skip"
    assert (opt.layerwise, opt.grad_norm_every, opt.grad_norm_probes) == (
        config.layerwise,
        config.grad_norm_every,
        config.grad_norm_probes,
    )
    assert zotune.make_optimizer is make_optimizer


def test_make_optimizer_linear_n_schedule(toy_model, regression_data):
    model = toy_model()
    opt = make_optimizer(
        model.named_parameters(),
        OptimConfig(n_perturbations=2, n_schedule="linear", n_perturbations_final=4, n_ramp_steps=2),
    )
    sizes = []
    for _ in range(3):
        opt.step(mse_closure(model, *regression_data))
        sizes.append(len(opt.projected_grads))
    assert sizes == [2, 3, 4]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_minimises_a_quadratic(name):
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(10, 10, generator=gen)
    a = m @ m.T / 10 + torch.eye(10)
    x = torch.nn.Parameter(torch.randn(10, generator=gen) + 1.0)
    cls, kwargs, _ = VARIANTS[name]
    lr = 0.005 if kwargs.get("layerwise") == "param-norm" else 0.02  # s_l^2 ~ 2 multiplies the step
    if cls is MeZOAdam:
        lr = 0.05  # Adam's steps are ~lr per coordinate, whatever the estimate's scale
    if cls is FZOO or kwargs.get("estimator") == "fzoo":
        lr = 2e-5  # a normalized step: ~lr / (eps sqrt(N)) = 0.01 per coordinate, whatever the loss's scale
    opt = cls([("x", x)], lr=lr, eps=1e-3, **kwargs)
    loss = lambda: 0.5 * x @ a @ x  # noqa: E731
    start = float(loss().detach())
    for _ in range(300):
        opt.step(loss)
    # the slowest, param-norm at its smaller lr, reaches 0.025 of the start in 300 seeded steps; the others 1e-3
    # or below
    assert float(loss().detach()) < 0.05 * start


_ADAM = ["--variant", "adam", "--optimizer.state", "stored", "--n_perturbations", "2", "--estimator", "one-sided"]


@pytest.mark.parametrize(
    "options, rule",
    [
        ([*_ADAM, "--layerwise", "param-norm"], "adam"),
        ([*_ADAM, "--layerwise", "grad-norm", "--grad_norm_every", "2"], "adam"),
        (["--estimator", "hizoo", "--optimizer.hizoo_alpha", "1e-3"], "hizoo"),  # its diagonal saved and taken back
        (["--estimator", "fzoo", "--n_perturbations", "3", "--distribution", "rademacher"], None),
    ],
)
def test_train_with_a_variant_resumes_like_an_uninterrupted_run(model_dir, tmp_path, monkeypatch, options, rule):

    from zotune.cli import main

    def args(out):
        return [
            "train",
            "--model.name",
            str(model_dir),
            "--steps",
            "4",
            "--eval_every",
            "4",
            "--train",
            "16",
            "--validation",
            "8",
            "--test",
            "8",
            "--batch_size",
            "4",
            "--lr",
            "1e-3",
            "--progress",
            "false",
            "--zero_shot",
            "false",
            "--save_best",
            "false",
            "--output_dir",
            str(out),
            *options,
        ]

    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args(full)) == 0
    assert stopped_during_step(monkeypatch, args(part), 1) == 130  # during the second step: it finishes it and stops
    assert main(["train", "--resume", str(part)]) == 0
    a, b = read_trajectory(full / "trajectory.zot"), read_trajectory(part / "trajectory.zot")
    assert a.header.get("variant", {}).get("name") == rule and a.records == b.records
    assert sum(isinstance(r, (Step, MultiStep)) for r in a.records) == 4


@pytest.mark.parametrize("cls", ["MeZOMomentum", "MeZOAdam"])
def test_history_variants_allocate_no_parameter_sized_tensor(cls):
    # A 16 MB parameter, n-SPSA with the sphere, layerwise scales and a 3-step history: chunks only.
    from memory import rss_growth_mb

    setup = f"""
        import torch, zotune
        p = torch.nn.Parameter(torch.zeros(2**22) + 0.5)
        opt = zotune.{cls}([("p", p)], lr=1e-6, window=3, n_perturbations=2, estimator="one-sided",
                           distribution="sphere", layerwise="param-norm")
        closure = lambda: p[:1000].sum()
        opt.step(closure)  # warm-up: JIT compilation, chunk buffers, allocator pools
    """
    growth_mb = rss_growth_mb(setup, "opt.step(closure); opt.step(closure)")
    assert growth_mb < 8, f"peak memory grew by {growth_mb} MB during a step on a 16 MB parameter"


# -- the gradient-norm layerwise variant (the authors' Appendix B code: per-layer probes, z / c_l, c_l z) --


def test_layer_groups_follow_numbered_blocks():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.w",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.10.x.lora_A.default.weight",
        "model.norm.weight",
        "lm_head.weight",
        "0.weight",
        "0.bias",
        "3.weight",
    ]
    assert V.layer_groups(names) == [[0], [1, 2], [3], [4], [5], [6], [7, 8], [9]]


def test_grad_norm_scales_keep_the_perturbation_norm_and_fill_gaps():
    groups, sizes = [[0], [1, 2], [3]], [10, 5, 5, 30]
    c = V.grad_norm_scales([4.0, 1.0, 0.25], groups, sizes)
    assert c[1] == c[2] and c[0] / c[1] == pytest.approx(2.0) and c[1] / c[3] == pytest.approx(2.0)
    d = sum(sizes)
    assert sum(n / x**2 for n, x in zip(sizes, c)) == pytest.approx(d, rel=1e-6)  # E||z/c||^2 = d
    filled = V.grad_norm_scales([4.0, None, 0.25], groups, sizes)  # geometric mean of 2 and 0.5: 1
    assert filled[1] / filled[3] == pytest.approx(2.0)
    assert V.grad_norm_scales([None, 0.0, math.nan], groups, sizes) == [1.0] * 4


def test_grad_norm_probes_estimate_each_layers_gradient_norm():
    # A linear loss: finite differences are exact, g_l = z_l . a_l, so sqrt(mean g_l^2) -> ||a_l||.
    gen = torch.Generator().manual_seed(1)
    a = {
        "emb.weight": 4.0 * torch.randn(50, generator=gen),
        "blocks.0.w": torch.randn(200, generator=gen),
        "blocks.1.w": 0.1 * torch.randn(100, generator=gen),
    }
    params = [(n, torch.nn.Parameter(torch.zeros(t.numel()))) for n, t in a.items()]
    loss = lambda: sum(float(a[n] @ p) for n, p in params)  # noqa: E731
    opt = MeZO(params, lr=0.0, layerwise="grad-norm", grad_norm_probes=400)
    calls = []
    opt.step(lambda: calls.append(1) or loss())
    assert len(calls) == 2 * 3 * 400 + 2
    c = opt.layer_norms
    true = [float(t.norm()) for t in a.values()]
    # 400 probes of (a.z)^2 ~ |a|^2 chi^2_1 give each norm to ~3.5% and a ratio to ~5% (seeded: 13% and 9% off
    # here); a scale that ignored the layers' norms (2 and 14 apart) is off by 2x-14x
    assert c[0] / c[1] == pytest.approx(true[0] / true[1], rel=0.15)
    assert c[1] / c[2] == pytest.approx(true[1] / true[2], rel=0.15)
    for _, p in params:  # lr 0: the probes left the weights where they were (up to rounding: each of the 7,206
        # sweeps from zero rounds at most 2^-24 eps |z| ~ 3e-10; exactly 0 here)
        assert float(p.detach().abs().max()) < 1e-6


def test_grad_norm_reestimates_on_schedule_and_costs_the_stated_passes(toy_model, regression_data):
    model = toy_model()
    opt = MeZO(model.named_parameters(), lr=1e-2, layerwise="grad-norm", grad_norm_every=3, grad_norm_probes=2)
    closure = mse_closure(model, *regression_data)
    per_step = []
    for _ in range(7):
        calls = []
        opt.step(lambda: calls.append(1) or closure())
        per_step.append(len(calls))
    probes = 2 * 3 * 2  # 3 layers (0, 2, 3), 2 probes, 2 passes each
    assert per_step == [probes + 2, 2, 2, probes + 2, 2, 2, probes + 2]


def test_grad_norm_trajectory_records_probe_passes(tmp_path, toy_model, regression_data):
    from zotune.trajectory import LayerProbe, LayerScales

    model = toy_model()
    opt = MeZO(
        model.named_parameters(),
        lr=1e-2,
        layerwise="grad-norm",
        grad_norm_every=2,
        seed=5,
        trajectory=tmp_path / "t.zot",
    )
    for _ in range(3):
        opt.step(mse_closure(model, *regression_data))
    opt._writer.close()
    traj = read_trajectory(tmp_path / "t.zot")
    assert traj.header["layerwise"] == "grad-norm" and traj.header["layer_groups"] == [[0, 1], [2, 3], [4, 5]]
    assert [r.step for r in traj.records if isinstance(r, LayerProbe)] == [0, 2]
    assert all(r.applied == 9 and r.probes == 1 for r in traj.records if isinstance(r, LayerProbe))
    scales = [r.scales for r in traj.records if isinstance(r, LayerScales)]
    assert len(scales) == 3 and scales[0] == scales[1] != scales[2] == tuple(opt.layer_norms)


def test_grad_norm_interrupted_probe_is_undone_and_replays(tmp_path, toy_model, regression_data):
    model = toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.named_parameters(), lr=1e-2, layerwise="grad-norm", trajectory=tmp_path / "t.zot")
    closure = mse_closure(model, *regression_data)
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 4:  # layer 1's L-: the parameters hold theta - eps z_1
            raise KeyboardInterrupt
        return closure()

    with pytest.raises(KeyboardInterrupt):
        opt.step(interrupted)
    for p, q in zip(model.parameters(), before):  # 7 probe sweeps and the undo, <= 1 ulp each of |theta| +
        torch.testing.assert_close(p, q, rtol=0, atol=8 * ulp32(2.0))  # 2 eps |z| / c_l < 2; not undone: eps |z| / c_l
    opt._writer.close()
    base = toy_model()
    replay(base, tmp_path / "t.zot")
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "cls,kwargs", [(MeZOAdam, dict(betas=(0.8, 0.9))), (MeZOMomentum, dict(beta=0.8))], ids=["adam", "momentum"]
)
def test_saved_moments_resume_as_the_rebuilt_ones_do(toy_model, regression_data, tmp_path, cls, kwargs):
    def build(model, path):
        return cls(model.named_parameters(), lr=1e-3, state="stored", seed=5, trajectory=path, **kwargs)

    model = toy_model()
    opt = build(model, tmp_path / "a.zot")
    for _ in range(3):
        opt.step(mse_closure(model, *regression_data))
    state, moments = opt.state_dict(), {k: t.clone() for k, t in opt.moment_tensors().items()}
    assert sorted(moments) == sorted(f"{k}.{i}" for k in ("m", "v")[: 2 if cls is MeZOAdam else 1] for i in range(6))
    weights = [p.detach().clone() for p in model.parameters()]
    resumed = []
    saved = (tmp_path / "a.zot").read_bytes()
    for j, given in enumerate((moments, None, {"m.0": moments["m.0"]})):  # saved; none, incomplete: rebuilt
        copy = toy_model()
        with torch.no_grad():
            for p, w in zip(copy.parameters(), weights):
                p.copy_(w)
        (tmp_path / f"{j}.zot").write_bytes(saved)  # each resume continues its own copy of the run's file
        again = build(copy, tmp_path / f"{j}.zot")
        again.load_state_dict(json.loads(json.dumps(state)), moments=given)
        if given is moments:
            assert all(again.rule.m[i].data_ptr() != moments[f"m.{i}"].data_ptr() or True for i in range(6))
        resumed.append((again, copy))
    for again, copy in resumed:
        for k in moments:
            assert torch.equal(again.moment_tensors()[k], moments[k]), (
                k,
                (again.moment_tensors()[k] - moments[k]).abs().max(),
            )
        again.step(mse_closure(copy, *regression_data))
    for (_, a), (_, b) in zip(resumed, resumed[1:]):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert MeZO(toy_model().named_parameters(), lr=1e-3).moment_tensors() == {}
