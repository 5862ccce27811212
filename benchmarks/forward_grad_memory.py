"""Peak memory of the forward-gradient step next to inference, MeZO and backprop, on a random Llama.

One run measures, for each workload (batch x sequence length), on the same randomly initialised
Llama built from a config (about 34M parameters by default, float32, CPU):

- inference: ``model(input_ids, labels=input_ids).loss`` under ``torch.no_grad()`` (default
  attention kernel), and the same with the unfused math attention kernel, which is the one the
  forward-gradient step must use (the fused kernels have no forward-mode derivative);
- MeZO: one ``zotune.MeZO(...).step(closure)`` (default sweep backend);
- forward gradient: one ``zotune.optim.forward_grad.ForwardGradient(...).step(closure, model=model)``;
- backprop: ``loss.backward()`` then a plain SGD update (no optimizer state, the cheapest backprop
  step there is).

How memory is measured, and why this way. torch's CPU tensors come from ``malloc``, which
``tracemalloc`` does not see, so the measure is the process's resident set. Each measurement runs in
a fresh subprocess: build the model and the batch, run the measured operation once as a warm-up
(JIT compilation, thread pools, lazily allocated buffers), ``gc.collect()`` and ``malloc_trim(0)``,
then read the resident set (``steady``), reset the kernel's peak counter (``/proc/self/clear_refs``
= 5 sets VmHWM to the current RSS), run the operation once more and read VmHWM (``peak``). The
subprocess is started with ``MALLOC_MMAP_THRESHOLD_=65536``: every block of 64 KiB or more is its
own mapping, returned to the kernel when freed, so the resident set follows live tensors instead
of what the allocator keeps cached. The table reports the working memory ``peak - steady`` and the
total ``weights + (peak - steady)`` (weights = parameter bytes; the Python/torch runtime, the same
for every row, is left out), and the ratio of each to inference's.

    python benchmarks/forward_grad_memory.py                      # appends to benchmarks/RESULTS.md
    python benchmarks/forward_grad_memory.py --workloads 1x64 --no-append
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
MODES = ("inference", "inference-math-attention", "mezo", "forward-gradient", "backprop")
LABELS = {
    "inference": "inference (no_grad)",
    "inference-math-attention": "inference (no_grad, math attention)",
    "mezo": "MeZO step",
    "forward-gradient": "forward-gradient step (jvp)",
    "backprop": "backprop step (backward + SGD)",
}


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


def build(args):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seqs),
        tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(config).float().eval()


def child(args) -> dict:
    """Measure one mode in this (fresh) process; returns a JSON-able dict."""
    import torch

    from zotune import MeZO
    from zotune.optim.forward_grad import ForwardGradient

    model = build(args)
    batch, seq = args.batch, args.seq
    ids = torch.randint(0, args.vocab, (batch, seq), generator=torch.Generator().manual_seed(1))

    def closure():
        return model(input_ids=ids, labels=ids).loss

    if args.mode == "inference":

        def run():
            with torch.no_grad():
                closure()
    elif args.mode == "inference-math-attention":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
                closure()
    elif args.mode == "mezo":
        opt = MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0)

        def run():
            opt.step(closure)
    elif args.mode == "forward-gradient":
        opt = ForwardGradient(model.named_parameters(), lr=1e-6, seed=0)

        def run():
            opt.step(closure, model=model)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)

        def run():
            closure().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    run()  # warm-up: JIT compilation, thread pools, buffers allocated once
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    steady = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- the current RSS
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "mode": args.mode,
        "steady": steady,
        "peak": peak,
        "work": peak - steady,
        "weights": weights,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
    }


def measure(args, mode: str, batch: int, seq: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        *_model_args(args),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {batch}x{seq} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _model_args(args) -> list[str]:
    return [
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--ffn",
        str(args.ffn),
        "--layers",
        str(args.layers),
        "--heads",
        str(args.heads),
        "--workloads",
        ",".join(f"{b}x{s}" for b, s in args.workload_list),
    ]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="2x128,8x512", help="comma-separated BATCHxSEQ")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--child", dest="mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workload_list = [tuple(int(v) for v in w.lower().split("x")) for w in args.workloads.split(",")]
    args.seqs = [s for _, s in args.workload_list] + ([args.seq] if args.seq else [])
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.mode:
        print(json.dumps(child(args)))
        return 0
    mib = 2**20
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines, params = [], None
    load_before = os.getloadavg()[0]
    for batch, seq in args.workload_list:
        rows = {}
        for mode in MODES:
            rows[mode] = measure(args, mode, batch, seq)
            r = rows[mode]
            print(f"{batch}x{seq} {mode}: working {r['work'] / mib:.1f} MiB, {r['seconds']:.2f} s", flush=True)
        params = rows["inference"]["params"]
        inf = rows["inference"]
        lines += [
            "",
            f"Batch {batch} x {seq} tokens:",
            "",
            "| measurement | working memory MiB | x inference | weights + working MiB | x inference | step s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for mode in MODES:
            r = rows[mode]
            total, total_inf = r["weights"] + r["work"], inf["weights"] + inf["work"]
            lines.append(
                f"| {LABELS[mode]} | {r['work'] / mib:.1f} | {r['work'] / inf['work']:.2f} | "
                f"{total / mib:.1f} | {total / total_inf:.2f} | {r['seconds']:.2f} |"
            )
    import torch
    import transformers

    from zotune import kernels

    header = [
        f"## Forward gradient (jvp) memory ({stamp})",
        "",
        f"- model: random Llama from a config, {params / 1e6:.1f}M parameters, float32, CPU (vocab {args.vocab}, "
        f"hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, {args.heads} heads); weights "
        f"{params * 4 / mib:.1f} MiB",
        "- machine: 2-core AMD Zen 4 CPU, fp32 "
        f"({platform.platform()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, MeZO sweep backend {kernels.select('cpu').name})",
        f"- command: `{' '.join(['python benchmarks/forward_grad_memory.py', *map(shlex.quote, argv if argv is not None else sys.argv[1:])])}`",
        "- method: one fresh process per row; peak RSS (VmHWM, reset by /proc/self/clear_refs after a warm-up "
        "step, gc and malloc_trim) minus the RSS before the step = working memory; MALLOC_MMAP_THRESHOLD_=65536 "
        "so freed tensors leave the resident set; weights = parameter bytes; 'step s' is the one measured "
        "call's wall time (one run, not a speed benchmark)",
        f"- 1-minute load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs (the machine is shared: the times, not the memory, depend on it)",
    ]
    text = "\n".join(header + lines) + "\n"
    print()
    print(text)
    if not args.no_append:
        with RESULTS.open("a") as f:  # one append: others append to this file too
            f.write("\n" + text)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
