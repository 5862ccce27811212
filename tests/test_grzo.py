"""GRZO: per-example directions by forward hooks, against explicit per-example weights; its step, replay, errors."""

import copy
import json
import warnings

import numpy as np
import pytest
import tiny
import torch

from zotune import GRZO, MeZO, NonFiniteLossError, replay, rng
from zotune.cli import main
from zotune.config import ConfigError, OptimConfig, RunConfig, TrainConfig
from zotune.optim import estimators, make_optimizer
from zotune.optim.grzo import linear_targets
from zotune.trajectory import MultiStep, Skip, read_trajectory

EPS = float(np.float32(1e-3))


_model, _X, _Y = tiny.mlp, tiny.MLP_X, tiny.MLP_Y


def _losses(model, x=_X, y=_Y):
    return lambda: torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def _mask(w: torch.Tensor, sparsity: float) -> np.ndarray:
    """Sparse-MeZO's mask of a small matrix, from its definition: |w| <= its ceil((1 - sparsity) n)-th smallest
    magnitude (every element is sampled below 2^16)."""
    a = np.abs(w.detach().float().numpy())
    return a <= np.sort(a, axis=None)[int(np.ceil((1 - sparsity) * a.size)) - 1]


def _delta(name, shape, step_seed, rows, mask=None):
    """The rows' directions of one tensor from the reference generator (float64): U (.) r_i s_i^T on a matrix
    (U masked by ``mask``: Sparse-GRZO), r_i on a vector (a norm's weight or bias)."""
    key = rng.param_key(name)
    r = rng.z("rademacher", rng.step_seed(step_seed, 0, 1), key, 0, rows * shape[0]).reshape(rows, shape[0])
    if len(shape) == 1:
        return [r[i].astype(np.float64) for i in range(rows)]
    d_out, d_in = shape
    u = rng.z("gaussian", step_seed, key, 0, d_out * d_in).reshape(d_out, d_in).astype(np.float64)
    if mask is not None:
        u = u * mask
    s = rng.z("rademacher", rng.step_seed(step_seed, 0, 2), key, 0, rows * d_in).reshape(rows, d_in)
    return [u * np.outer(r[i], s[i]) for i in range(rows)]


def _explicit_losses(model, opt, step_seed, sign, example_loss, n, sparsity=0.0):
    """Each example's loss with its own weights theta + sign eps Delta_i on every tensor GRZO trains."""
    table = {e["name"]: tuple(e["shape"]) for e in opt._table}
    params = dict(model.named_parameters())
    masks = {k: _mask(params[k], sparsity) if sparsity and len(v) == 2 else None for k, v in table.items()}
    deltas = {name: _delta(name, shape, step_seed, n, masks[name]) for name, shape in table.items()}
    out = []
    for i in range(n):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in probe.named_parameters():
                if name in deltas:
                    p.copy_(torch.from_numpy(p.double().numpy() + sign * EPS * deltas[name][i]).float())
            value = example_loss(probe, i)
            out.append(float(value) if value.dim() == 0 else value.numpy())
    return out if isinstance(out[0], np.ndarray) else np.array(out)


class _Seen:
    """A closure that keeps what it returned."""

    def __init__(self, fn):
        self.fn, self.values = fn, []

    def __call__(self):
        v = self.fn()
        self.values.append(v.detach().double().numpy().copy())
        return v


def _normed(seed=0):
    """A model with a LayerNorm (weight and bias) between its Linear layers."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model


@pytest.mark.parametrize("sparsity", [0.0, 0.75])
@pytest.mark.parametrize("build", [_model, _normed])
def test_the_hooks_perturb_each_example_along_its_own_direction(build, sparsity):
    model = build()
    opt = GRZO(model, lr=1e-3, seed=7, sparsity=sparsity)
    closure = _Seen(_losses(model))
    opt.step(closure)
    seed = rng.step_seed(7, 0)

    def example(m, i):
        return torch.nn.functional.cross_entropy(m(_X[i : i + 1]), _Y[i : i + 1])

    # (W + c Delta_i) x against W x + c r_i (U (s_i x)): float32 sums in another order, losses near 1
    for k, sign in enumerate((1.0, -1.0)):
        np.testing.assert_allclose(
            closure.values[k], _explicit_losses(build(), opt, seed, sign, example, 10, sparsity), rtol=1e-5
        )
    # the examples really move apart: each one's own direction, not one shared by the batch
    assert not np.allclose(closure.values[0] - closure.values[1], (closure.values[0] - closure.values[1])[0])


def test_a_hugging_face_llama_is_perturbed_per_example_in_its_linear_and_rmsnorm_layers():

    model = tiny.causal_lm("llama")
    ids = torch.tensor([[5, 9, 12, 7], [3, 8, 8, 2], [11, 4, 6, 10]])
    seen = []

    def closure():  # keeps the last position's logits; returns a per-example value
        logits = model(input_ids=ids).logits[:, -1]
        seen.append(logits.detach().clone())
        return logits.logsumexp(-1)

    opt = GRZO(model, lr=0.0, seed=2)
    names = [e["name"] for e in opt._table]
    assert any("layernorm" in n for n in names) and any(n.endswith("q_proj.weight") for n in names)
    opt.step(closure)
    reference = copy.deepcopy(model)
    GRZO(reference, lr=0.0, seed=2).remove_hooks()
    explicit = _explicit_losses(
        reference, opt, rng.step_seed(2, 0), 1.0, lambda m, i: m(input_ids=ids[i : i + 1]).logits[0, -1], 3
    )
    # the same float32 forward with the weights moved by 1e-3 either way, sums in another order: a few ulps of
    # logits below 1 (the norms' part alone moves them by ~1e-4, which this tolerance sees)
    np.testing.assert_allclose(seen[0].numpy(), np.stack(explicit), rtol=0, atol=2e-6)


@pytest.mark.parametrize("sparsity", [0.0, 0.75])
@pytest.mark.parametrize("build", [_model, _normed])
def test_the_update_is_the_group_relative_sum_of_the_rows_directions(build, sparsity):
    model = build()
    before = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    masks = {n: _mask(p, sparsity) for n, p in model.named_parameters() if sparsity and p.dim() == 2}
    lr = 1e-3
    opt = GRZO(model, lr=lr, seed=3, sparsity=sparsity)
    closure = _Seen(_losses(model))
    opt.step(closure)
    plus, minus = closure.values
    delta = (plus - minus) / 2
    a = delta / (delta.std(ddof=1) + 1e-8)
    c = a / (2 * EPS * len(a))
    np.testing.assert_allclose(opt.projected_grads, c, rtol=1e-6)  # float32-rounded coefficients
    seed = rng.step_seed(3, 0)
    trained = {e["name"] for e in opt._table}
    assert trained == {n for n, p in model.named_parameters() if p.dim() == 2 or n.startswith("1.")}  # + the norm
    for name, p in model.named_parameters():
        if name not in trained:
            assert np.array_equal(p.detach().double().numpy(), before[name])  # a Linear's bias stays
            continue
        deltas = _delta(name, p.shape, seed, len(c), masks.get(name))
        expected = before[name] - lr * sum(ci * d for ci, d in zip(opt.projected_grads, deltas))
        # one float32 rounding of weights below 2, the update summed in float32 (rows x d terms): 1e-6
        np.testing.assert_allclose(p.detach().double().numpy(), expected, rtol=0, atol=1e-6)
        if name in masks:  # Sparse-GRZO: the quarter of smallest magnitudes moved, the rest kept every bit
            now = p.detach().double().numpy()
            assert np.array_equal(now[~masks[name]], before[name][~masks[name]])
            assert (now[masks[name]] != before[name][masks[name]]).all()
            assert masks[name].sum() == int(np.ceil(0.25 * masks[name].size))


def test_weight_decay_scales_the_matrices_in_the_update_and_spares_the_norms():
    model = _normed()
    before = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    lr, wd = 1e-3, 0.5
    opt = GRZO(model, lr=lr, seed=3, weight_decay=wd)
    opt.step(_losses(model))
    seed = rng.step_seed(3, 0)
    for name, p in model.named_parameters():
        if name.endswith("bias") and not name.startswith("1."):
            continue  # a Linear's bias: not trained
        decay = 1 - lr * wd if p.dim() == 2 else 1.0  # matrices only (a flat parameter list)
        moved = sum(c * d for c, d in zip(opt.projected_grads, _delta(name, p.shape, seed, len(_Y))))
        # as the update test: one float32 rounding of weights below 2, the update summed in float32
        np.testing.assert_allclose(p.detach().double().numpy(), decay * before[name] - lr * moved, rtol=0, atol=1e-6)


def test_row_coefficients_share_a_questions_advantage_across_its_options():
    est = estimators.get("grzo")
    plus, minus, rows = [1.2, 0.7, 0.9], [1.0, 0.9, 0.8], [2, 2, 1]
    c = est.row_coefficients(plus, minus, rows, 0.001)
    delta = np.array([0.1, -0.1, 0.05])
    a = delta / (delta.std(ddof=1) + 1e-8) / (2 * 0.001 * 3)
    # the coefficients are rounded to float32 (2^-24 = 6e-8 relative) from float64 arithmetic; the differences of
    # these float64 losses are exact to ~1e-16: 1e-6 is rounding, and an off-by-one count (B, ddof) is off by >= 20%
    np.testing.assert_allclose(c, np.repeat(a, rows), rtol=1e-6)
    assert all(not np.isfinite(x) for x in est.row_coefficients([1.0], [0.5], [1], 0.001))  # one example: no spread
    raw = estimators.get("grzo-raw").row_coefficients(plus, minus, rows, 0.001)  # the differences, not normalised
    np.testing.assert_allclose(raw, np.repeat(delta / (2 * 0.001 * 3), rows), rtol=1e-6)
    assert estimators.get("grzo-raw").row_coefficients([1.0], [0.5], [1], 0.001) == [125.0]  # one example: fine


def test_grzo_raw_steps_by_the_raw_differences_and_is_built_from_the_config():
    model = _model()
    opt = GRZO(model, lr=1e-3, seed=3, normalise=False)
    closure = _Seen(_losses(model))
    opt.step(closure)
    plus, minus = closure.values
    # float32 coefficients from the float32 per-example losses the closure gave: rounding (6e-8) twice, at most
    np.testing.assert_allclose(opt.projected_grads, (plus - minus) / 2 / (2 * EPS * len(plus)), rtol=1e-6)
    assert opt._variant_header()["estimator"] == "grzo-raw"
    oc = OptimConfig(estimator="grzo-raw", sparsity=0.75)
    assert oc.variant == "grzo"
    built = make_optimizer(_model().named_parameters(), oc, model=_model())
    assert isinstance(built, GRZO) and built.estimator == "grzo-raw" and built.rule.sparsity == 0.75


@pytest.mark.parametrize("options", [{}, {"sparsity": 0.75, "weight_decay": 0.1}, {"normalise": False}])
def test_a_grzo_run_replays_and_resumes_bit_for_bit(tmp_path, options):
    model = _model()
    base = copy.deepcopy(model)
    path = tmp_path / "grzo.zot"
    opt = GRZO(model, lr=1e-3, seed=5, trajectory=path, on_nonfinite="skip", **options)
    for t in range(6):
        closure = _losses(model)
        if t == 2:  # a NaN in the second pass: skipped, nothing moves
            calls = []

            def closure(inner=closure, calls=calls):
                calls.append(1)
                v = inner()
                return v if len(calls) == 1 else v * float("nan")

            before = [p.detach().clone() for p in model.parameters()]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step(closure)
            assert opt.last_step_skipped
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            continue
        opt.step(closure)
        if t == 3:
            state, snapshot = opt.state_dict(), copy.deepcopy(model)
    traj = read_trajectory(path)
    sparse = {"sparsity": 0.75} if "sparsity" in options else {}  # recorded where set: earlier files stay as they were
    assert traj.header["variant"] == {"name": "grzo", **sparse}
    assert traj.header["estimator"] == ("grzo-raw" if "normalise" in options else "grzo")
    assert [type(r) for r in traj.records[1:]] == [MultiStep] * 2 + [Skip] + [MultiStep] * 3
    assert all(len(r.projected_grads) == len(_Y) for r in traj.steps)
    replayed = copy.deepcopy(base)
    replay(replayed, path)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), replayed.parameters()))
    # a resume from the state after step 3 continues as the run did
    again = GRZO(snapshot, lr=1e-3, seed=5, **options)
    again.load_state_dict(state)
    for _ in range(2):
        again.step(_losses(snapshot))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snapshot.parameters()))


def test_slices_of_the_batch_take_the_rows_in_order():
    """A closure that runs the batch in consecutive slices gives each example the same direction as one forward."""
    values = []
    for sliced in (False, True):
        model = _model()
        opt = GRZO(model, lr=1e-3, seed=9)

        def sliced_closure(model=model):
            return torch.cat([_losses(model, _X[a:b], _Y[a:b])() for a, b in ((0, 3), (3, 4), (4, 10))])

        closure = sliced_closure if sliced else _losses(model)
        seen = _Seen(closure)
        opt.step(seen)
        values.append((seen.values, np.array(opt.projected_grads), [p.detach().clone() for p in model.parameters()]))
    (one, c1, w1), (sliced, c2, w2) = values
    # the same rows at the same points; the forward's sums over other batch shapes: a few ulps of losses near 1
    np.testing.assert_allclose(np.array(one), np.array(sliced), rtol=1e-6)
    # the coefficients divide loss differences of ~1e-2 by their spread: those ulps move them by ~1e-4 relative,
    # and each weight by at most lr sum_i |dc_i| |U| (|U| < 5 on these 72 Gaussian elements)
    np.testing.assert_allclose(c1, c2, rtol=1e-3)
    bound = 1e-3 * float(np.abs(c1 - c2).sum()) * 5 + 1e-6
    assert all(float((a - b).abs().max()) <= bound for a, b in zip(w1, w2))


def test_outside_a_step_the_model_runs_unperturbed():
    model = _model()
    reference = copy.deepcopy(model)
    GRZO(model, lr=0.0)
    assert torch.equal(model(_X), reference(_X))


def test_bad_uses_are_clear_errors():
    model = _model()
    opt = GRZO(model, lr=1e-3, on_nonfinite="raise")
    with pytest.raises(ValueError, match="different numbers of rows"):  # the first layer run twice a forward
        opt.step(
            lambda: torch.nn.functional.cross_entropy(
                model[2](model[1](model[0](_X) + model[0](_X))), _Y, reduction="none"
            )
        )
    with pytest.raises(ValueError, match="one loss per example"):
        opt.step(lambda: _losses(model)().mean())
    with pytest.raises(ValueError, match="rows="):
        opt.step(_losses(model), rows=[2] * 10)
    with pytest.raises(NonFiniteLossError):
        opt.step(lambda: _losses(model)() * float("inf"))
    with pytest.raises(ValueError, match="Invalid sparsity"):
        GRZO(_model(), lr=1e-3, sparsity=1.0)
    with pytest.raises(ValueError, match="no trainable nn.Linear"):
        GRZO(torch.nn.Sequential(torch.nn.Tanh()), lr=1e-3)
    with pytest.raises(ValueError, match="zotune.GRZO"):
        MeZO(model.parameters(), lr=1e-3, estimator="grzo")
    with pytest.raises(ValueError, match="did not run"):
        unused = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 3), "b": torch.nn.Linear(6, 3)})
        GRZO(unused, lr=1e-3).step(lambda: torch.nn.functional.cross_entropy(unused["a"](_X), _Y, reduction="none"))
    with pytest.raises(ConfigError, match="distribution gaussian"):
        OptimConfig(estimator="grzo", distribution="rademacher")
    with pytest.raises(ConfigError, match="train.objective 'loss'"):
        RunConfig(optimizer=OptimConfig(estimator="grzo"), train=TrainConfig(objective="accuracy"))
    with pytest.raises(ValueError, match="model="):
        make_optimizer(model.named_parameters(), OptimConfig(estimator="grzo"))


def test_the_output_head_and_tied_weights_are_not_trained():

    model = tiny.causal_lm("llama")
    names = [n for n, _ in linear_targets(model)]
    assert names and not any("lm_head" in n or "embed" in n for n in names)
    assert {n.split(".")[-1] for n in names} >= {"q_proj", "down_proj", "input_layernorm", "norm"}


@pytest.mark.parametrize(
    "task, tuning, sparsity",
    [("sst2", "full", 0.0), ("copa", "full", 0.0), ("sst2", "lora", 0.0), ("sst2", "full", 0.75)],
)
def test_the_training_loop_runs_grzo_and_eval_reproduces_it(model_dir, tmp_path, capsys, task, tuning, sparsity):
    """Classification and multiple choice (a question's options are rows that share its advantage), LoRA
    (its adapters' lora_A / lora_B are Linear layers), and Sparse-GRZO."""
    from test_train import SHARED_DATA

    if task != "sst2" and not SHARED_DATA.is_dir():
        pytest.skip("the project's shared/data folder is not beside the checkout")
    out = tmp_path / "run"
    args = ["train", "--model.name", str(model_dir), "--task.name", task, "--model.tuning", tuning]
    args += ["--steps", "3", "--eval_every", "3"]
    args += ["--train", "24", "--validation", "8", "--test", "8", "--batch_size", "4", "--lr", "1e-3"]
    args += ["--progress", "false", "--save_best", "false", "--output_dir", str(out), "--optimizer.estimator", "grzo"]
    args += [] if task == "sst2" else ["--data_dir", str(SHARED_DATA)]
    args += ["--optimizer.sparsity", str(sparsity)] if sparsity else []
    assert main(args) == 0
    traj = read_trajectory(out / "trajectory.zot")
    assert traj.header["variant"] == {"name": "grzo", **({"sparsity": sparsity} if sparsity else {})}
    rows = 4 if task == "sst2" else 8  # COPA: two options a question
    assert [len(r.projected_grads) for r in traj.steps] == [rows] * 3
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--config", str(out / "config.yaml"), "--trajectory", str(out / "trajectory.zot")]) == 0
    assert f"accuracy {100 * summary['test']['accuracy']:.2f}" in capsys.readouterr().out


@pytest.mark.parametrize("sparsity", [0.0, 0.75])
def test_grzo_holds_one_layers_worth_of_extra_memory_not_the_models(sparsity):
    """U and the update's d_out x d_in matrix (and Sparse-GRZO's mask) exist for one layer at a time. After steps
    on a 2-layer model of 4 MB layers (JIT compilation, chunk buffers, allocator pools), steps on a 16-layer one
    (64 MB, built before the measurement) grow the peak by a few layers' worth at most (< 24 MB), never by the
    model's 64 MB (nor by its masks', 16 MB as bytes)."""
    from memory import rss_growth_mb

    setup = f"""
        import torch, zotune
        torch.manual_seed(0)
        x = torch.randn(4, 1024)
        def steps(layers, n):
            model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(layers)])
            opt = zotune.GRZO(model, lr=1e-9, sparsity={sparsity!r})
            return model, opt, lambda: [opt.step(lambda: model(x).pow(2).mean(-1)) for _ in range(n)]
        steps(2, 2)[2]()  # warm-up
        model, opt, run = steps(16, 2)
    """
    growth_mb = rss_growth_mb(setup, "run()")
    assert growth_mb < 24, f"peak memory grew by {growth_mb} MB during GRZO steps on a 64 MB model"


def _bf16_model():
    """A bf16 MLP with a LayerNorm, every trained value 1.5 (a bf16 ulp of 2^-7 there)."""
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).to(torch.bfloat16)
    with torch.no_grad():
        for m in (model[0], model[1], model[3]):
            m.weight.fill_(1.5)
        model[1].bias.fill_(1.5)
    return model


def test_stochastic_rounding_moves_bf16_weights_by_updates_below_half_an_ulp(tmp_path):
    """GRZO's update of bf16 weights: rounded to nearest, updates under half an ulp vanish; rounded stochastically
    they move some weights by an ulp (as often as the update's fraction of one, on average), and replay repeats it."""
    x = _X.to(torch.bfloat16)
    runs = {}
    for stochastic in (False, True):
        model = _bf16_model()
        path = tmp_path / f"sr{int(stochastic)}.zot"
        # lr 2e-6: |lr c U (R^T S)| stays under half of 2^-7 here (nearest rounding keeps every weight: asserted)
        opt = GRZO(model, lr=2e-6, seed=3, stochastic_rounding=stochastic, trajectory=path)
        for _ in range(5):
            opt.step(lambda m=model: torch.nn.functional.cross_entropy(m(x).float(), _Y, reduction="none"))
        opt.flush()
        runs[stochastic] = (model, path)
    trained = lambda m: [m[0].weight, m[1].weight, m[1].bias, m[3].weight]  # noqa: E731
    assert all(bool((p == 1.5).all()) for p in trained(runs[False][0]))
    moved = torch.cat([(p.float() - 1.5).flatten() for p in trained(runs[True][0])])
    assert int((moved != 0).sum()) >= 3  # 9 of the 88 trained values seen
    ulp = 2.0**-7
    assert bool(((moved / ulp).round() * ulp == moved).all())  # whole ulps: each update rounded to a neighbour
    header = read_trajectory(runs[True][1]).header
    assert header["stochastic_rounding"] is True
    replayed = _bf16_model()
    replay(replayed, runs[True][1])
    assert all(torch.equal(p, q) for p, q in zip(trained(replayed), trained(runs[True][0])))


@pytest.mark.parametrize("estimator", ["two-sided", "grzo"])
def test_the_config_rounds_half_precision_weights_stochastically_unless_told_not_to(estimator):
    for dtype, setting, expected in (
        (torch.float32, None, False),
        (torch.bfloat16, None, True),
        (torch.float16, None, True),
        (torch.bfloat16, False, False),
        (torch.float32, True, True),
    ):
        model = _model().to(dtype)
        oc = OptimConfig(estimator=estimator, stochastic_rounding=setting)
        opt = make_optimizer(model.named_parameters(), oc, model=model)
        assert opt.stochastic_rounding is expected, (dtype, setting)
