"""A self-contained demonstration: MeZO memorises random token sequences with a tiny Llama.

It needs no download and no data: the model is built from a config with weights drawn from an
explicit generator, so the demo is the same on every machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zotune.optim import MeZO

__all__ = ["DemoConfig", "run_demo", "tiny_llama"]


@dataclass
class DemoConfig:
    steps: int = 400  # MeZO steps
    lr: float = 3e-3  # large for MeZO: the model is tiny and randomly initialised
    eps: float = 1e-3  # perturbation scale, the paper's value
    seed: int = 0  # seeds the model, the data and the perturbations
    sequences: int = 8  # random sequences to memorise
    length: int = 16  # tokens per sequence
    report_every: int = 50  # print the loss every this many steps

    def __post_init__(self):
        for name in ("steps", "sequences", "length", "report_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def tiny_llama(seed: int = 0, vocab_size: int = 64, hidden_size: int = 32, layers: int = 2):
    """A ~23k-parameter ``LlamaForCausalLM`` with N(0, 0.02) weights from ``torch.Generator(seed)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM._from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            else:
                p.fill_(1.0)  # RMSNorm weights
    return model.eval()


def run_demo(config: DemoConfig | None = None, report: Callable[[str], None] = print) -> tuple[float, float]:
    """Fine-tune a tiny Llama with MeZO to memorise random sequences; returns (initial, final) loss."""
    config = config or DemoConfig()
    model = tiny_llama(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    data = torch.randint(0, model.config.vocab_size, (config.sequences, config.length), generator=generator)

    def closure():
        return model(input_ids=data, labels=data).loss

    n_params = sum(p.numel() for p in model.parameters())
    report(
        f"zotune demo: MeZO on a tiny Llama ({n_params:,} parameters), memorising "
        f"{config.sequences} random sequences of {config.length} tokens"
    )
    with torch.no_grad():
        initial = float(closure())
    report(f"step {0:>5}  loss {initial:.4f}")
    opt = MeZO(model.named_parameters(), lr=config.lr, eps=config.eps, seed=config.seed)
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        opt.step(closure)
        if step % config.report_every == 0 or step == config.steps:
            with torch.no_grad():
                report(f"step {step:>5}  loss {float(closure()):.4f}")
    with torch.no_grad():
        final = float(closure())
    report(f"loss {initial:.4f} -> {final:.4f} in {config.steps} steps, {time.perf_counter() - start:.1f} s")
    return initial, final
