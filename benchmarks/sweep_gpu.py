"""The Triton sweep kernels alone against a copy, on one large tensor (CUDA): kernel time, no model.

One in-place pass ``x <- x + c z`` over ``--elements`` elements per dtype, timed with CUDA events
(``triton.testing.do_bench``, median) next to ``dst.copy_(src)`` of the same bytes, which is the floor
(read once, write once). Rows: Gaussian one term and two terms (``gaussian`` and ``gaussian-fast``),
Rademacher one, two and nine terms (FZOO's update in one pass), and in float32 Sparse-MeZO's masked two-term
sweep (``masked_axpy``, a quarter of the mask's bits set).
The issue-19 targets are printed with the ratios: Gaussian 1 term <= 1.5x copy, 2 terms <= 2x,
Rademacher <= 1.05x (it needs one random bit per element, so it must be memory-bound).

``--against FILE`` loads another version of ``zotune/kernels/gpu.py`` (e.g. ``git show
3ac4d08:src/zotune/kernels/gpu.py``, the kernels before issue 19's Rademacher and alignment changes)
beside this one: its kernels are timed in the same table, so old and new are compared side by side on
one card; then every case (dtypes, both distributions, one and two terms, scale 1 and not, fill,
stochastic rounding, odd lengths and offsets, the multi-tensor launch) must give the same bits from
both (exit status 1 if not: trajectories written with the old kernels must replay bit for bit).

``--ncu`` runs the copy and each kernel once without timing: the target of Nsight Compute in
benchmarks/gpu_check.sh (``ncu -k regex:_sweep_kernel ...``), which profiles one launch of each.

    python benchmarks/sweep_gpu.py [--elements 268435456] [--dtypes float16,float32] [--results FILE] [--against FILE]
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


def cases(gpu, dtype=torch.float32):
    """(name, target ratio to copy or None, fn(x)) for every timed sweep of ``dtype``."""
    out = [
        ("Gaussian 1 term", 1.5, lambda x: gpu.sweep([x], [KEY], [0], "gaussian", [(SEED0, C)])),
        ("Gaussian 2 terms", 2.0, lambda x: gpu.sweep([x], [KEY], [0], "gaussian", [(SEED0, -C), (SEED1, C)])),
        ("Rademacher 1 term", 1.05, lambda x: gpu.sweep([x], [KEY], [0], "rademacher", [(SEED0, C)])),
        ("Rademacher 2 terms", None, lambda x: gpu.sweep([x], [KEY], [0], "rademacher", [(SEED0, -C), (SEED1, C)])),
    ]
    if "FAST" in gpu._sweep_kernel.arg_names:  # the 16-bit Gaussian on the hardware's functions, same targets
        out[2:2] = [
            ("Gaussian-fast 1 term", 1.5, lambda x: gpu.sweep([x], [KEY], [0], "gaussian-fast", [(SEED0, C)])),
            (
                "Gaussian-fast 2 terms",
                2.0,
                lambda x: gpu.sweep([x], [KEY], [0], "gaussian-fast", [(SEED0, -C), (SEED1, C)]),
            ),
        ]
    if hasattr(gpu, "MAX_TERMS"):  # FZOO's update (N = 8, with the last probe's restore) in one pass
        many = [(SEED0 + i, (-1) ** i * C) for i in range(9)]
        out.append(("Rademacher 9 terms (FZOO)", None, lambda x: gpu.sweep([x], [KEY], [0], "rademacher", many)))
    if dtype == torch.float32 and hasattr(gpu, "masked_axpy"):  # Sparse-MeZO's one-pass kernel (float32 work only)
        out.append(
            (
                "Sparse-MeZO masked, Gaussian 2 terms",
                None,
                lambda x: gpu.masked_axpy(x, "gaussian", KEY, 0, 1.0, [(SEED0, -C), (SEED1, C)], _mask_bits(x)),
            )
        )
    return out


_MASKS: dict = {}


def _mask_bits(x):
    """A random packed mask (a quarter of the bits set, as sparsity 0.75) for x, made once per size: not timed."""
    key = (x.numel(), x.device)
    if key not in _MASKS:
        _MASKS.clear()
        keep = torch.rand(x.numel() + (-x.numel() % 8), device=x.device) < 0.25
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
        _MASKS[key] = (keep.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)
    return _MASKS[key]


def load_other(path: Path):
    """Another version of zotune/kernels/gpu.py, as its own module (it imports zotune.rng and zotune.kernels)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("zotune_kernels_gpu_other", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RANGES = [(0, 1, 0), (5, 3, 1), (3, 70_001, 0), (2**33 + 7, 4099, 3), (0, 1 << 20, 0)]  # (start, n, storage shift)


def same_bits(new, old, device="cuda", ranges=RANGES) -> list[str]:
    """The cases where the two versions' sweeps differ in any bit (empty: none)."""
    g = torch.Generator(device=device).manual_seed(0)
    bad = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for start, n, shift in ranges:
            storage = (torch.randn(n + shift, device=device, generator=g) * 0.05).to(dtype)
            for distribution in ("gaussian", "rademacher"):
                for kw in (
                    dict(terms=[(SEED0, C)]),
                    dict(terms=[(SEED0, -C), (SEED1, C)], scale=0.9990000128746033),
                    dict(terms=[(SEED0, 1.0)], fill=True),
                    dict(terms=[(SEED0, 3e-5), (SEED1, -1e-6)], rounding_seed=2**63 + 3, scale=0.999),
                ):
                    a, b = storage.clone()[shift:], storage.clone()[shift:]
                    new.sweep([a], [KEY], [start], distribution, **kw)
                    old.sweep([b], [KEY], [start], distribution, **kw)
                    if not torch.equal(a.view(torch.int8), b.view(torch.int8)):
                        diff = (a.float() - b.float()).abs().max().item()
                        bad.append(
                            f"{dtype} start {start} n {n} shift {shift} {distribution} {kw}: max |diff| {diff:.3g}"
                        )
        xs = [(torch.randn(n, device=device, generator=g) * 0.05).to(dtype) for n in (7, 2048, 5000, 300)]
        for distribution in ("gaussian", "rademacher"):  # the multi-tensor launch
            a, b = [x.clone() for x in xs], [x.clone() for x in xs]
            new.sweep(a, [1, 2, 3, 4], [0, 5, 0, 131], distribution, [(SEED0, -C), (SEED1, C)], scale=0.999)
            old.sweep(b, [1, 2, 3, 4], [0, 5, 0, 131], distribution, [(SEED0, -C), (SEED1, C)], scale=0.999)
            if not all(torch.equal(x.view(torch.int8), y.view(torch.int8)) for x, y in zip(a, b)):
                bad.append(f"{dtype} multi-tensor {distribution}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=1 << 28)
    ap.add_argument("--dtypes", default="float16,float32", help="comma-separated: float16, bfloat16, float32")
    ap.add_argument("--ncu", action="store_true", help="run each kernel 3 times, untimed (for Nsight Compute)")
    ap.add_argument("--results", type=Path, help="append the table to this markdown file")
    ap.add_argument(
        "--against", type=Path, help="another version of zotune/kernels/gpu.py: check same bits, time beside"
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE.parent / "src"))
    import triton
    from triton.testing import do_bench

    from zotune.kernels import gpu

    versions = {"": gpu}
    other = load_other(args.against) if args.against and not args.ncu else None
    if other is not None:
        versions["before: "] = other
    rows = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        # random, not zeros (METHOD.md); made by normal_, so that the only kernels named *copy* are the copies timed
        x = torch.empty(args.elements, dtype=dtype, device="cuda").normal_()
        src = torch.empty_like(x).normal_()
        if args.ncu:  # one launch of each: Nsight Compute replays it as often as its sections need
            x.copy_(src)
            for _, _, fn in cases(gpu, dtype):
                fn(x)
            torch.cuda.synchronize()
            continue
        copy_ms = do_bench(lambda: x.copy_(src), warmup=100, rep=500, return_mode="median")
        nbytes = 2 * x.numel() * x.element_size()
        rows.append((name, "copy (floor)", copy_ms, 1.0, None, nbytes / copy_ms / 1e9))
        for prefix, module in versions.items():
            for label, target, fn in cases(module, dtype):
                ms = do_bench(lambda fn=fn: fn(x), warmup=100, rep=500, return_mode="median")
                x.copy_(src)  # keep the values in range: many sweeps of +-C drift them slowly
                rows.append((name, prefix + label, ms, ms / copy_ms, None if prefix else target, nbytes / ms / 1e9))
        del x, src
        torch.cuda.empty_cache()
    if args.ncu:
        return 0
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {stamp}: Triton sweep kernels vs copy, {args.elements} elements, {torch.cuda.get_device_name()}",
        "",
        f"- torch {torch.__version__}, triton {triton.__version__}; CUDA-event medians (triton.testing.do_bench); "
        f"block {gpu.BLOCK}",
        f"- command: `python benchmarks/sweep_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| dtype | pass | ms | / copy | target | TB/s (read + write) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, label, ms, ratio, target, gbs in rows:
        lines.append(
            f"| {name} | {label} | {ms:.3f} | {ratio:.2f} | {'' if target is None else f'<= {target}'} | "
            f"{gbs / 1e3:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)
    if other is None:
        return 0
    # after the timings (so that a slow check cannot lose them): every case gives the same bits from both
    bad = same_bits(gpu, other)
    same = f"same bits as {args.against}: " + ("yes, in every case" if not bad else f"NO, {len(bad)} cases differ")
    print(same)
    for line in bad[:20]:
        print("  " + line)
    if args.results:
        with args.results.open("a") as f:
            f.write(f"\n- sweep_gpu.py --against: {same}\n" + "".join(f"  - {line}\n" for line in bad[:20]))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
