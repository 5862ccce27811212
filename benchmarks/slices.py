"""Time a MeZO training forward (the loss of one batch) in length-sorted slices, side by side.

A batch of 16 examples of different lengths is padded to its longest; running it in consecutive
slices of the length-sorted batch pads less but adds forwards. For each task this times the loss of
the same batches with ``forward_chunks`` 1, 2, 4 and 0 (chosen per batch by
``zotune.objectives.length_slices``), round-robin in one process, and prints the mean time per
forward and the ratio to one forward, plus how many slices the automatic choice took over the grid's
200 steps. Needs the embedded model and ../shared/data (the tasks of examples/grid.yaml).

    OMP_NUM_THREADS=2 python benchmarks/slices.py --tasks sst2,rte,boolq,copa --batches 3
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import platform
import time

import torch

from zotune import compare
from zotune.objectives import CPU_FORWARD_OVERHEAD, length_slices
from zotune.train import _batch_indices, prepare

CHOICES = (1, 2, 4, 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="examples/grid.yaml")
    parser.add_argument("--tasks", default="sst2,rte,boolq,copa")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per task (each at every setting)")
    args = parser.parse_args(argv)
    grid = compare.load_compare_config(args.grid)
    print(
        f"# {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, overhead {CPU_FORWARD_OVERHEAD} tokens"
    )
    print("| task | slices chosen over 200 steps | 1 forward | 2 slices | 4 slices | chosen | 1 / chosen |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    loaded = None
    for task in args.tasks.split(","):
        config = compare.cell_config(grid, "mezo", task, 0)
        prepared = prepare(config, log=lambda m: None, loaded=loaded)
        loaded = prepared.loaded
        train = prepared.encoded["train"]
        size = config.train.batch_size
        chosen = collections.Counter()
        for step in range(config.train.steps):
            batch = sorted(
                (train[i] for i in _batch_indices(len(train), size, step, config.task.seed)), key=lambda e: e.width
            )
            chosen[len(length_slices([(e.width, len(e.sequences)) for e in batch], CPU_FORWARD_OVERHEAD))] += 1
        times = dict.fromkeys(CHOICES, 0.0)
        with torch.no_grad():
            for b in range(args.batches):
                batch = [train[i] for i in _batch_indices(len(train), size, 10 + b, config.task.seed)]
                for chunks in CHOICES[b % 4 :] + CHOICES[: b % 4]:  # rotate the order: no setting always first
                    start = time.perf_counter()
                    prepared.objective.loss(loaded.model, batch, chunks)
                    times[chunks] += time.perf_counter() - start
        mean = {k: v / args.batches for k, v in times.items()}
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(chosen.items()))
        print(
            f"| {task} | {counts} | {mean[1]:.2f} s | {mean[2]:.2f} s | {mean[4]:.2f} s | {mean[0]:.2f} s "
            f"| {mean[1] / mean[0]:.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
