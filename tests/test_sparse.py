"""Sparse-MeZO (arXiv 2402.15751): the magnitude mask, a step against an explicit reference, replay, resume,
memory and what it refuses."""

import math

import numpy as np
import pytest
import torch
from conftest import (
    assert_interrupt_restores,
    assert_resume_matches,
    fused_addcmul,
    mse_closure,
    steps_with_a_skip,
    ulp32,
)

from zotune import MeZO, MeZOAdam, MeZOMomentum, kernels, replay, rng
from zotune.config import ConfigError, OptimConfig
from zotune.optim import chunks, functional, make_optimizer, masked


def _explicit_mask(p: torch.Tensor, sparsity: float) -> np.ndarray:
    """The mask by its definition, in numpy: |theta| <= the ceil((1 - s) k)-th smallest of k strided magnitudes."""
    a = np.abs(p.detach().float().numpy().ravel())
    sample = np.sort(a[:: max(1, a.size // functional.MASK_SAMPLE)])
    h = sample[min(sample.size, max(1, math.ceil((1 - sparsity) * sample.size))) - 1]
    return (a <= h).reshape(p.shape)


def _unpacked(bits, p):
    return masked.unpack_mask(bits, 0, p.numel()).view(p.shape).bool().numpy()


@pytest.mark.parametrize("shape, sparsity", [((37, 23), 0.75), ((300, 501), 0.5), ((3, 5), 0.9), ((8, 8), 0.0)])
def test_the_mask_is_the_magnitudes_under_the_sampled_quantile(shape, sparsity):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=gen)
    bits = functional.magnitude_mask(p, sparsity)
    assert bits.dtype == torch.uint8 and bits.numel() == (p.numel() + 7) // 8  # one bit a parameter
    mask = _unpacked(bits, p)
    assert np.array_equal(mask, _explicit_mask(p, sparsity))
    if p.numel() <= functional.MASK_SAMPLE:  # every element sampled, no ties: exactly ceil((1 - s) n) of them
        assert mask.sum() == max(1, math.ceil((1 - sparsity) * p.numel()))
    else:  # 150,300 elements sampled at stride 2: the quantile of the sample, within 1% of the whole's
        assert abs(mask.mean() - (1 - sparsity)) < 0.01
    # the torch path (the reference backend) and its chunking do not change it, tails inside a byte included
    assert torch.equal(functional.magnitude_mask(p, sparsity, chunk=64, backend="reference"), bits)


def test_the_mask_of_a_bfloat16_tensor_and_of_ties():
    p = torch.tensor([[0.0, 0.0, 1.0, -1.0], [2.0, -2.0, 0.5, 0.25]], dtype=torch.bfloat16)
    mask = _unpacked(functional.magnitude_mask(p, 0.5), p)
    assert np.array_equal(mask, _explicit_mask(p, 0.5))  # h = 0.5 (the 4th smallest): 0, 0, 0.25, 0.5
    assert mask.sum() == 4


def test_a_step_moves_only_the_masked_elements_along_m_z(toy_model, regression_data):
    """Explicit reference in float64: g from the losses at theta +- eps m z, then theta - lr g m z; the elements
    outside the mask keep their bits, and the vectors (biases, norms) move as in MeZO."""
    model, ref = toy_model(), toy_model()
    x, y = regression_data
    opt = MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, seed=2, sparsity=0.6)
    for t in range(3):
        seed = rng.step_seed(2, t)
        masks, zs = {}, {}
        for n, p in ref.named_parameters():
            z = rng.gaussian(seed, rng.param_key(n), 0, p.numel()).astype(np.float64).reshape(p.shape)
            masks[n] = _explicit_mask(p, 0.6) if p.dim() >= 2 else np.ones(p.shape, dtype=bool)
            zs[n] = torch.from_numpy(z * masks[n])

        def loss_at(sign):
            with torch.no_grad():
                moved = toy_model()
                for (n, q), (_, p) in zip(moved.named_parameters(), ref.named_parameters()):
                    q.copy_(p.double() + sign * 1e-2 * zs[n])
                return float(mse_closure(moved, x, y)())

        g = (loss_at(1) - loss_at(-1)) / 2e-2
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step(mse_closure(model, x, y))
        # float32 losses at float32-rounded weights: a few ulp of the loss over 2 eps
        assert opt.projected_grad == pytest.approx(g, abs=8 * ulp32(loss_at(1)) / 2e-2)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(p.double() - 1e-2 * opt.projected_grad * zs[n])
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            still = ~masks[n]
            assert torch.equal(p.detach()[torch.from_numpy(still)], before[n][torch.from_numpy(still)]), n
            # float32: three sweeps and the update each round once, by <= half an ulp of |theta| + eps |z|
            bound = 4 * ulp32(float(q.detach().abs().max()) + 1e-2 * 6)
            torch.testing.assert_close(p.detach(), q.detach().float(), rtol=0, atol=bound * (t + 1))
        assert 0.3 < np.mean([masks[n].mean() for n, p in ref.named_parameters() if p.dim() >= 2]) < 0.5


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(n_perturbations=2, estimator="one-sided"),
        dict(distribution="rademacher", estimator="fzoo", n_perturbations=3),
        dict(estimator="kerzoo"),
        dict(dtype=torch.bfloat16, stochastic_rounding=True, weight_decay=0.1),
    ],
)
def test_replay_rebuilds_the_weights_bit_for_bit(tmp_path, toy_model, regression_data, options):
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    model = toy_model(dtype=dtype)
    path = tmp_path / "s.zot"
    opt = MeZO(model.named_parameters(), lr=1e-2, sparsity=0.7, trajectory=path, on_nonfinite="skip", **options)
    steps_with_a_skip(opt, model, regression_data, 6, skip_at=2)
    opt.flush()
    base = toy_model(dtype=dtype)
    replay(base, path)
    for (name, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_trajectory_of_the_torch_path_replays_bit_for_bit_on_the_fused_kernel(
    tmp_path, monkeypatch, toy_model, regression_data, dtype
):
    """The numba backend's masked pass and mask packing replaced a torch path (numba's z, then addcmul_): runs
    written by either replay on the other, where torch's addcmul_ is a fused multiply-add (this machine's)."""
    import dataclasses

    from zotune import kernels

    numba_backend = kernels._REGISTRY.get("numba")
    if numba_backend is None or numba_backend.masked_axpy is None:
        pytest.skip("no numba backend")
    if not fused_addcmul():
        pytest.skip("torch's addcmul_ is not fused here: the two paths differ by a rounding")
    path = tmp_path / "torch-path.zot"
    with monkeypatch.context() as m:
        m.setitem(kernels._REGISTRY, "numba", dataclasses.replace(numba_backend, masked_axpy=None, pack_mask=None))
        model = toy_model(dtype=dtype)
        rounding = dtype != torch.float32
        opt = MeZO(model.named_parameters(), lr=1e-2, sparsity=0.7, trajectory=path, stochastic_rounding=rounding)
        steps_with_a_skip(opt, model, regression_data, 5, skip_at=-1)
        opt.flush()
    base = toy_model(dtype=dtype)
    replay(base, path)  # the fused kernel
    for (name, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name


def test_resume_continues_bit_for_bit(toy_model, regression_data):
    state = assert_resume_matches(lambda ps: MeZO(ps, lr=1e-2, sparsity=0.5), toy_model, regression_data, 6, 3)
    with pytest.raises(ValueError, match="variant options"):  # another sparsity is another run
        MeZO(toy_model().named_parameters(), lr=1e-2, sparsity=0.6).load_state_dict(state)


def test_an_interrupted_step_restores_the_weights(toy_model, regression_data):
    model = toy_model()  # +eps m z then -eps m z with the same mask
    assert_interrupt_restores(MeZO(model.named_parameters(), lr=1e-2, sparsity=0.5), model, regression_data)


def test_what_does_not_compose_is_refused(toy_model):
    params = list(toy_model().named_parameters())
    for build in (
        lambda: MeZOMomentum(params, lr=1e-3, sparsity=0.5),
        lambda: MeZOAdam(params, lr=1e-3, sparsity=0.5),
        lambda: MeZO(params, lr=1e-3, sparsity=0.5, distribution="lowrank"),
        lambda: MeZO(params, lr=1e-3, sparsity=0.5, distribution="sphere"),
        lambda: MeZO(params, lr=1e-3, sparsity=0.5, layerwise="param-norm"),
        lambda: MeZO(params, lr=1e-3, sparsity=0.5, fuse_next=True),
    ):
        with pytest.raises(ValueError, match="sparse directions"):
            build()
    with pytest.raises(ValueError, match="Invalid sparsity"):
        MeZO(params, lr=1e-3, sparsity=1.0)
    with pytest.raises(ConfigError, match="sparsity must be in"):
        OptimConfig(sparsity=-0.1)
    with pytest.raises(ConfigError, match="sparsity \\(Sparse-MeZO\\) works with"):
        OptimConfig(sparsity=0.5, variant="momentum")
    with pytest.raises(ConfigError, match="sparsity \\(Sparse-MeZO\\) works with"):
        OptimConfig(sparsity=0.5, estimator="hizoo")
    opt = make_optimizer(params, OptimConfig(sparsity=0.75))  # the config's fuse_next: on, turned off here
    assert opt.sparsity == 0.75 and not opt.fuse_next


def test_it_allocates_one_bit_a_parameter_and_nothing_parameter_sized_per_step():
    """A 64 MB matrix: its mask is 2 MB; further steps grow the peak by a few 4 MB chunks at most, never by a
    parameter-sized tensor: < 32 MB (as the other methods' test in test_estimators.py)."""
    from memory import rss_growth_mb

    setup = """
        import torch, zotune
        p = torch.nn.Parameter(torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)))
        opt = zotune.MeZO([("p", p)], lr=1e-9, sparsity=0.75)
        closure = lambda: p[0, :1000].sum()
        opt.step(closure)
    """
    growth_mb = rss_growth_mb(setup, "opt.step(closure); opt.step(closure)")
    assert growth_mb < 32, f"peak memory grew by {growth_mb} MB during a step on a 64 MB parameter"


def test_the_torch_paths_work_in_bounded_chunks_with_the_same_bits(monkeypatch):
    """On a backend whose chunk is a whole tensor (Triton) the torch paths still cut at FALLBACK_CHUNK, so no
    temporary is parameter-sized; the cut changes no bit (z, masks and rounding are keyed by element index)."""
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(37, 29, generator=gen)
    s = torch.rand(37, 29, generator=gen) + 0.5
    bits = functional.magnitude_mask(p0, 0.6)

    def run():
        p, sc = p0.clone(), s.clone()
        for backend in ("reference", "numba"):
            functional.sweep_([p], [5], [(1, 0.1), (2, -0.3)], masks=[bits], scale=0.9, backend=backend)
        functional.scaled_sweep_(p, 5, sc, [(3, 0.2)], backend="reference")
        functional.hizoo_update_(p, 5, sc, seed=3, restore=-0.2, g=0.5, kappa=2.0, alpha=0.1, lr=0.01)
        return p, sc

    whole = run()
    assert chunks.chunk_size(kernels.get("reference")) == min(kernels.get("reference").chunk, chunks.FALLBACK_CHUNK)
    monkeypatch.setattr(chunks, "FALLBACK_CHUNK", 64)  # 17 pieces of the 1,073 elements
    assert chunks.chunk_size(kernels.get("reference")) == 64
    cut = run()
    for a, b in zip(whole, cut):
        assert torch.equal(a, b)
