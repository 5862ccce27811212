"""Host-side cost of one multi-tensor sweep (``zotune.optim.functional.sweep_``), the GPU launch left out.

On a GPU a MeZO sweep is one Triton launch over every tensor, issued right after the loss's
``.item()`` has synchronised: the GPU idles while Python prepares it, so the per-tensor host work
is paid once per sweep, twice a step. This times that work alone on any machine: the Triton
backend is made to accept CPU tensors (under ``TRITON_INTERPRET=1``) and its kernel launch is
replaced by a no-op, so what is left is zotune's Python (checks, backend choice, the cached tile
tables) for SmolLM2-135M's 272 tensors (small stand-ins: the cost does not depend on their size).

    python benchmarks/sweep_host.py                       # this checkout
    PYTHONPATH=/path/to/other/src python benchmarks/sweep_host.py   # another version, to compare

Prints milliseconds per call (median of ``--repeats`` timings of ``--calls`` calls each).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # read when zotune.kernels.gpu is imported

import torch  # noqa: E402

from zotune import kernels, rng  # noqa: E402
from zotune.kernels import gpu  # noqa: E402
from zotune.optim import functional as F  # noqa: E402


class _NoLaunch:
    """Stands in for the Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=272, help="SmolLM2-135M has 272")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    gpu._sweep_kernel = _NoLaunch()
    backend = dataclasses.replace(gpu.BACKEND, supports=lambda device: True)
    gpu.BACKEND = backend  # the multi-tensor path is taken for the backend object gpu.BACKEND
    kernels._REGISTRY[backend.name] = backend
    params = [torch.nn.Parameter(torch.zeros(64, 2)) for _ in range(args.tensors)]
    keys = [rng.param_key(f"model.layers.{i}.weight") for i in range(args.tensors)]
    for i in range(20):  # warm: tile tables built and cached
        F.sweep_(params, keys, [(i, 1e-3), (i + 1, -1e-3)], backend=backend.name)
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(args.calls):
            F.sweep_(params, keys, [(i, 1e-3), (i + 1, -1e-3)], backend=backend.name)
        timings.append((time.perf_counter() - start) / args.calls)
    ms = 1e3 * statistics.median(timings)
    print(f"{ms:.3f} ms per sweep_ call over {args.tensors} tensors ({1e3 * ms / args.tensors:.2f} us a tensor; "
          f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')})")


if __name__ == "__main__":
    main()
