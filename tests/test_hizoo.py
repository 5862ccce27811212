"""HiZOO: step by step against the explicit reference, replay and resume bit for bit, its memory and its config."""

import pytest
import torch
from conftest import mse_closure, ulp32

from zotune import HiZOO, MeZO, replay
from zotune.config import ConfigError, OptimConfig
from zotune.optim import make_optimizer
from zotune.optim.reference import ReferenceHiZOO
from zotune.trajectory import Extras, MultiStep, Skip, Step, read_trajectory

LR, EPS, ALPHA = 1e-2, 1e-2, 3e-3  # s grows from 1 to ~1.8 in six steps, stably; eps 1e-2 keeps kappa's float32 noise
# (80 ulp of L over 2 eps^2) at 1e-4 of its size


def _gap(model, ref_model):
    return max(
        float((p.detach().double() - q.detach().double()).abs().max())
        for p, q in zip(model.parameters(), ref_model.parameters())
    )


def test_matches_the_explicit_reference_step_by_step(toy_model, regression_data):
    model, ref_model, wrong_model = toy_model(), toy_model(), toy_model()
    opt = HiZOO(model.named_parameters(), lr=LR, eps=EPS, alpha=ALPHA, seed=4)
    ref = ReferenceHiZOO(list(ref_model.named_parameters()), lr=LR, eps=EPS, alpha=ALPHA, seed=4)
    wrong = ReferenceHiZOO(
        list(wrong_model.named_parameters()), lr=LR, eps=EPS, alpha=ALPHA, seed=4, update_with_old_s=True
    )
    w_tol, d2 = 0.0, [torch.zeros_like(s) for s in ref.s]  # d2: elementwise bound on the gap of s^2
    for _ in range(6):
        s_before = [s.clone() for s in ref.s]
        opt.step(mse_closure(model, *regression_data))
        ref.step(mse_closure(ref_model, *regression_data))
        wrong.step(mse_closure(wrong_model, *regression_data))
        # The losses are taken at weights a few ulp off the reference's: each within 20 ulp of L (test_variants),
        # so c = (l+ - l-)/2eps within 20 ulp / eps and kappa = |l+ + l- - 2 l0| / 2eps^2 within 80 ulp / 2eps^2.
        u = ulp32(max(map(abs, opt.last_losses)))
        dc, dkappa = 20 * u / EPS, 80 * u / (2 * EPS**2)
        assert opt.projected_grads[0] == pytest.approx(ref.projected_grads[0], rel=0, abs=dc)
        assert opt.last_extras[0] == pytest.approx(ref.kappa, rel=0, abs=dkappa + 2**-24 * ref.kappa)
        # s^2 <- (1 - a) s^2 + a kappa z^2 / s^2, elementwise: the old gap passes with the derivative's size
        # |1 - a - a kappa z^2 / s^4|, kappa's gap adds a dkappa z^2 / s^2, and float32 rounds three operations and
        # the square root (4 ulp of s^2).
        ds = 0.0
        for i, (s_new, s_old, z) in enumerate(zip(ref.s, s_before, ref.last_z)):
            slope = (1 - ALPHA - ALPHA * ref.kappa * z * z / s_old**4).abs()
            d2[i] = slope * d2[i] + ALPHA * dkappa * z * z / s_old**2 + 4 * 2**-24 * s_new**2
            gap = (opt.rule.m[i].double() - s_new).abs()
            assert bool((gap <= d2[i] / (2 * s_new) + 2**-24 * s_new).all())
            ds = max(ds, float(gap.max()))
        # theta' = (theta + eps s z) - lr c s' z: the gap widens by lr (|dc| s' + |c| ds') |z|, and by the roundings of
        # the probe sweeps and the update (4 sweeps, 1 ulp each of |theta| + eps s |z|).
        zmax = max(float(z.abs().max()) for z in ref.last_z)
        smax = max(float(s.max()) for s in ref.s)
        theta_max = max(float(p.detach().abs().max()) for p in ref_model.parameters())
        w_tol += LR * (dc * smax + abs(ref.projected_grads[0]) * ds) * zmax + 4 * ulp32(theta_max + EPS * smax * zmax)
        assert _gap(model, ref_model) <= w_tol
    assert max(float(s.max()) for s in ref.s) > 1.5  # s did move
    assert _gap(wrong_model, ref_model) > 10 * w_tol  # the update along the probes' s is caught


def test_three_closure_calls_a_step_and_the_curvature_is_recorded(tmp_path, toy_model, regression_data):
    model = toy_model()
    calls = []
    base = mse_closure(model, *regression_data)

    def closure():
        calls.append(1)
        return base()

    opt = HiZOO(model.named_parameters(), lr=LR, alpha=ALPHA, trajectory=tmp_path / "h.zot")
    for _ in range(3):
        opt.step(closure)
    assert len(calls) == 9 == opt.forward_passes
    traj = read_trajectory(tmp_path / "h.zot")
    assert traj.header["estimator"] == "hizoo" and traj.header["variant"] == {"name": "hizoo", "alpha": ALPHA}
    kinds = [type(r) for r in traj.records[1:]]
    assert kinds == [Extras, Step] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_rebuilds_the_weights_bit_for_bit(tmp_path, toy_model, regression_data, dtype):
    model = toy_model(dtype=dtype)
    path = tmp_path / "h.zot"
    opt = HiZOO(
        model.named_parameters(),
        lr=LR / 4,
        eps=EPS,
        alpha=ALPHA,
        weight_decay=0.1,
        trajectory=path,
        stochastic_rounding=dtype == torch.bfloat16,
        on_nonfinite="skip",
    )
    data = regression_data
    for t in range(8):
        if t == 3:
            with pytest.warns(RuntimeWarning):
                opt.step(lambda: torch.tensor(float("nan")))
        else:
            opt.step(mse_closure(model, *data))
    base = toy_model(dtype=dtype)
    replay(base, path)
    for (name, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("saved_s", [True, False])
def test_resume_continues_bit_for_bit(tmp_path, toy_model, regression_data, saved_s):
    data = regression_data
    straight = toy_model()
    opt = HiZOO(straight.named_parameters(), lr=LR, alpha=ALPHA, trajectory=tmp_path / "a.zot")
    for _ in range(6):
        opt.step(mse_closure(straight, *data))

    first = toy_model()
    opt1 = HiZOO(first.named_parameters(), lr=LR, alpha=ALPHA, trajectory=tmp_path / "b.zot")
    for _ in range(3):
        opt1.step(mse_closure(first, *data))
    state, moments = opt1.state_dict(), opt1.moment_tensors()
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    assert set(moments) == {f"m.{i}" for i in range(len(list(first.parameters())))}

    resumed = toy_model()
    resumed.load_state_dict(weights)
    opt2 = HiZOO(resumed.named_parameters(), lr=LR, alpha=ALPHA, trajectory=tmp_path / "b.zot")
    opt2.load_state_dict(state, moments=moments if saved_s else None)  # without them: s rebuilt from the file
    for _ in range(3):
        opt2.step(mse_closure(resumed, *data))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_it_keeps_one_float32_tensor_per_parameter_and_nothing_else(toy_model, regression_data):
    model = toy_model()
    opt = HiZOO(model.named_parameters(), lr=LR, alpha=ALPHA)
    opt.step(mse_closure(model, *regression_data))
    params = list(model.parameters())
    assert [tuple(s.shape) for s in opt.rule.m.values()] == [tuple(p.shape) for p in params]
    assert all(s.dtype == torch.float32 for s in opt.rule.m.values()) and not opt.rule.v
    assert not opt.state  # no torch optimizer state besides


def test_alpha_zero_is_mezo_with_an_unperturbed_loss_first(toy_model, regression_data):
    """With s fixed at 1, the update is MeZO's (theta - lr c z) along the same z, c from the same two probes."""
    a, b = toy_model(), toy_model()
    hizoo = HiZOO(a.named_parameters(), lr=LR, eps=EPS, alpha=0.0, seed=2)
    mezo = MeZO(b.named_parameters(), lr=LR, eps=EPS, seed=2)
    for _ in range(4):
        hizoo.step(mse_closure(a, *regression_data))
        mezo.step(mse_closure(b, *regression_data))
        # the probes reach the same points through other float32 operations (addcmul by s = 1 against the fused
        # axpy), within 20 ulp of L each (test_variants)
        u = ulp32(max(map(abs, mezo.last_losses)))
        assert hizoo.projected_grads[0] == pytest.approx(mezo.projected_grads[0], rel=0, abs=20 * u / EPS)
    assert all(float(s.max()) == float(s.min()) == 1.0 for s in hizoo.rule.m.values())
    # four steps of lr |dc| |z| (|z| < 5 here) and 4 sweeps' roundings each
    assert _gap(a, b) <= 4 * (LR * 20 * u / EPS * 5 + 4 * ulp32(2.0))


def test_bad_options_and_configs_are_refused(toy_model):
    params = list(toy_model().named_parameters())
    with pytest.raises(ValueError, match="its own per-element scale"):
        HiZOO(params, lr=LR, distribution="sphere")
    with pytest.raises(ValueError, match="alpha"):
        HiZOO(params, lr=LR, alpha=2.0)
    with pytest.raises(TypeError, match="n_perturbations"):
        HiZOO(params, lr=LR, n_perturbations=2)
    with pytest.raises(ValueError, match="do not go together"):
        MeZO(params, lr=LR, estimator="hizoo")
    assert OptimConfig(estimator="hizoo").variant == "hizoo"
    with pytest.raises(ConfigError, match="does not go with"):
        OptimConfig(estimator="hizoo", variant="adam")
    with pytest.raises(ConfigError, match="does not go with"):
        OptimConfig(variant="hizoo")
    with pytest.raises(ConfigError, match="from 1 to 1"):
        OptimConfig(estimator="hizoo", n_perturbations=2)
    opt = make_optimizer(params, OptimConfig(estimator="hizoo", hizoo_alpha=1e-7))
    assert isinstance(opt, HiZOO) and opt.rule.alpha == 1e-7 and not opt.fuse_next


@pytest.mark.parametrize(
    "tuning, method",
    [
        ("lora", ["--estimator", "hizoo"]),
        ("prefix", ["--estimator", "fzoo", "--n_perturbations", "2"]),
        ("head", ["--distribution", "lowrank"]),
        ("prefix", ["--estimator", "kerzoo"]),
        ("lora", ["--optimizer.sparsity", "0.5"]),
        ("lora", ["--optimizer.variant", "muon", "--n_perturbations", "2"]),
    ],
)
def test_the_new_methods_train_lora_prefix_and_head_and_replay(model_dir, tmp_path, tuning, method):
    """Each tuning mode's trainable set under a new method: a run, and `zotune replay` of its trajectory."""
    from zotune.cli import main

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
        "12",
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
        "--output_dir",
        str(out),
        *method,
    ]
    assert main(args) == 0
    traj = read_trajectory(out / "trajectory.zot")
    assert (
        sum(isinstance(r, (Step, MultiStep)) for r in traj.records) + sum(isinstance(r, Skip) for r in traj.records)
        == 3
    )
    assert (
        main(
            [
                "replay",
                "--base",
                str(model_dir),
                "--config",
                str(out / "config.yaml"),
                "--trajectory",
                str(out / "trajectory.zot"),
                "--out",
                str(tmp_path / "replayed"),
            ]
        )
        == 0
    )
