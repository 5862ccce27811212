import math
import os
import signal

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


def steps_with_a_skip(opt, model, data, steps: int, skip_at: int) -> None:
    """``steps`` optimizer steps on the regression loss, the one at ``skip_at`` with a NaN loss (skipped, its warning
    silenced): what a replay test records (opt built with ``on_nonfinite="skip"``)."""
    import warnings

    for t in range(steps):
        closure = (lambda: torch.tensor(float("nan"))) if t == skip_at else mse_closure(model, *data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)


def assert_resume_matches(make, toy_model, data, steps: int, split: int) -> dict:
    """``make(named_parameters)`` builds an optimizer. ``steps`` straight steps must equal ``split`` steps, the
    weights and the state_dict taken into a fresh model and optimizer, then the rest, bit for bit. Returns the
    state_dict (for tests of what it refuses)."""
    straight = toy_model()
    opt = make(straight.named_parameters())
    for _ in range(steps):
        opt.step(mse_closure(straight, *data))
    first = toy_model()
    opt1 = make(first.named_parameters())
    for _ in range(split):
        opt1.step(mse_closure(first, *data))
    state = opt1.state_dict()
    resumed = toy_model()
    resumed.load_state_dict(first.state_dict())
    opt2 = make(resumed.named_parameters())
    opt2.load_state_dict(state)
    for _ in range(steps - split):
        opt2.step(mse_closure(resumed, *data))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    return state


def assert_interrupt_restores(opt, model, data, eps: float = 1e-3) -> None:
    """A KeyboardInterrupt in the closure's second call: the step must undo its perturbation. Tolerance: the probe's
    sweep and the undo each round once, by half an ulp of |theta| + eps |u| (|u| <= 6: Gaussian z is below 5.8)."""
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return mse_closure(model, *data)()

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for p, p0 in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=2 * ulp32(float(p0.abs().max()) + eps * 6))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as a model folder, for runs through the CLI."""
    import tiny

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny.causal_lm("llama").save_pretrained(path)
    tiny.tokenizer().save_pretrained(path)
    return path


def fused_addcmul() -> bool:
    """Whether torch's addcmul_ rounds once (a fused multiply-add: its vectorised CPU kernel on FMA hardware)."""
    a, b = torch.tensor([1.0 + 2.0**-12] * 16), torch.tensor([1.0 - 2.0**-12] * 16)  # a b = 1 - 2^-24, exactly
    return bool(torch.full((16,), -1.0).addcmul_(a, b)[0] != 0.0)  # unfused, a b rounds to 1 and the sum to 0


def stopped_during_step(monkeypatch, args: list[str], step: int, signals=(signal.SIGINT,)) -> int:
    """``zotune.cli.main(args)`` with ``signals`` sent while it picks the batch of step ``step`` (0-based): the run
    finishes that step, saves its state and stops. Returns main's exit code (130 for a stop)."""
    import zotune.train as train_module
    from zotune.cli import main

    original = train_module._batch_indices

    def interrupt(n, batch_size, at, seed):
        if at == step:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return original(n, batch_size, at, seed)

    monkeypatch.setattr(train_module, "_batch_indices", interrupt)
    try:
        return main(args)
    finally:
        monkeypatch.setattr(train_module, "_batch_indices", original)
