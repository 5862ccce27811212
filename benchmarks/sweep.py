"""Time one +eps perturbation sweep (x += eps * z, in place) over a ~135M-parameter model.

The parameters are float32 tensors shaped like SmolLM-135M's (a 49152x576 embedding and 30 layers
of 576x576 / 576x192 / 576x1536 / 1536x576 matrices and 576-vectors). Rows:

- reference-style: what the MeZO reference code does, per tensor
  ``z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype); p.data = p.data + eps * z``
  (torch's global generator, out of place);
- zotune reference backend (NumPy Philox, 2**20-element chunks; slow, one repetition; --skip-reference);
- zotune numba backend, Gaussian and Gaussian-fast (one term, and the two-term fused restore-and-perturb);
- zotune numba backend, Rademacher;
- floors: ``p.copy_(q)`` and ``p.add_(q, alpha=eps)``.

Times are medians over --repeats repetitions after one warm-up call (which JIT-compiles or loads
the numba cache; its time is reported separately, together with a cold compile measured in a
subprocess with an empty NUMBA_CACHE_DIR). The table is printed and, unless --no-append, appended
as a markdown section to benchmarks/RESULTS.md.

    PYTHONPATH=src python benchmarks/sweep.py [--elements N] [--repeats R] [--skip-reference] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
EPS = 1e-3
SEED = 0x5EED0123456789AB  # >= 2**63 on purpose: the full 64-bit range is exercised

HIDDEN, INTER, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30


def smollm_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    shapes.append(("model.norm.weight", (HIDDEN,)))
    return shapes


DEFAULT_ELEMENTS = sum(torch.Size(s).numel() for _, s in smollm_shapes())


def make_shapes(elements: int) -> list[tuple[str, tuple[int, ...]]]:
    """The SmolLM-like shapes, repeated or cut so that they hold exactly ``elements`` elements."""
    base = smollm_shapes()
    out, total, rep = [], 0, 0
    while total < elements:
        for name, shape in base:
            n = torch.Size(shape).numel()
            if total + n > elements:
                out.append((f"{rep}.{name}.part", (elements - total,)))
                total = elements
                break
            out.append((f"{rep}.{name}" if rep else name, shape))
            total += n
        rep += 1
    return out


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


COLD_SNIPPET = """
import time, torch
t0 = time.perf_counter()
from zotune.kernels import cpu
t1 = time.perf_counter()
x = torch.zeros(1 << 16)
cpu.axpy(x, "gaussian", 1, 0, 1.0, [(2, 1e-3)])
t2 = time.perf_counter()
cpu.axpy(x[:1000], "gaussian", 1, 0, 1.0, [(2, 1e-3)])
t3 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f}")
"""


def cold_compile_seconds() -> tuple[float, float] | None:
    """(parallel, serial) first-call seconds in a fresh interpreter with an empty numba cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), env.get("PYTHONPATH")]))
        try:
            res = subprocess.run(
                [sys.executable, "-c", COLD_SNIPPET], env=env, capture_output=True, text=True, check=True, timeout=600
            )
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"cold compile measurement failed: {exc}", file=sys.stderr)
            return None
        _, par, ser = (float(v) for v in res.stdout.split())
        return par, ser


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--elements",
        type=int,
        default=DEFAULT_ELEMENTS,
        help=f"total float32 parameters (default {DEFAULT_ELEMENTS}, SmolLM-135M-like)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions per row (median reported)")
    ap.add_argument("--skip-reference", action="store_true", help="skip the slow zotune reference backend")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument(
        "--no-cold-compile", action="store_true", help="skip measuring the cold JIT compile time in a subprocess"
    )
    args = ap.parse_args(argv)
    if args.elements <= 0 or args.repeats <= 0:
        ap.error("--elements and --repeats must be positive")

    sys.path.insert(0, str(HERE.parent / "src"))
    from zotune import kernels, rng

    shapes = make_shapes(args.elements)
    params = [torch.randn(shape) * 0.02 for _, shape in shapes]
    others = [torch.randn(shape) for _, shape in shapes]
    keys = [rng.param_key(name) for name, _ in shapes]
    print(
        f"{len(params)} tensors, {args.elements:,} float32 elements ({args.elements * 4 / 2**20:.0f} MiB), "
        f"torch threads {torch.get_num_threads()}"
    )

    rows: list[tuple[str, float, float, int]] = []  # label, median, min, repetitions
    notes: list[str] = []

    def bench(label: str, fn, repeats: int = args.repeats, warmup: bool = True) -> None:
        if warmup:
            fn()
        times = timed(fn, repeats)
        rows.append((label, statistics.median(times), min(times), repeats))
        med = statistics.median(times)
        print(f"  {label:<46s} {med:8.4f} s  (min {min(times):.4f}, n={repeats})", flush=True)

    def reference_style():
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype)
            p.data = p.data + EPS * z

    bench("reference-style (torch.normal + out-of-place)", reference_style)

    if not args.skip_reference:
        ref = kernels.get("reference")
        step = 2**20

        def zotune_reference():
            for p, key in zip(params, keys):
                flat = p.view(-1)
                for off in range(0, flat.numel(), step):
                    ref.axpy(flat[off : off + step], "gaussian", key, off, 1.0, [(SEED, EPS)])

        bench("zotune reference backend, Gaussian", zotune_reference, repeats=1, warmup=False)

    try:
        import numba

        from zotune.kernels import cpu
    except ImportError as exc:
        cpu = None
        notes.append(f"numba backend unavailable: {exc}")
        print(notes[-1])

    if cpu is not None:
        if not args.no_cold_compile:
            cold = cold_compile_seconds()
            if cold is not None:
                notes.append(
                    f"numba cold compile (empty cache, fresh interpreter): parallel kernel "
                    f"{cold[0]:.2f} s, serial kernel {cold[1]:.2f} s (first call of each; "
                    f"later processes load the cache)"
                )
                print(notes[-1])

        def numba_sweep(distribution, terms):
            def run():
                for p, key in zip(params, keys):
                    cpu.axpy(p.view(-1), distribution, key, 0, 1.0, terms)

            return run

        for label, dist, terms in [
            ("zotune numba, Gaussian", "gaussian", [(SEED, EPS)]),
            ("zotune numba, Gaussian, 2 terms (fused)", "gaussian", [(SEED, -2 * EPS), (SEED + 1, EPS)]),
            ("zotune numba, Gaussian-fast", "gaussian-fast", [(SEED, EPS)]),
            ("zotune numba, Gaussian-fast, 2 terms (fused)", "gaussian-fast", [(SEED, -2 * EPS), (SEED + 1, EPS)]),
            ("zotune numba, Rademacher", "rademacher", [(SEED, EPS)]),
        ]:
            fn = numba_sweep(dist, terms)
            t0 = time.perf_counter()
            fn()  # warm-up: compiles or loads the numba cache
            first = time.perf_counter() - t0
            notes.append(f"{label}: first sweep in this process {first:.2f} s (includes cache load/compile)")
            bench(label, fn, warmup=False)
        notes.append(
            f"numba {numba.__version__}, threading layer {numba.threading_layer()}, {numba.get_num_threads()} threads"
        )

    def copy_floor():
        for p, q in zip(params, others):
            p.copy_(q)

    def add_floor():
        for p, q in zip(params, others):
            p.add_(q, alpha=EPS)

    bench("floor: p.copy_(q)", copy_floor)
    bench("floor: p.add_(q, alpha=eps)", add_floor)

    copy_t = next(t for label, t, _, _ in rows if label.startswith("floor: p.copy_"))
    refstyle_t = rows[0][1]
    header = "| sweep | median s | min s | reps | x copy | x reference-style |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for label, med, mn, reps in rows:
        ratios = f"{med / copy_t:.2f} | {med / refstyle_t:.3f}"
        lines.append(f"| {label} | {med:.4f} | {mn:.4f} | {reps} | {ratios} |")
    table = "\n".join(lines)
    print()
    print(table)
    for note in notes:
        print(f"- {note}")

    if not args.no_append:
        import numpy

        try:
            import numba as _nb

            numba_version = _nb.__version__
        except ImportError:
            numba_version = "not installed"
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = shlex.join([Path(sys.executable).name, *sys.argv])
        section = [
            "",
            f"## {stamp}: one +eps sweep over {args.elements:,} float32 parameters ({len(params)} tensors)",
            "",
            f"- machine: {platform.platform()}, {cpu_model()}, os.cpu_count()={os.cpu_count()}",
            f"- torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba_version}, "
            f"numpy {numpy.__version__}, Python {platform.python_version()}",
            f"- command: `{command}`",
            *[f"- {note}" for note in notes],
            "",
            table,
            "",
        ]
        if not RESULTS.exists():
            RESULTS.write_text("# zotune benchmark results\n")
        with RESULTS.open("a") as fh:
            fh.write("\n".join(section))
        print(f"\nappended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
