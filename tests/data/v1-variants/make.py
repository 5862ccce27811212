"""Writes the stored version-1 trajectories of the variants and the weights their training ended with.

Run once, with zotune 0.1.x (before the step description was shared by the optimizer and replay), from
the repository root: ``python tests/data/v1-variants/make.py``. tests/test_v1_variants.py replays each
file onto ``base.safetensors`` and checks the result against ``<name>.safetensors`` bit for bit, so a
change that moved the optimizer's and replay's sweeps together would still be caught.
"""

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

import zotune
from zotune import rng

HERE = Path(__file__).parent

# name -> (optimizer class, keyword arguments); each covers a different record or sweep of format 1
CASES = {
    "plain-fused": (zotune.MeZO, dict(fuse_next=True, weight_decay=0.1)),
    "nspsa-sphere": (zotune.MeZO, dict(n_perturbations=3, distribution="sphere")),
    "one-sided-rademacher": (zotune.MeZO, dict(n_perturbations=2, estimator="one-sided", distribution="rademacher")),
    "param-norm": (zotune.MeZO, dict(layerwise="param-norm")),
    "grad-norm": (zotune.MeZO, dict(layerwise="grad-norm", grad_norm_every=4, grad_norm_probes=2)),
    "momentum-history": (zotune.MeZOMomentum, dict(beta=0.8, window=4, fuse_next=True)),
    "adam-stored": (zotune.MeZOAdam, dict(betas=(0.9, 0.99), state="stored")),
    "bf16-rounding": (zotune.MeZO, dict(stochastic_rounding=True, fuse_next=True)),
}
STEPS = 10
NAN_AT = 13  # the closure's 13th call returns NaN: a skipped step in every file


def base_weights(dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Two numbered blocks of a weight and a bias, and a head: keyed, so the same on every machine."""
    shapes = {"layers.0.w": (6, 5), "layers.0.b": (6,), "layers.1.w": (4, 6), "layers.1.b": (4,), "head": (4,)}
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        z = rng.gaussian(rng.step_seed(1234, i), rng.param_key(name), 0, n)
        out[name] = (0.3 * torch.as_tensor(z)).reshape(shape).to(dtype)
    return out


def closure_for(params: dict[str, torch.Tensor]):
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == NAN_AT:
            return torch.tensor(float("nan"))
        total = sum(((p.float() - 0.1 * k) ** 2).sum() for k, p in enumerate(params.values()))
        return total / 50.0

    return closure


def main() -> None:
    save_file(base_weights(), str(HERE / "base.safetensors"))
    save_file(base_weights(torch.bfloat16), str(HERE / "base-bf16.safetensors"))
    for name, (cls, kwargs) in CASES.items():
        dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
        params = {k: v.clone().requires_grad_() for k, v in base_weights(dtype).items()}
        opt = cls(list(params.items()), lr=2e-2, eps=1e-3, seed=7, trajectory=HERE / f"{name}.zot",
                  on_nonfinite="skip", **kwargs)
        closure = closure_for(params)
        for _ in range(STEPS):
            opt.step(closure)
        opt.flush()
        save_file({k: v.detach().clone() for k, v in params.items()}, str(HERE / f"{name}.safetensors"))


if __name__ == "__main__":
    main()
