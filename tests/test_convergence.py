"""MeZO estimates the gradient without bias and minimises small problems, and a tiny language model."""

import math

import numpy as np
import pytest
import torch

from zotune import MeZO, rng
from zotune.demo import tiny_llama


def test_spsa_estimate_is_unbiased_on_a_quadratic():
    # For L(x) = 0.5 x'Ax + b'x the two-sided estimate g z with g = (L(x+eps z) - L(x-eps z)) / (2 eps)
    # equals z z' grad L exactly, whose mean is grad L when E[z z'] = I.
    d, n, eps = 8, 20_000, 1e-2
    gen = np.random.default_rng(0)
    m = gen.normal(size=(d, d))
    a, b, x = m @ m.T / d + np.eye(d), gen.normal(size=d), gen.normal(size=d)
    grad = a @ x + b
    loss = lambda v: 0.5 * v @ a @ v + b @ v  # noqa: E731
    estimates = np.empty((n, d))
    for k in range(n):
        z = rng.gaussian(rng.step_seed(1, k), 0, 0, d).astype(np.float64)
        estimates[k] = (loss(x + eps * z) - loss(x - eps * z)) / (2 * eps) * z
    mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(n)  # 5 standard errors: seeded, and a bias
    # as small as 1e-3 of the gradient per coordinate would show over 20,000 draws
    assert np.all(np.abs(mean - grad) < 5 * stderr), (mean, grad, stderr)


def test_minimises_a_quadratic():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(20, 20, generator=gen)
    a = m @ m.T / 20 + torch.eye(20)
    x = torch.nn.Parameter(torch.randn(20, generator=gen))
    opt = MeZO([x], lr=0.02, eps=1e-3)
    loss = lambda: 0.5 * x @ a @ x  # noqa: E731
    start = float(loss().detach())
    for _ in range(400):
        opt.step(loss)
    # the seeded run reaches 9e-7 of the start; a wrong sign or a lost update would leave it at or above the start
    assert float(loss().detach()) < 1e-3 * start


def test_solves_least_squares():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(64, 5, generator=gen)
    truth = torch.randn(5, 1, generator=gen)
    targets = features @ truth
    model = torch.nn.Linear(5, 1)
    with torch.no_grad():
        model.weight.zero_(), model.bias.fill_(0.3)
    opt = MeZO(model.named_parameters(), lr=0.05)
    loss = lambda: torch.nn.functional.mse_loss(model(features), targets)  # noqa: E731
    for _ in range(600):
        opt.step(loss)
    # the seeded run reaches float32 round-off (loss 1e-13, weights 2.4e-7 from the truth); the start's bias 0.3
    # left in place alone would keep the loss at 0.09: these leave five and two orders of margin to round-off
    assert float(loss().detach()) < 1e-8
    torch.testing.assert_close(model.weight.detach().T, truth, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lowers_the_loss_of_a_tiny_causal_lm(family):
    if family == "llama":
        model = tiny_llama(seed=0)
    else:
        from transformers import OPTConfig, OPTForCausalLM

        config = OPTConfig(
            vocab_size=64,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
        model = OPTForCausalLM._from_config(config).eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():  # matrices from the generator; biases and norms as built (0 and 1)
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    data = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    closure = lambda: model(input_ids=data, labels=data).loss  # noqa: E731
    with torch.no_grad():
        start = float(closure())
    opt = MeZO(model.named_parameters(), lr=3e-3, eps=1e-3)
    for _ in range(300):
        opt.step(closure)
    with torch.no_grad():
        end = float(closure())
    assert end < start - 0.25, (start, end)  # chance level is ln(64) = 4.16
