"""Time one MeZO step against its floor and its physical limit, on an OPT-style model with random weights.

In one run, on one model (built from an OPT config with random weights: step time and memory do not
depend on the weights' values), this measures side by side:

- forward: one forward pass with the loss (``model(input_ids, labels=input_ids).loss``, no grad);
- floor: two forward passes (what any two-point zeroth-order step must spend);
- copy bandwidth: ``dst.copy_(src)`` on a buffer of up to 1 GiB, and from it the *copy sweep*: the
  time to read and write every trainable weight once at that bandwidth;
- physical limit: two forward passes + two copy sweeps (a step must change every weight twice:
  +eps z -> -eps z, then restore + update + next perturbation fused into one pass);
- reference-style step: what the MeZO reference code does, per parameter
  ``z = torch.normal(0, 1, p.size(), dtype=p.dtype)`` from the global generator re-seeded each
  time and ``p.data = p.data + s * z * eps`` out of place, four regenerations of z per step
  (+eps, -2eps, +eps restore, update);
- zotune step: ``zotune.MeZO(model.named_parameters(), fuse_next=True).step(closure)`` (two sweeps
  per step after the first), on the default backend for the device (Triton on CUDA, numba on CPU);
- one sweep of each kind over all weights: Gaussian +eps (one term), Gaussian fused restore +
  update + next perturbation (two terms), Rademacher one term; the two Gaussian sweeps and the zotune step
  again on ``gaussian-fast`` z (issue 19's second Gaussian), in the same round robin;
- peak memory of inference, of the reference-style step and of the zotune step (CUDA: the
  allocator's peak; CPU: the process's peak resident set, reset with /proc/self/clear_refs);
- a backprop Adam step where it fits (CUDA fp16/bf16: float32 master weights under autocast;
  float32: plain), run last on its own copy of the model.

Times are the best of --repeats after a warm-up (medians are printed next to them); the rows are
timed round-robin, one call of each per round, so that other load on a shared machine hits them alike. Ratios are printed and, unless --no-append,
appended as a dated markdown section (machine, versions, command) to benchmarks/RESULTS.md (or --results).

With --more-sweeps more sweeps are timed: the per-tensor path (one ``sweep_`` per tensor, as
layerwise scales issue them) and a four-term sweep (n-SPSA's update, FZOO's N-term update), the two
paths that do not take the one-launch multi-tensor sweep, and Sparse-MeZO's masked sweep and its
masks (sparsity 0.75), which run per tensor (a chunked pass of the backend's masked kernel). With --kernel-time (CUDA) each sweep and
the step is run once more under torch.profiler: the kernels' summed device time, the number of
kernel launches and of host-to-device copies are printed beside the wall time, so host work (Python,
launches, copies) and kernel work can be told apart.

    python benchmarks/step.py --size 13b --batch 16 --seq 64 --dtype float16           # on an H100
    python benchmarks/step.py --size 125m --device cpu --dtype float32 --batch 4 --seq 32
    python benchmarks/step.py --size smollm2-135m --dtype float32 --batch 16 --seq 64   # the default model's shapes
    python benchmarks/step.py --size 125m --dtype float32 --kernel-time --more-sweeps --results /tmp/rows.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
EPS = 1e-3
LR = 1e-6

# OPT family shapes (Zhang et al., 2022, Table 1): hidden size, layers, heads, FFN size
SIZES = {
    "125m": (768, 12, 12, 3072),
    "350m": (1024, 24, 16, 4096),
    "1.3b": (2048, 24, 32, 8192),
    "2.7b": (2560, 32, 32, 10240),
    "6.7b": (4096, 32, 32, 16384),
    "13b": (5120, 40, 40, 20480),
    "30b": (7168, 48, 56, 28672),
}
# SmolLM2-135M (the embedded default): a Llama with grouped-query attention; hidden, layers, heads, FFN size,
# key/value heads, vocabulary. Random weights of its shapes, to set the real model's step beside OPT's.
SMOLLM2 = {"smollm2-135m": (576, 30, 9, 1536, 3, 49152)}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_model(size: str, dtype: torch.dtype, device: torch.device):
    """An OPTForCausalLM (or, for ``smollm2-135m``, a LlamaForCausalLM of SmolLM2's shapes) with random
    weights, built directly in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    if size in SMOLLM2:
        hidden, layers, heads, ffn, kv_heads, vocab = SMOLLM2[size]
        config = LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=ffn,
            vocab_size=vocab,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        cls = LlamaForCausalLM
    else:
        hidden, layers, heads, ffn = SIZES[size]
        config = OPTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=ffn,
            word_embed_proj_dim=hidden,
            max_position_embeddings=2048,
            vocab_size=50272,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
        cls = OPTForCausalLM
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _title(size: str) -> str:
    return "SmolLM2-135M shapes" if size in SMOLLM2 else f"OPT-{size}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, repeats: int, warmup: int = 1) -> float:
    """Seconds of ``fn()``: the best of ``repeats`` calls after ``warmup`` calls (medians go to MEDIANS).

    The best, not the median, feeds the ratios: on a shared machine other work only ever adds time.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    MEDIANS[fn] = statistics.median(times)
    return min(times)


MEDIANS: dict = {}


def round_robin(fns: dict, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """{name: (best seconds, median seconds)}: every fn warmed up, then called once per round, in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


class Peak:
    """Peak memory of a phase, in bytes: CUDA allocator peak, or the CPU process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def _rss_peak(self) -> int:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def read(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            return self._rss_peak()
        except (OSError, AttributeError):
            return None

    def measure(self, fn) -> int | None:
        self.reset()
        fn()
        sync(self.device)
        return self.read()


def reference_style_step(params, closure, seed: int) -> float:
    """One step as the MeZO reference code does it: four regenerations of z, out-of-place updates."""

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * EPS

    with torch.no_grad():
        perturb(1)
        loss1 = closure()
        perturb(-2)
        loss2 = closure()
        g = ((loss1 - loss2) / (2 * EPS)).item()
        perturb(1)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data - LR * (g * z)
    return g


def copy_seconds_per_byte(device: torch.device, dtype: torch.dtype, total_bytes: int, repeats: int) -> float:
    """Seconds per byte of ``dst.copy_(src)`` (each byte read once and written once)."""
    nbytes = min(total_bytes, 1 << 30)
    n = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, repeats=max(repeats, 5))
    seconds = t / (n * src.element_size())
    del src, dst
    return seconds


def kernel_profile(fn, device: torch.device) -> dict | None:
    """{kernel_ms, kernels, h2d, syncs} of one call of ``fn`` under torch.profiler (CUDA only), else None.

    kernel_ms sums the device time of the kernels (memory copies excluded); h2d counts host-to-device
    copies (a launch table rebuilt and uploaded shows here); syncs counts the runtime calls that make
    the host wait (stream/device/event synchronise, and the blocking cudaMemcpy).
    """
    if device.type != "cuda":
        return None
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        kernel_us, kernels, h2d, syncs = 0.0, 0, 0, 0
        for e in prof.events():
            name = e.name
            if e.device_type == DeviceType.CUDA:
                if "memcpy" in name.lower() or "memset" in name.lower():
                    h2d += "htod" in name.lower().replace(" ", "")
                else:
                    kernel_us += e.time_range.elapsed_us()
                    kernels += 1
            elif name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"):
                syncs += 1
        # the closing torch.cuda.synchronize() above is the measurement's own (cudaDeviceSynchronize): not counted
        return {"kernel_ms": kernel_us / 1e3, "kernels": kernels, "h2d": h2d, "syncs": max(0, syncs - 1)}
    except Exception as exc:  # the profiler is a diagnostic: a failure must not lose the run's timings
        print(f"kernel profile failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def backprop_step_fits(n_params: int, dtype: torch.dtype, device: torch.device, model_bytes: int) -> bool:
    need = 16 * n_params + model_bytes // 2  # fp32 weights, grads, Adam m and v, plus activations' headroom
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.9 * free
    try:
        import psutil

        return need < 0.8 * psutil.virtual_memory().available
    except ImportError:  # pragma: no cover
        return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--size",
        choices=sorted(SIZES) + sorted(SMOLLM2),
        default="125m",
        help="OPT model size, or smollm2-135m (SmolLM2's shapes)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64, help="sequence length (tokens)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stochastic-rounding", action="store_true", help="zotune: stochastic rounding in the update")
    ap.add_argument("--skip-backprop", action="store_true")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the markdown file the section is appended to")
    ap.add_argument(
        "--more-sweeps",
        action="store_true",
        help="also time the per-tensor sweep path (layerwise) and a four-term sweep (n-SPSA, FZOO)",
    )
    ap.add_argument(
        "--kernel-time",
        action="store_true",
        help="CUDA: profile each sweep and the step once; kernel time, launches, copies and syncs",
    )
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE.parent / "src"))
    import zotune
    from zotune import kernels, rng
    from zotune.optim import functional as F

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    peak = Peak(device)
    peak.reset()
    base_mem = peak.read()

    model = build_model(args.size, dtype, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    n_params = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    backend = kernels.select(device).name
    ids = torch.randint(
        0,
        model.config.vocab_size,
        (args.batch, args.seq),
        device=device,
        generator=torch.Generator(device=device).manual_seed(0),
    )

    def closure():
        return model(input_ids=ids, labels=ids).loss

    print(
        f"{_title(args.size)}: {n_params / 1e6:.1f}M parameters ({weight_bytes / 2**30:.2f} GiB {args.dtype}), "
        f"batch {args.batch}, seq {args.seq}, {device}, zotune backend {backend}",
        flush=True,
    )
    rows: list[tuple[str, float, float]] = []  # (name, best seconds, median seconds)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    # copy bandwidth on a scratch buffer, freed before anything else is timed
    spb = copy_seconds_per_byte(device, dtype, weight_bytes, args.repeats)
    copy_sweep = spb * weight_bytes
    print(f"copy {2 / spb / 1e9:.1f} GB/s (read + write); copy sweep {copy_sweep * 1e3:.2f} ms", flush=True)

    # one sweep of each kind, on the default backend (weights drift by a few eps: harmless for timing)
    keys = [rng.param_key(n) for n, _ in named]
    opt = zotune.MeZO(
        model.named_parameters(), lr=LR, eps=EPS, seed=0, fuse_next=True, stochastic_rounding=args.stochastic_rounding
    )
    # the same step on gaussian-fast z (issue 19's second Gaussian), timed in the same round robin
    opt_fast = zotune.MeZO(
        model.named_parameters(),
        lr=LR,
        eps=EPS,
        seed=1,
        fuse_next=True,
        stochastic_rounding=args.stochastic_rounding,
        distribution="gaussian-fast",
    )

    def forward():
        with torch.no_grad():
            closure()

    timed = {  # timed round-robin, so that other load on a shared machine hits every row alike
        "forward": forward,
        "sweep: Gaussian +eps (1 term)": lambda: F.sweep_(params, keys, [(1, EPS)]),
        "sweep: Gaussian restore+update+next (2 terms)": lambda: F.sweep_(
            params, keys, [(1, -EPS), (2, EPS)], rounding_seed=3 if args.stochastic_rounding else None
        ),
        "sweep: Rademacher +eps (1 term)": lambda: F.sweep_(params, keys, [(1, EPS)], distribution="rademacher"),
        "sweep: Gaussian-fast +eps (1 term)": lambda: F.sweep_(params, keys, [(1, EPS)], distribution="gaussian-fast"),
        "sweep: Gaussian-fast restore+update+next (2 terms)": lambda: F.sweep_(
            params,
            keys,
            [(1, -EPS), (2, EPS)],
            distribution="gaussian-fast",
            rounding_seed=3 if args.stochastic_rounding else None,
        ),
        "zotune MeZO step (fuse_next)": lambda: opt.step(closure),
        "zotune MeZO step (fuse_next, gaussian-fast)": lambda: opt_fast.step(closure),
    }
    if args.more_sweeps:

        def per_tensor():
            for p, key in zip(params, keys):
                F.sweep_([p], [key], [(1, EPS)])

        timed["sweep: Gaussian +eps, one sweep_ per tensor (layerwise path)"] = per_tensor
        timed["sweep: Gaussian 4 terms (n-SPSA / FZOO update path)"] = lambda: F.sweep_(
            params,
            keys,
            [(1, -EPS), (2, EPS), (3, -EPS), (4, EPS)],
            rounding_seed=3 if args.stochastic_rounding else None,
        )
        # Sparse-MeZO (sparsity 0.75): a step computes its masks once, then sweeps along m z three times
        masks = [F.magnitude_mask(p, 0.75) if p.dim() >= 2 else None for p in params]
        timed["sweep: Gaussian +eps masked (Sparse-MeZO, 1 term)"] = lambda: F.sweep_(
            params, keys, [(1, EPS)], masks=masks
        )
        timed["Sparse-MeZO masks (every matrix, from its weights)"] = lambda: [
            F.magnitude_mask(p, 0.75) if p.dim() >= 2 else None for p in params
        ]
    best = round_robin(timed, device, args.repeats)
    for name, (t, m) in best.items():
        rows.append((name, t, m))
        print(f"{name}: best {t * 1e3:.2f} ms, median {m * 1e3:.2f} ms", flush=True)
    t_fwd = best["forward"][0]
    t_sweeps = {name: t for name, (t, _) in best.items()}
    t_zo = best["zotune MeZO step (fuse_next)"][0]
    t_fast = best["zotune MeZO step (fuse_next, gaussian-fast)"][0]
    profiles = {}
    if args.kernel_time:
        for name, fn in timed.items():
            pr = kernel_profile(fn, device) if name != "forward" else None
            if pr:
                profiles[name] = pr
                print(
                    f"{name}: kernels {pr['kernel_ms']:.2f} ms in {pr['kernels']} launches, "
                    f"{pr['h2d']} host-to-device copies, {pr['syncs']} syncs",
                    flush=True,
                )
    floor = 2 * t_fwd
    limit = floor + 2 * copy_sweep

    # the reference-style step reallocates every weight (p.data = ...): timed after the others, with
    # a forward pass between its steps that gives a floor measured under the same conditions
    ref = round_robin(
        {
            "reference-style MeZO step": lambda: reference_style_step(params, closure, seed=1234),
            "forward (next to the reference-style steps)": forward,
        },
        device,
        args.repeats,
    )
    t_ref, m_ref = ref["reference-style MeZO step"]
    rows.append(("reference-style MeZO step", t_ref, m_ref))
    rows.append(("forward (next to the reference-style steps)", *ref["forward (next to the reference-style steps)"]))
    print(f"reference-style step best {t_ref * 1e3:.2f} ms", flush=True)

    # peak memory (weights included)
    with torch.no_grad():
        mem_inf = peak.measure(closure)
    mem_ref = peak.measure(lambda: reference_style_step(params, closure, seed=99))
    mem_zo = peak.measure(lambda: opt.step(closure))
    mems = {"inference": mem_inf, "reference-style MeZO": mem_ref, "zotune MeZO": mem_zo}

    # backprop Adam step on its own copy of the model (run last: it needs the memory)
    t_bp = None
    del opt, opt_fast
    model_bytes = weight_bytes
    del model, params, named
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_backprop and backprop_step_fits(n_params, dtype, device, model_bytes):
        model = build_model(args.size, torch.float32, device).train()
        adam = torch.optim.Adam(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def backprop_step():
            with amp:
                loss = model(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            scaler.step(adam)
            scaler.update()
            adam.zero_grad(set_to_none=True)

        backprop_step()  # allocates Adam's state
        t_bp = timeit(backprop_step, device, args.repeats)
        rows.append(
            (
                "backprop Adam step" + (f" (fp32 master, {args.dtype} autocast)" if dtype != torch.float32 else ""),
                t_bp,
                MEDIANS[backprop_step],
            )
        )
        mems["backprop Adam"] = peak.measure(backprop_step)
        del model, adam
    elif not args.skip_backprop:
        print("backprop Adam step: does not fit, skipped", flush=True)

    ratios = [
        ("physical limit / floor (2 x forward)", limit / floor),
        ("reference-style step / floor", t_ref / floor),
        ("reference-style step / physical limit", t_ref / limit),
        ("zotune step / floor", t_zo / floor),
        ("zotune step / physical limit (target <= 1.1)", t_zo / limit),
        ("reference-style step / zotune step (speed-up)", t_ref / t_zo),
        ("Gaussian 1-term sweep / copy sweep (target <= 1.5)", t_sweeps["sweep: Gaussian +eps (1 term)"] / copy_sweep),
        ("Gaussian 2-term sweep / copy sweep", t_sweeps["sweep: Gaussian restore+update+next (2 terms)"] / copy_sweep),
        (
            "Rademacher 1-term sweep / copy sweep (target <= 1.05)",
            t_sweeps["sweep: Rademacher +eps (1 term)"] / copy_sweep,
        ),
        ("zotune step, gaussian-fast / physical limit", t_fast / limit),
        (
            "Gaussian-fast 1-term sweep / copy sweep (target <= 1.5)",
            t_sweeps["sweep: Gaussian-fast +eps (1 term)"] / copy_sweep,
        ),
        (
            "Gaussian-fast 2-term sweep / copy sweep (target <= 2)",
            t_sweeps["sweep: Gaussian-fast restore+update+next (2 terms)"] / copy_sweep,
        ),
    ]
    for name in (
        "sweep: Gaussian +eps, one sweep_ per tensor (layerwise path)",
        "sweep: Gaussian 4 terms (n-SPSA / FZOO update path)",
        "sweep: Gaussian +eps masked (Sparse-MeZO, 1 term)",
        "Sparse-MeZO masks (every matrix, from its weights)",
    ):
        if name in t_sweeps:
            ratios.append((f"{name.removeprefix('sweep: ')} / copy sweep", t_sweeps[name] / copy_sweep))
    for name, pr in profiles.items():
        if pr["kernel_ms"] > 0:
            ratios.append((f"{name}: wall / kernel time", t_sweeps[name] / (pr["kernel_ms"] / 1e3)))
            if name.startswith("sweep"):
                ratios.append((f"{name}: kernel time / copy sweep", pr["kernel_ms"] / 1e3 / copy_sweep))
    if t_bp is not None:
        ratios.append(("backprop Adam step / zotune step", t_bp / t_zo))
    if mem_inf:
        for name in ("reference-style MeZO", "zotune MeZO", "backprop Adam"):
            if mems.get(name):
                target = " (target <= 1.01)" if name == "zotune MeZO" else ""
                ratios.append((f"peak memory {name} / inference{target}", mems[name] / mem_inf))

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {stamp}: MeZO step, {_title(args.size)} ({n_params / 1e6:.1f}M parameters), {args.dtype}, "
        f"batch {args.batch}, seq {args.seq}, {device.type}",
        "",
    ]
    lines.append(f"- machine: {_machine(device)}")
    lines.append(f"- {_versions(backend)}")
    lines.append(f"- command: `python benchmarks/step.py {shlex.join(argv if argv is not None else sys.argv[1:])}`")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(
        f"- 1-minute load average before / after the run: {load_before:.2f} / {load_after:.2f} "
        f"(on {os.cpu_count()} CPUs; times are the best of {args.repeats} after a warm-up)"
    )
    lines.append(
        f"- copy bandwidth (dst.copy_(src), read + write counted once each): {2 / spb / 1e9:.1f} GB/s; "
        f"copy sweep over the weights {copy_sweep * 1e3:.2f} ms"
    )
    mem_note = "allocator peak" if device.type == "cuda" else "process peak RSS, reset per phase"
    lines.append(
        f"- peak memory ({mem_note}): "
        + ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in mems.items() if v)
        + (f" (process baseline before the model {base_mem / 2**30:.3f} GiB)" if base_mem else "")
    )
    lines += ["", "| measurement | best ms | median ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {t * 1e3:.2f} | {m * 1e3:.2f} |" for name, t, m in rows]
    lines += [
        f"| floor: 2 x forward | {floor * 1e3:.2f} | |",
        f"| physical limit: 2 x forward + 2 copy sweeps | {limit * 1e3:.2f} | |",
    ]
    if profiles:
        lines += [
            "",
            "Kernel time (torch.profiler, one call after a warm-up; launches, host-to-device copies and "
            "host syncs counted in that call):",
            "",
            "| measurement | wall best ms | kernel ms | launches | H2D copies | syncs |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {t_sweeps[name] * 1e3:.2f} | {pr['kernel_ms']:.2f} | {pr['kernels']} | {pr['h2d']} | "
            f"{pr['syncs']} |"
            for name, pr in profiles.items()
        ]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in ratios]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if not args.no_append:
        with args.results.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {args.results}")
    return 0


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    text = f"{platform.platform()}, {cpu}, os.cpu_count()={os.cpu_count()}, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def _versions(backend: str) -> str:
    parts = [f"torch {torch.__version__}", f"Python {platform.python_version()}", f"zotune backend {backend}"]
    for name in ("transformers", "triton", "numba"):
        with contextlib.suppress(Exception):
            parts.append(f"{name} {__import__(name).__version__}")
    return ", ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
