import math

import pytest
import torch


@pytest.fixture
def toy_model():
    """A small MLP with named parameters of ranks 1 and 2 (seeded explicitly)."""

    def make(seed: int = 0, dtype=torch.float32):
        gen = torch.Generator().manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)
        )
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        return model.to(dtype)

    return make


@pytest.fixture
def regression_data():
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(32, 6, generator=gen)
    y = torch.randn(32, 3, generator=gen)
    return x, y


def ulp32(x: float) -> float:
    """The spacing of float32 numbers at ``|x|``: the unit of the rounding tolerances (weights and losses are float32)."""
    return math.ldexp(1.0, math.frexp(abs(x))[1] - 24)


def mse_closure(model, x, y):
    def closure():
        return torch.nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)

    return closure


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as a model folder, for runs through the CLI."""
    import tiny

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny.causal_lm("llama").save_pretrained(path)
    tiny.tokenizer().save_pretrained(path)
    return path
