"""The one-page MeZO (zotune.optim.algorithm): Algorithm 1 itself, checked on losses whose gradient is known."""

import pytest
import torch

from zotune import rng
from zotune.optim import algorithm, reference


def _z(name, shape, seed, t=0):
    values = rng.z("gaussian", rng.step_seed(seed, t), rng.param_key(name), 0, int(torch.Size(shape).numel()))
    return torch.from_numpy(values).reshape(shape).double()


def test_the_tests_oracle_is_the_one_page_algorithm():
    assert reference.ReferenceMeZO is algorithm.ReferenceMeZO


def test_one_step_is_spsa_then_zo_sgd_on_a_linear_loss():
    """L(theta) = c . theta: the closure sees theta + eps z then theta - eps z, g = c . z, and the update
    is theta - lr (g z + wd theta) (wd on the matrix only, as given)."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    cw, cb = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    w0, b0 = w.clone(), b.clone()
    lr, eps, wd, seed = 0.1, 1e-3, 0.5, 7
    seen = []

    def closure():
        seen.append((w.clone(), b.clone()))
        return (cw * w).sum() + (cb * b).sum()

    ref = algorithm.ReferenceMeZO([("w", w, wd), ("b", b, 0.0)], lr=lr, eps=eps, seed=seed)
    plus = ref.step(closure)
    zw, zb = _z("w", w.shape, seed), _z("b", b.shape, seed)
    assert len(seen) == 2
    # float64 throughout: |theta| < 4, so an ulp is <= 8.9e-16; the reference's in-place adds may round once
    # differently from these expressions (1e-15), the update after three sweeps and two more roundings (1e-14);
    # g divides a difference of losses of size ~|c.theta| by 2 eps, losing ~3 digits to cancellation (1e-9)
    torch.testing.assert_close(seen[0][0], w0 + eps * zw, rtol=0, atol=1e-15)
    torch.testing.assert_close(seen[1][1], b0 - eps * zb, rtol=0, atol=1e-15)
    assert plus == pytest.approx(float((cw * seen[0][0]).sum() + (cb * seen[0][1]).sum()), rel=1e-15)
    g = float((cw * zw).sum() + (cb * zb).sum())
    assert ref.projected_grad == pytest.approx(g, rel=1e-9)
    torch.testing.assert_close(w, w0 - lr * (ref.projected_grad * zw + wd * w0), rtol=0, atol=1e-14)
    torch.testing.assert_close(b, b0 - lr * ref.projected_grad * zb, rtol=0, atol=1e-14)
    assert ref.step_count == 1


def test_each_step_draws_z_from_its_own_step_seed():
    theta = torch.zeros(5, dtype=torch.float64)
    c = torch.arange(1.0, 6.0, dtype=torch.float64)
    ref = algorithm.ReferenceMeZO([("theta", theta, 0.0)], lr=1.0, eps=1e-3, seed=3)
    for t in range(3):
        before = theta.clone()
        ref.step(lambda: (c * theta).sum())
        # float64: |theta| grows to ~10 at lr 1, whose ulp is 1.8e-15; three sweeps and an update a step round a few
        # of them (1e-12 leaves room; a z of another step is off by O(1))
        torch.testing.assert_close(theta, before - ref.projected_grad * _z("theta", (5,), 3, t), rtol=0, atol=1e-12)


def test_descends_a_parabola():
    theta = torch.linspace(-2.0, 2.0, 8, dtype=torch.float64)
    ref = algorithm.ReferenceMeZO([("theta", theta, 0.0)], lr=0.02, eps=1e-3, seed=0)
    start = float(0.5 * (theta * theta).sum())
    for _ in range(200):
        ref.step(lambda: 0.5 * (theta * theta).sum())
    # E[L_T] / L_0 = (1 - 2 lr + (d + 2) lr^2)^T = 6.6e-4 here (d = 8, T = 200); the seeded run reaches 9.9e-4
    assert float(0.5 * (theta * theta).sum()) < 1e-2 * start
