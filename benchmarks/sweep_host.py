"""Host-side cost of one multi-tensor sweep (``zotune.optim.functional.sweep_``), the GPU launch left out.

On a GPU a MeZO sweep is one Triton launch over every tensor, issued right after the loss's
``.item()`` has synchronised: the GPU idles while Python prepares it, so the per-tensor host work
is paid once per sweep, twice a step. This times that work alone on any machine: the Triton
backend is made to accept CPU tensors (under ``TRITON_INTERPRET=1``) and its kernel launch is
replaced by a no-op, so what is left is zotune's Python (checks, backend choice, the cached tile
tables) for SmolLM2-135M's 272 tensors (small stand-ins: the cost does not depend on their size).

    python benchmarks/sweep_host.py                       # this checkout
    PYTHONPATH=/path/to/other/src python benchmarks/sweep_host.py   # another version, to compare

Three cases, each a whole sweep over all the tensors:

- ``multi``: one ``sweep_`` call with two terms (the fused MeZO sweep: one launch for all tensors);
- ``per-tensor``: one ``sweep_`` call per tensor, one term each (what layerwise scales issue:
  ``variants.sweep_terms_`` with a per-tensor factor);
- ``4-term``: one ``sweep_`` call with four Gaussian terms (n-SPSA's update), which takes the
  backend's per-tensor ``axpy`` two terms at a time;
- ``fzoo``: one ``sweep_`` call with nine Rademacher terms (FZOO's update with N = 8), one launch where
  the backend's multi-tensor sweep takes that many terms, else the per-tensor path as ``4-term``.

Prints milliseconds per call (median of ``--repeats`` timings of ``--calls`` calls each) and, where
the backend counts them, the launch tables built (each one a host-to-device copy on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # read when zotune.kernels.gpu is imported

import torch  # noqa: E402

from zotune import kernels, rng  # noqa: E402
from zotune.kernels import gpu  # noqa: E402
from zotune.optim import functional as F  # noqa: E402


class _NoLaunch:
    """Stands in for the Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _time(fn, calls: int, repeats: int) -> float:
    """Median seconds per call of fn(i) over ``repeats`` timings of ``calls`` calls (after 20 warm-up calls)."""
    for i in range(20):  # warm: tile tables built and cached where they are cached
        fn(i)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        timings.append((time.perf_counter() - start) / calls)
    return statistics.median(timings)


def _tables_built() -> int:
    """Launch tables built so far: counted where the backend counts them, else by the old cache's insertions."""
    stats = getattr(gpu, "table_stats", None)
    if stats is not None:
        return stats()["built"]
    return gpu._TABLES.inserted


def _count_insertions() -> None:
    """Before table_stats (an older checkout): count the insertions into its launch-table dict."""
    if not hasattr(gpu, "table_stats") and hasattr(gpu, "_TABLES"):

        class Counting(type(gpu._TABLES)):
            inserted = 0

            def __setitem__(self, key, value):
                Counting.inserted += 1
                super().__setitem__(key, value)

        gpu._TABLES = Counting(gpu._TABLES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=272, help="SmolLM2-135M has 272")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cases", default="multi,per-tensor,4-term,fzoo", help="comma-separated: multi, per-tensor, 4-term, fzoo"
    )
    args = parser.parse_args()

    gpu._sweep_kernel = _NoLaunch()
    _count_insertions()
    if hasattr(gpu, "_sweep_kernel_one"):  # the single-tensor kernel, where the backend has one
        gpu._sweep_kernel_one = _NoLaunch()
    backend = dataclasses.replace(gpu.BACKEND, supports=lambda device: True)
    gpu.BACKEND = backend  # the multi-tensor path is taken for the backend object gpu.BACKEND
    kernels._REGISTRY[backend.name] = backend
    params = [torch.nn.Parameter(torch.zeros(64, 2)) for _ in range(args.tensors)]
    keys = [rng.param_key(f"model.layers.{i}.weight") for i in range(args.tensors)]

    def multi(i):
        F.sweep_(params, keys, [(i, 1e-3), (i + 1, -1e-3)], backend=backend.name)

    def per_tensor(i):
        for p, key in zip(params, keys):
            F.sweep_([p], [key], [(i, 1e-3)], backend=backend.name)

    def four_terms(i):
        F.sweep_(params, keys, [(i, 1e-3), (i + 1, -1e-3), (i + 2, 1e-3), (i + 3, -1e-3)], backend=backend.name)

    def fzoo(i):
        terms = [(i + j, (-1) ** j * 1e-3) for j in range(9)]
        F.sweep_(params, keys, terms, distribution="rademacher", backend=backend.name)

    cases = {"multi": multi, "per-tensor": per_tensor, "4-term": four_terms, "fzoo": fzoo}
    print(
        f"{args.tensors} tensors; zotune from {Path(gpu.__file__).parents[2]}; torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    )
    for name in args.cases.split(","):
        built = _tables_built()
        ms = 1e3 * _time(cases[name], args.calls, args.repeats)
        after = _tables_built()
        calls = 20 + args.calls * args.repeats
        print(
            f"{name:>10}: {ms:.3f} ms per call ({1e3 * ms / args.tensors:.2f} us a tensor; "
            f"launch tables built: {(after - built) / calls:.1f} per call)"
        )


if __name__ == "__main__":
    main()
