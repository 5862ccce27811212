"""FZOO's step, sequential against batched (``MeZO(batched=True)``), side by side on the default run's model and data.

Two FZOO optimizers (N = 8 Rademacher directions, lr 0 so that the weights stay where they are and both
time the same work) over the same model take their steps in alternation on the same batches: the
sequential one runs the N + 1 forward passes one after another on the in-place weights, the batched one
builds N + 1 copies of the trainable tensors and runs them as one vmapped forward. Reported: the median
step time of each, their ratio, the losses of both (they must agree: the same points), and the memory of
the copies (measured on CUDA as the peak allocated during a step; on the CPU the copies' bytes).

    python benchmarks/batched.py                      # SmolLM2-135M-Instruct (the default run), batch 16
    python benchmarks/batched.py --steps 5 --attn eager
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import zotune
from zotune.config import RunConfig
from zotune.train import prepare


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="steps of each kind (alternating; first pair not timed)")
    ap.add_argument("--n", type=int, default=8, help="FZOO's N")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument(
        "--attn", choices=("sdpa", "eager"), default=None, help="attention implementation (default: the model's)"
    )
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    config = RunConfig()
    config.model.device = args.device
    prepared = prepare(config, log=lambda s: None)
    model, objective = prepared.loaded.model, prepared.objective
    if args.attn is not None:
        model.config._attn_implementation = args.attn
    model.eval()
    train = prepared.encoded["train"]
    device = next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    copies_mb = (args.n + 1) * sum(p.numel() * p.element_size() for _, p in named) / 2**20
    seq = zotune.FZOO(named, lr=0.0, n_perturbations=args.n, seed=0)
    bat = zotune.FZOO(named, lr=0.0, n_perturbations=args.n, seed=0, batched=True)
    times: dict[str, list[float]] = {"sequential": [], "batched": []}
    peaks: dict[str, float] = {}
    for t in range(args.steps + 1):
        batch = train[t * args.batch_size : (t + 1) * args.batch_size]

        def loss():
            return objective.loss(model, batch, 1)

        losses = {}
        for name, opt, closure in (("sequential", seq, loss), ("batched", bat, zotune.BatchedClosure(model, loss))):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            opt.step(closure)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            if t:
                times[name].append(time.perf_counter() - start)
            losses[name] = opt.last_losses
        print(f"step {t}: losses (l_0, l_1) sequential {losses['sequential']}, batched {losses['batched']}")
    med = {k: statistics.median(v) for k, v in times.items()}
    threads = torch.get_num_threads()
    print(
        f"\n{device} ({threads} threads), batch {args.batch_size}, N = {args.n}, attention "
        f"{model.config._attn_implementation}: median step sequential {med['sequential']:.2f} s, "
        f"batched {med['batched']:.2f} s, batched / sequential {med['batched'] / med['sequential']:.2f}"
    )
    print(f"the batched step's N + 1 copies of the trainable parameters: {copies_mb:.0f} MB")
    if peaks:
        print(
            f"peak allocated during a step: sequential {peaks['sequential']:.0f} MB, batched {peaks['batched']:.0f} MB"
        )


if __name__ == "__main__":
    main()
