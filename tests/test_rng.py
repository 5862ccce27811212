"""The keyed generator that defines z: known answers, chunk/order invariance and statistics."""

import math

import numpy as np
import pytest
import torch

from zotune import MeZO, rng


def test_philox_known_answers():
    # Known-answer vectors of Philox-4x32-10 from the Random123 distribution (kat_vectors).
    cases = [
        ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for args, expected in cases:
        assert tuple(int(w) for w in rng.philox4x32(*args)) == expected


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("a,b", [(1, 2), (3, 4), (5, 130), (127, 513), (1001, 2999)])
def test_slice_equals_slice_of_whole(distribution, a, b):
    whole = rng.z(distribution, 7, 11, 0, 3001)
    part = rng.z(distribution, 7, 11, a, b - a)
    np.testing.assert_array_equal(part, whole[a:b])


def test_param_key_is_stable_and_distinct():
    assert rng.param_key("model.layers.0.weight") == rng.param_key("model.layers.0.weight")
    # A fixed value: the key must not depend on Python's hash seed or the platform.
    assert rng.param_key("w") == int.from_bytes(__import__("hashlib").blake2b(b"w", digest_size=8).digest(), "little")
    assert rng.param_key("a.weight") != rng.param_key("a.bias")


def test_step_seeds_differ_by_step_seed_and_index():
    seeds = {rng.step_seed(s, t, i) for s in (0, 1) for t in range(50) for i in range(3)}
    assert len(seeds) == 300


def test_large_seeds_and_keys_work():
    z = rng.gaussian(2**64 - 1, 2**63 + 5, 2**33 + 7, 9)
    assert z.shape == (9,) and np.isfinite(z).all()
    with pytest.raises(ValueError, match="at most"):
        rng.gaussian(0, 0, 2**34, 1)
    with pytest.raises(ValueError, match="unknown distribution"):
        rng.z("uniform", 0, 0, 0, 1)


@pytest.mark.parametrize("distribution,bits", [("gaussian", 24), ("gaussian-fast", 16)])
def test_gaussian_moments_within_sampling_error(distribution, bits):
    n = 400_000
    z = rng.z(distribution, 3, 5, 0, n).astype(np.float64)
    # Standard errors of the sample mean, variance and kurtosis of N(0,1): 1/sqrt(n), sqrt(2/n), sqrt(24/n).
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    kurtosis = ((z - z.mean()) ** 4).mean() / z.var() ** 2
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / n)
    assert np.abs(z).max() <= math.sqrt(-2 * math.log(2.0**-bits)) + 1e-5  # the bound the definition implies (u's grid)


def test_gaussian_fast_is_box_muller_of_each_words_16_bit_halves():
    """Known answers from the definition, computed here from Philox's words: word j of block b gives elements
    8b + 2j and 8b + 2j + 1, u from its high half, v from its low half."""
    seed, key = 2**63 + 5, rng.param_key("w")
    z = rng.gaussian_fast(seed, key, 0, 24).astype(np.float64)
    for b in range(3):
        words = rng.philox4x32(b, rng.STREAM_Z, key & 0xFFFFFFFF, key >> 32, seed & 0xFFFFFFFF, seed >> 32)
        for j, w in enumerate(int(x) for x in words):
            r = math.sqrt(-2 * math.log(((w >> 16) + 1) / 2**16))
            angle = 2 * math.pi * (w & 0xFFFF) / 2**16
            # z is the float64 value rounded to float32 once: half an ulp of float32 (2**-24 relative)
            assert z[8 * b + 2 * j] == pytest.approx(r * math.cos(angle), rel=2**-24, abs=1e-30)
            assert z[8 * b + 2 * j + 1] == pytest.approx(r * math.sin(angle), rel=2**-24, abs=1e-30)


def test_gaussian_fast_has_the_variance_its_docstring_states():
    # E[z^2] = E[r^2] / 2 = mean of -ln u over u's 2**16 values (float64 sums)
    u = np.arange(1, 2**16 + 1, dtype=np.float64) / 2**16
    assert -np.log(u).mean() == pytest.approx(math.log(2**16) - math.lgamma(2**16 + 1) / 2**16, rel=1e-12)
    assert 1 - 1e-4 < -np.log(u).mean() < 1 - 9.8e-5


def _corr(a, b):
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    return float((a * b).mean() / (a.std() * b.std()))


@pytest.mark.parametrize("distribution", rng.DISTRIBUTIONS)
def test_no_correlation_between_neighbours_keys_and_seeds(distribution):
    n = 200_000
    bound = 5 / math.sqrt(n)  # the sample correlation of independent variables has s.e. 1/sqrt(n)
    z = rng.z(distribution, 1, 2, 0, n + 4)
    for lag in (1, 2, 3, 4):  # lags 1-3 stay inside a Philox block, 4 crosses to the next
        assert abs(_corr(z[:n], z[lag : n + lag])) < bound
    assert abs(_corr(z[:n], rng.z(distribution, 1, 3, 0, n))) < bound  # another key
    assert abs(_corr(z[:n], rng.z(distribution, 2, 2, 0, n))) < bound  # another seed
    assert abs(_corr(z[:n], rng.z(distribution, rng.step_seed(1, 1), 2, 0, n))) < bound


def test_rademacher_is_balanced_signs():
    n = 100_000
    z = rng.rademacher(9, 9, 0, n)
    assert set(np.unique(z)) == {-1.0, 1.0}
    assert abs(z.mean()) < 5 / math.sqrt(n)


def test_rounding_words_are_uniform_and_separate_from_z():
    w = rng.rounding_words(1, 2, 0, 100_000).astype(np.float64) / 2**32
    assert abs(w.mean() - 0.5) < 5 * math.sqrt(1 / 12 / len(w))
    zw = rng._blocks(1, 2, rng.STREAM_Z, 0, 4).reshape(-1).astype(np.uint32)
    assert not np.array_equal(zw, rng.rounding_words(1, 2, 0, 16))


def _one_step(order, names=("a", "b", "c")):
    tensors = {n: torch.nn.Parameter(torch.zeros(5)) for n in names}
    opt = MeZO([(n, tensors[n]) for n in order], lr=0.1, eps=1e-3)
    target = torch.arange(15.0)
    opt.step(lambda: ((torch.cat([tensors[n] for n in names]) - target) ** 2).sum())
    return {n: t.detach().clone() for n, t in tensors.items()}


def test_z_does_not_depend_on_visiting_order():
    first = _one_step(("a", "b", "c"))
    second = _one_step(("c", "a", "b"))
    # Bit for bit: each element gets the same z (keyed by its tensor's name) and the same float32 operations
    # in either order, and the loss concatenates in a fixed order. z keyed by position is O(lr g) off.
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_step_leaves_global_rng_untouched(toy_model, regression_data):
    from conftest import mse_closure

    model = toy_model()
    opt = MeZO(model.named_parameters(), lr=1e-2, stochastic_rounding=True)
    before = torch.random.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    for _ in range(3):
        opt.step(mse_closure(model, *regression_data))
    assert torch.equal(before, torch.random.get_rng_state())
    assert np.array_equal(np_before, np.random.get_state()[1])
