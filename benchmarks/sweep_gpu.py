"""The Triton sweep kernels alone against a copy, on one large tensor (CUDA): kernel time, no model.

One in-place pass ``x <- x + c z`` over ``--elements`` elements per dtype, timed with CUDA events
(``triton.testing.do_bench``, median) next to ``dst.copy_(src)`` of the same bytes, which is the floor
(read once, write once). Rows: Gaussian one term and two terms, Rademacher one term and two terms.
The issue-19 targets are printed with the ratios: Gaussian 1 term <= 1.5x copy, 2 terms <= 2x,
Rademacher <= 1.05x (it needs one random bit per element, so it must be memory-bound).

``--ncu`` runs the copy and each kernel once without timing: the target of Nsight Compute in
benchmarks/gpu_check.sh (``ncu -k regex:_sweep_kernel ...``), which profiles one launch of each.

    python benchmarks/sweep_gpu.py [--elements 268435456] [--dtypes float16,float32] [--results FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KEY, SEED0, SEED1, C = 0x0123456789ABCDEF, 2**63 + 5, 77, 1e-3


def cases(gpu):
    """(name, target ratio to copy or None, fn(x)) for every timed sweep."""
    return [
        ("Gaussian 1 term", 1.5, lambda x: gpu.sweep([x], [KEY], [0], "gaussian", [(SEED0, C)])),
        ("Gaussian 2 terms", 2.0, lambda x: gpu.sweep([x], [KEY], [0], "gaussian", [(SEED0, -C), (SEED1, C)])),
        ("Rademacher 1 term", 1.05, lambda x: gpu.sweep([x], [KEY], [0], "rademacher", [(SEED0, C)])),
        ("Rademacher 2 terms", None, lambda x: gpu.sweep([x], [KEY], [0], "rademacher", [(SEED0, -C), (SEED1, C)])),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=1 << 28)
    ap.add_argument("--dtypes", default="float16,float32", help="comma-separated: float16, bfloat16, float32")
    ap.add_argument("--ncu", action="store_true", help="run each kernel 3 times, untimed (for Nsight Compute)")
    ap.add_argument("--results", type=Path, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE.parent / "src"))
    import triton
    from triton.testing import do_bench

    from zotune.kernels import gpu

    rows = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        # random, not zeros (METHOD.md); made by normal_, so that the only kernels named *copy* are the copies timed
        x = torch.empty(args.elements, dtype=dtype, device="cuda").normal_()
        src = torch.empty_like(x).normal_()
        if args.ncu:  # one launch of each: Nsight Compute replays it as often as its sections need
            x.copy_(src)
            for _, _, fn in cases(gpu):
                fn(x)
            torch.cuda.synchronize()
            continue
        copy_ms = do_bench(lambda: x.copy_(src), warmup=100, rep=500, return_mode="median")
        nbytes = 2 * x.numel() * x.element_size()
        rows.append((name, "copy (floor)", copy_ms, 1.0, None, nbytes / copy_ms / 1e9))
        for label, target, fn in cases(gpu):
            ms = do_bench(lambda fn=fn: fn(x), warmup=100, rep=500, return_mode="median")
            x.copy_(src)  # keep the values in range: many sweeps of +-C drift them slowly
            rows.append((name, label, ms, ms / copy_ms, target, nbytes / ms / 1e9))
        del x, src
        torch.cuda.empty_cache()
    if args.ncu:
        return 0
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {stamp}: Triton sweep kernels vs copy, {args.elements} elements, {torch.cuda.get_device_name()}",
             "",
             f"- torch {torch.__version__}, triton {triton.__version__}; CUDA-event medians (triton.testing.do_bench); "
             f"block {gpu.BLOCK}",
             f"- command: `python benchmarks/sweep_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             "", "| dtype | pass | ms | / copy | target | TB/s (read + write) |", "|---|---|---:|---:|---:|---:|"]
    for name, label, ms, ratio, target, gbs in rows:
        lines.append(f"| {name} | {label} | {ms:.3f} | {ratio:.2f} | {'' if target is None else f'<= {target}'} | "
                     f"{gbs / 1e3:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
