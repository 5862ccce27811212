"""The MeZO optimizer: contract, in-place behaviour, equivalence with the explicit-z reference."""

import math

import pytest
import torch
from conftest import mse_closure, ulp32
from memory import rss_growth_mb

from zotune import MeZO, NonFiniteLossError, rng
from zotune.optim import functional as F
from zotune.optim.reference import ReferenceMeZO


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(lr=float("nan")), "Invalid learning rate"),
        (dict(lr=1e-3, eps=0.0), "Invalid eps: 0.0"),
        (dict(lr=1e-3, weight_decay=-0.1), "Invalid weight_decay: -0.1"),
        (dict(lr=1e-3, seed=-1), "Invalid seed: -1"),
        (dict(lr=1e-3, seed=2**64), "Invalid seed"),
        (dict(lr=1e-3, distribution="cauchy"), "Invalid distribution: 'cauchy'"),
        (dict(lr=1e-3, on_nonfinite="ignore"), "Invalid on_nonfinite: 'ignore'"),
        (dict(lr=1e-3, backend="cuda-magic"), "unknown backend 'cuda-magic'"),
    ],
)
def test_bad_arguments_raise_naming_the_value(toy_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeZO(toy_model().parameters(), **kwargs)


def test_empty_or_frozen_parameters_are_rejected(toy_model):
    with pytest.raises(ValueError, match="empty parameter list"):
        MeZO([], lr=1e-3)
    model = toy_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        MeZO(model.parameters(), lr=1e-3)


def test_frozen_parameters_are_left_alone(toy_model, regression_data):
    model = toy_model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = MeZO(model.named_parameters(), lr=1e-2)
    opt.step(mse_closure(model, *regression_data))
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[3].weight, toy_model()[3].weight)


def test_step_needs_a_closure(toy_model):
    opt = MeZO(toy_model().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step(None)


def test_closure_is_called_twice_without_autograd(toy_model, regression_data):
    model = toy_model()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return mse_closure(model, *regression_data)()

    opt = MeZO(model.parameters(), lr=1e-3)
    loss = opt.step(closure)
    assert calls == [False, False]
    assert torch.is_tensor(loss) and opt.last_losses[0] == float(loss)
    # Exact on any machine: the same two doubles, the same operations (eps and g rounded to float32, as the
    # optimizer records them). A sign slip or a 1/eps for 1/(2 eps) is off by the whole of g.
    g = F.f32((opt.last_losses[0] - opt.last_losses[1]) / (2 * F.f32(1e-3)))
    assert opt.projected_grad == g


def test_losses_are_taken_at_plus_and_minus_eps(toy_model, regression_data):
    """L+ and L- are the losses at theta + eps z and theta - eps z, with z from the reference generator."""
    model = toy_model()
    ref_model = toy_model()
    opt = MeZO(model.named_parameters(), lr=0.0, eps=1e-2, seed=4)
    ref = ReferenceMeZO([(n, p, 0.0) for n, p in ref_model.named_parameters()], lr=0.0, eps=1e-2, seed=4)
    opt.step(mse_closure(model, *regression_data))
    plus = ref.step(mse_closure(ref_model, *regression_data))
    # MeZO reaches theta +- eps z by float32 sweeps (theta + eps z, then - 2 eps z), the reference rounds
    # theta +- eps z once from float64: the weights are 1-2 ulp of theta (|theta| < 1.5) apart. That moves
    # each loss by at most |grad L|_1 * 2 ulp(theta) ~ 16 * 2.4e-7 = 16 ulp(L) here (L ~ 2.5; the roundings'
    # signs are random, so ~2 ulp in practice), plus the loss's own re-rounding: 20 ulp of L, and
    # 2 * 20 ulp / (2 eps) for g (~5e-5 of |g| ~ 9). The wrong z, sign or eps moves g by O(|g|).
    L_tol = 20 * ulp32(max(abs(plus), *map(abs, opt.last_losses)))
    assert opt.last_losses[0] == pytest.approx(plus, rel=0, abs=L_tol)
    assert opt.projected_grad == pytest.approx(ref.projected_grad, rel=0, abs=L_tol / 1e-2)


@pytest.mark.parametrize("fuse_next", [False, True])
@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
def test_matches_explicit_z_reference_step_by_step(toy_model, regression_data, fuse_next, distribution):
    model, ref_model = toy_model(), toy_model()
    x, y = regression_data
    lr, wd = 5e-3, 0.1
    opt = MeZO(model.named_parameters(), lr=lr, weight_decay=wd, seed=3, distribution=distribution, fuse_next=fuse_next)
    ref = ReferenceMeZO(
        [(n, p, wd if p.ndim >= 2 else 0.0) for n, p in ref_model.named_parameters()],
        lr=lr,
        seed=3,
        distribution=distribution,
    )
    # The two runs agree up to rounding, which this bounds step by step. g: the losses are taken at
    # weights a few ulp apart, each moved by <= 20 ulp of L (see test_losses_are_taken_at_plus_and_minus_eps;
    # measured <= 2), so g to 2 * 20 ulp(L) / (2 eps) ~ 5e-3 (|g| ~ 5). Weights: theta' = (1 - lr wd) theta
    # - lr g z with the same z, so their gap grows per step by at most lr |g_a - g_b| max|z| (the g gap
    # actually seen), plus MeZO's float32 roundings (3 sweeps, one more when fused: 5 ulp of |theta| + 2 eps
    # max|z|) and lr |g| 1e-6 max|z| (the numba Gaussian is within 1e-6 of the reference's: test_kernels).
    # Dropping weight decay moves a matrix by lr wd |theta| ~ 6e-4 in one step, far above the ~1e-6 bound.
    w_tol = 0.0
    for t in range(20):
        opt.step(mse_closure(model, x, y))
        ref.step(mse_closure(ref_model, x, y))
        g_tol = 20 * ulp32(max(map(abs, opt.last_losses))) / opt.eps
        assert opt.projected_grad == pytest.approx(ref.projected_grad, rel=0, abs=g_tol)
        zmax = max(
            float(abs(rng.z(distribution, rng.step_seed(3, t), rng.param_key(n), 0, p.numel())).max())
            for n, p in model.named_parameters()
        )
        theta_max = max(float(p.detach().abs().max()) for p in ref_model.parameters())
        w_tol += lr * (
            abs(opt.projected_grad - ref.projected_grad) + 1e-6 * abs(ref.projected_grad)
        ) * zmax + 5 * ulp32(theta_max + 2 * opt.eps * zmax)
        with opt.unperturbed():
            for p, q in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p, q, rtol=0, atol=w_tol)


def test_parameters_stay_in_place(toy_model, regression_data):
    model = toy_model()
    pointers = [p.data_ptr() for p in model.parameters()]
    opt = MeZO(model.named_parameters(), lr=1e-2, fuse_next=True)
    for _ in range(3):
        opt.step(mse_closure(model, *regression_data))
    opt.flush()
    assert pointers == [p.data_ptr() for p in model.parameters()]


def test_no_allocation_of_a_parameters_size():
    # A 256 MB parameter: a step may allocate bounded chunks only. Measured in a fresh process.
    setup = """
        import torch, zotune
        p = torch.nn.Parameter(torch.zeros(2**26))
        opt = zotune.MeZO([p], lr=1e-3)
        closure = lambda: p[:1000].sum()
        opt.step(closure)  # warm-up: JIT compilation, chunk buffers, allocator pools
    """
    growth_mb = rss_growth_mb(setup, "opt.step(closure); opt.step(closure)")
    assert growth_mb < 64, f"peak memory grew by {growth_mb} MB during a step on a 256 MB parameter"


def test_weight_decay_spares_rank_one_tensors(toy_model):
    model = toy_model()
    opt = MeZO(model.parameters(), lr=1e-3, weight_decay=0.5)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])
    assert all(p.ndim < 2 for p in opt.param_groups[1]["params"])
    # Given groups are honoured as they are.
    opt = MeZO([{"params": model[0].parameters(), "weight_decay": 0.3}, {"params": model[3].parameters()}], lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_weight_decay_shrinks_matrices_when_the_loss_is_flat(toy_model):
    model = toy_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MeZO(model.named_parameters(), lr=0.1, weight_decay=0.5)
    opt.step(lambda: torch.tensor(1.0))  # g = 0: only the decay acts
    for name, p in model.named_parameters():
        expected = before[name] * (0.95 if p.ndim >= 2 else 1.0)
        # Three float32 sweeps (+eps z, -2 eps z, 0.95 * (theta + eps z)) round to <= 1 ulp of |theta| +
        # 2 eps |z| < 2 each: 4 ulp(2) ~ 1e-6 with the expected value's own rounding. No decay: off by 0.05 |theta|.
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=4 * ulp32(2.0))


def test_works_with_lr_schedulers(toy_model, regression_data):
    model = toy_model()
    opt = MeZO(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        opt.step(mse_closure(model, *regression_data))
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train(toy_model, regression_data, dtype):
    model = toy_model(dtype=dtype)
    closure = mse_closure(model, *regression_data)
    with torch.no_grad():
        start = float(closure())
    opt = MeZO(model.named_parameters(), lr=2e-2, eps=1e-2, stochastic_rounding=True)
    for _ in range(150):
        opt.step(closure)
    with torch.no_grad():
        end = float(closure())
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    assert end < 0.5 * start  # the seeded runs reach 0.34 (bfloat16 and float16 alike) in 150 steps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_keeps_sub_ulp_updates_alive(dtype):
    """Updates of a tenth of an ulp: nearest rounding drops them all, stochastic rounding keeps them on average."""
    from zotune import rng

    # Weights near 1.5, eps = 2**-4: theta +- eps z stays on the grid of [1, 2), so the perturbation
    # sweeps are exact and only the update's rounding is under test.
    n, steps, eps = 4096, 300, 2.0**-4
    ulp = float(torch.finfo(dtype).eps)
    lr, g = 0.1 * ulp, 1.0

    def run(stochastic):
        w = torch.nn.Parameter(torch.full((n,), 1.5, dtype=dtype))
        opt = MeZO([w], lr=lr, eps=eps, distribution="rademacher", stochastic_rounding=stochastic)
        values = iter([eps * g, -eps * g] * steps)  # L+ and L- such that the projected gradient is g
        for _ in range(steps):
            opt.step(lambda: next(values))
        assert opt.projected_grad == g
        return w.detach().double() - 1.5

    intended = torch.zeros(n, dtype=torch.float64)  # the exact movement, -lr * g * sum_t z_t
    for t in range(steps):
        intended -= lr * g * torch.from_numpy(rng.rademacher(rng.step_seed(0, t), rng.param_key("0"), 0, n)).double()
    assert torch.equal(run(False), torch.zeros(n, dtype=torch.float64))
    moved = run(True)
    # Regress the realised movement on the intended one: unbiased rounding gives slope 1. The rounding
    # noise (about sqrt(steps * 0.2) ulp per weight) puts the slope's standard error near 0.05.
    slope = float((moved * intended).sum() / (intended * intended).sum())
    assert slope == pytest.approx(1.0, abs=0.25)


def test_nonfinite_loss_raises_and_restores(toy_model, regression_data):
    model = toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), lr=1e-2)
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 2 else mse_closure(model, *regression_data)()

    with pytest.raises(NonFiniteLossError, match=r"step 0: the loss at theta - eps\*z is nan"):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        assert torch.isfinite(p).all()
        # +eps z, -2 eps z, +eps z in float32: each rounds to <= 1 ulp of |theta| + 2 eps |z| < 2 (|theta| < 1.5).
        # Not undoing leaves eps |z| ~ 1e-3.
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=3 * ulp32(2.0))
    assert opt.step_count == 1 and opt.projected_grad is None


def test_nonfinite_loss_can_be_skipped(toy_model, regression_data):
    model = toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), lr=1e-2, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(lambda: torch.tensor(float("inf")))
    for p, q in zip(model.parameters(), before):  # the loss was inf at theta + eps z: one sweep on, one back
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=2 * ulp32(2.0))  # 1 ulp each (|theta| + eps |z| < 2)
    opt.step(mse_closure(model, *regression_data))  # and training goes on
    assert opt.step_count == 2 and math.isfinite(opt.projected_grad)


def test_exception_in_closure_undoes_the_perturbation(toy_model, regression_data):
    model = toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), lr=1e-2)

    def closure():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):  # +eps z and back: 1 ulp each (|theta| + eps |z| < 2)
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=2 * ulp32(2.0))


def test_fused_perturbation_is_flushed_for_evaluation_and_saving(toy_model, regression_data):
    x, y = regression_data
    fused, plain = toy_model(), toy_model()
    lr = 1e-2
    opt_f = MeZO(fused.named_parameters(), lr=lr, fuse_next=True)
    opt_p = MeZO(plain.named_parameters(), lr=lr)
    handles = opt_f.attach(fused)
    # The two runs differ by rounding only: the fused one reaches theta + eps z_{t+1} in the update sweep
    # and takes it off in the next step's sweeps or a flush. Its losses are taken at weights a few ulp
    # off, so they move by <= 20 ulp of L and g by <= 20 ulp(L) / eps (see test_losses_are_taken_at_plus_
    # and_minus_eps); the weights drift apart by lr |g_f - g_p| max|z| a step (the g gap seen) plus the
    # roundings of the sweeps (4 ulp of |theta| + 2 eps max|z|). Not flushing leaves eps z (~1e-3) in.
    w_tol = 0.0

    def step():
        nonlocal w_tol
        t = opt_p.step_count
        opt_f.step(mse_closure(fused, x, y))
        opt_p.step(mse_closure(plain, x, y))
        assert opt_f.projected_grad == pytest.approx(
            opt_p.projected_grad, rel=0, abs=20 * ulp32(max(map(abs, opt_p.last_losses))) / opt_p.eps
        )
        zmax = max(
            float(abs(rng.gaussian(rng.step_seed(0, t), rng.param_key(n), 0, p.numel())).max())
            for n, p in plain.named_parameters()
        )
        theta_max = max(float(p.detach().abs().max()) for p in plain.parameters())
        w_tol += lr * abs(opt_f.projected_grad - opt_p.projected_grad) * zmax + 4 * ulp32(theta_max + 2e-3 * zmax)

    for _ in range(5):
        step()
    # The fused weights carry +eps z of step 5 until something looks at them.
    z5 = torch.from_numpy(rng.gaussian(rng.step_seed(0, 5), rng.param_key("0.weight"), 0, fused[0].weight.numel()))
    assert float((fused[0].weight - plain[0].weight).detach().abs().max()) >= 1e-3 * float(z5.abs().max()) - w_tol
    with torch.no_grad():
        out = fused(x)  # the forward pre-hook flushes first
        assert opt_f._pending is None
        opt_f.flush()  # a no-op now: the same weights, the same forward, the same bits on any machine
        assert torch.equal(out, fused(x))
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=w_tol)
    step()
    saved = fused.state_dict()  # the state-dict hook flushes too
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=w_tol)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_and_reference_paths_agree_in_low_precision(dtype):
    pytest.importorskip("numba")
    from zotune.optim import functional as F

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3 * 2**15 + 5, generator=gen).to(dtype)
    results = {}
    for backend in ("reference", "numba"):
        p = start.clone()
        # Rademacher z and the rounding words are exact in both backends, so the results are bitwise equal.
        F.sweep_(
            [p],
            [7],
            [(11, 3e-4), (12, -1e-4)],
            scale=0.999,
            distribution="rademacher",
            rounding_seed=13,
            backend=backend,
        )
        results[backend] = p
    assert torch.equal(results["reference"], results["numba"])
    assert not torch.equal(results["numba"], start)
