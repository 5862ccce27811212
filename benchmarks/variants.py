"""Steps (and forward passes, and seconds) each MeZO variant needs to reach a validation accuracy on SST-2.

Every variant is a named set of ``OptimConfig`` overrides on one base run: the embedded default model
(SmolLM2-135M-Instruct, all parameters, fp32), the bundled SST-2 sample, ``RunConfig()``'s defaults
(lr 5e-5, eps 1e-3, batch 16), --steps steps, validation on --validation examples every --eval-every
steps, no test split. Each runs through ``zotune.train.run`` from the same starting weights (the
model is loaded once and its parameters restored before each variant). The forward-gradient
estimator (``zotune.ForwardGradient``, paper Appendix D) is not reachable through the config: its
row comes from a loop here that uses train.run's batches (``_batch_indices``), objective, learning
rate schedule and validation, and writes the same metrics.jsonl / summary.json.

Rows: forward passes per step (2n two-sided, n + 1 one-sided; one jvp for the forward gradient),
the first evaluated step whose validation accuracy reaches --target (the resolution is
--eval-every), forward passes to that step (steps x passes per step: the fair cost for n-SPSA),
the loop's seconds to that step, the best validation accuracy and its step, the loop's wall time
(periodic validations included) and the median seconds per training step. The table is printed
and, unless --no-append, appended to benchmarks/RESULTS.md.

Adam's learning rate: zeroth-order Adam normalises by the root mean square of g z_i, which is about
|g| (the projected gradient, RMS ~12 in the default run) for every coordinate, not by a
per-coordinate gradient as first-order Adam does. Its expected step is therefore about
lr / rms(g) * grad, while MeZO's is lr * grad: 5e-4 / 12 ~ 4e-5 matches MeZO's 5e-5, and its
first step (lr per coordinate, norm 5e-4 * sqrt(d) ~ 5.8) is no larger than a typical MeZO step
(5e-5 * |g| * sqrt(d) ~ 4 at the median |g| of 7). The first-order habit of 1e-5 would move the
weights ~50x less than MeZO. Adam keeps m and v (state "stored"): the history form with a window
of 32 drops the older terms of v, which beta2 = 0.999 needs.

    PYTHONPATH=src python benchmarks/variants.py [--variants mezo,adam,...] [--steps 100] [--target 0.60]
        [--eval-every 25] [--validation 200] [--no-append] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
FORWARD_GRADIENT = "forward-gradient"
ADAM_LR = 5e-4  # see the module docstring
# param-norm multiplies tensor l's expected step by s_l^2 = ||theta_l||^2 / d_l, whose d-weighted mean is
# 0.033 on SmolLM2-135M (measured): lr 5e-5 / 0.033 keeps the mean step MeZO's
PARAM_NORM_LR = 1.5e-3

# name -> OptimConfig overrides (None: the forward-gradient loop of this script)
VARIANTS: dict[str, dict | None] = {
    "mezo": {},
    "rademacher": {"distribution": "rademacher"},
    "sphere": {"distribution": "sphere"},
    "one-sided": {"estimator": "one-sided"},
    "n-spsa-2": {"n_perturbations": 2},
    "momentum": {"variant": "momentum", "beta1": 0.9},
    "adam": {"variant": "adam", "lr": ADAM_LR, "state": "stored"},
    "layerwise": {"layerwise": "param-norm", "lr": PARAM_NORM_LR},
    "grad-norm": {"layerwise": "grad-norm"},
    "cosine": {"schedule": "cosine"},
    FORWARD_GRADIENT: None,
}


def passes_per_step(oc) -> int:
    """Forward passes (loss evaluations) of one step of the optimizer ``oc`` describes."""
    n = oc.n_perturbations if oc.n_schedule == "constant" else oc.n_perturbations_final
    return 2 * n if oc.estimator == "two-sided" else n + 1


def probe_passes(oc, n_layers: int, steps: int) -> int:
    """Forward passes of the gradient-norm variant's per-layer probes during the first ``steps`` steps."""
    if oc.layerwise != "grad-norm" or steps <= 0:
        return 0
    refreshes = 1 if oc.grad_norm_every == 0 else (steps - 1) // oc.grad_norm_every + 1
    return 2 * n_layers * oc.grad_norm_probes * refreshes


# -- the tiny model of --smoke ------------------------------------------------------------------
SMOKE_CORPUS = [
    "the movie was great and the acting was good",
    "a terrible film , it was bad and boring",
    "It was great",
    "It was terrible",
    "the story is a fine , funny and moving one",
    "an awful , dull and tedious mess",
    "one of the best films of the year",
    "the worst film",
]


def build_tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama and a byte-level BPE tokenizer (" great", " terrible" single tokens)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SMOKE_CORPUS * 3, trainer)
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- runs ---------------------------------------------------------------------------------------
def base_config(args, model_name: str | None):
    from zotune.config import RunConfig

    config = RunConfig()
    config.train.init = "none"  # the variants from the model as loaded (one loaded model is restored between them)
    if model_name is not None:
        config.model.name = model_name
    config.task.validation = args.validation
    config.task.test = 0
    if args.train is not None:
        config.task.train = args.train
    config.train.steps = args.steps
    config.train.eval_every = args.eval_every
    config.train.zero_shot = False  # evaluated once, before the variants
    config.train.progress = False
    if args.batch_size is not None:
        config.train.batch_size = args.batch_size
    return config


def variant_config(base, overrides: dict, run_dir: Path):
    import copy
    import dataclasses

    from zotune.config import OptimConfig

    config = copy.deepcopy(base)
    config.optimizer = OptimConfig(**{**dataclasses.asdict(base.optimizer), **overrides})
    config.train.output_dir = str(run_dir)
    return config


def run_forward_gradient(config, prepared, run_dir: Path, log) -> None:
    """train.run's loop with zotune.ForwardGradient: same batches, objective, schedule and validation."""
    import torch

    from zotune import ForwardGradient, checkpoint
    from zotune.objectives import evaluate
    from zotune.train import _batch_indices, schedule_factor

    tc, oc = config.train, config.optimizer
    model, objective, encoded = prepared.loaded.model, prepared.objective, prepared.encoded
    metric = objective.metric_name
    run_dir.mkdir(parents=True, exist_ok=True)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = ForwardGradient(
        trainable,
        lr=oc.lr,
        weight_decay=oc.weight_decay,
        seed=oc.seed,
        distribution=oc.distribution if oc.distribution != "sphere" else "gaussian",
        on_nonfinite="skip",
        trajectory=run_dir / "trajectory.zot",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule_factor(s, tc.steps, oc.schedule, oc.warmup_steps))
    best, skipped = None, 0
    log(f"run directory {run_dir}")
    started = time.perf_counter()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, tc.steps + 1):
            idx = _batch_indices(len(encoded["train"]), tc.batch_size, step - 1, config.task.seed)
            batch = [encoded["train"][i] for i in idx]
            loss = float(opt.step(lambda: objective.loss(model, batch, tc.forward_chunks), model=model))
            skipped += int(not math.isfinite(loss))
            lr = opt.param_groups[0]["lr"]
            sched.step()
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": loss,
                        "projected_grad": opt.projected_grad,
                        "lr": lr,
                        "elapsed": time.perf_counter() - started,
                    }
                )
                + "\n"
            )
            if step % tc.eval_every == 0 or step == tc.steps:
                val = evaluate(objective, model, encoded["validation"], tc.eval_batch_size)
                f.write(json.dumps({"step": step, **{f"validation_{k}": v for k, v in val.items()}}) + "\n")
                if best is None or val[metric] > best["metric"]:
                    best = {"step": step, "metric": val[metric], "metrics": val}
            f.flush()
    elapsed = time.perf_counter() - started
    checkpoint.write_json(
        run_dir / "summary.json",
        {
            "task": config.task.name,
            "model": prepared.loaded.source,
            "metric": metric,
            "zero_shot": {},
            "best_validation": best,
            "test": {},
            "steps": tc.steps,
            "skipped_steps": skipped,
            "wall_time_s": round(elapsed, 1),
            "estimator": FORWARD_GRADIENT,
        },
    )


def read_run(run_dir: Path, target: float) -> dict:
    """What the table needs, from a run directory's metrics.jsonl and summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metric = summary["metric"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = {r["step"]: r["elapsed"] for r in rows if "elapsed" in r}
    evals = [(r["step"], r[f"validation_{metric}"]) for r in rows if f"validation_{metric}" in r]
    eval_steps = {s for s, _ in evals}
    # a step's time is the difference of consecutive "elapsed"; after a validation it holds that too
    deltas = [elapsed[s] - elapsed.get(s - 1, 0.0) for s in sorted(elapsed) if s - 1 not in eval_steps]
    reached = next(((s, v) for s, v in evals if v >= target), None)
    best = summary.get("best_validation") or {}
    return {
        "metric": metric,
        "steps": summary["steps"],
        "evals": evals,
        "target_step": reached[0] if reached else None,
        "target_seconds": elapsed.get(reached[0]) if reached else None,
        "best": best.get("metric"),
        "best_step": best.get("step"),
        "wall_s": summary["wall_time_s"],
        "s_per_step": statistics.median(deltas) if deltas else float("nan"),
        "skipped": summary.get("skipped_steps", 0),
    }


def restore(model, snapshot: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(snapshot[name])


# -- the table ----------------------------------------------------------------------------------
def describe(name: str, overrides: dict | None) -> str:
    if overrides is None:
        return "zotune.ForwardGradient (jvp), lr as MeZO"
    if not overrides:
        return "defaults"
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def table(results: list[dict], target: float) -> list[str]:
    pct = f"{100 * target:g}%"
    mezo = next((r for r in results if r["name"] == "mezo"), None)
    lines = [
        f"| variant | overrides | forward passes / step | steps to {pct} | forward passes to {pct} "
        f"| s to {pct} | best val acc (step) | wall s | s / step |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["passes"] is None:  # forward gradient: one jvp; its cost in forwards measured against MeZO's step
            ratio = (
                f" (~{2 * r['s_per_step'] / mezo['s_per_step']:.1f} fwd by time)"
                if mezo and mezo["s_per_step"] > 0
                else ""
            )
            passes = f"1 jvp{ratio}"
        else:
            passes = str(r["passes"]) + (f" (+{r['probe_passes']} layer probes)" if r.get("probe_passes") else "")
        if r["target_step"] is None:
            steps = f"not reached in {r['steps']}"
            fwd = seconds = "-"
        else:
            steps = str(r["target_step"])
            fwd = (
                f"{r['target_step']} jvp"
                if r["passes"] is None
                else str(r["target_step"] * r["passes"] + r.get("target_probe_passes", 0))
            )
            seconds = f"{r['target_seconds']:.0f}"
        best = "-" if r["best"] is None else f"{100 * r['best']:.1f} ({r['best_step']})"
        lines.append(
            f"| {r['name']} | {r['overrides']} | {passes} | {steps} | {fwd} | {seconds} | {best} "
            f"| {r['wall_s']:.1f} | {r['s_per_step']:.2f} |"
        )
    return lines


def threads() -> str:
    import torch

    return os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of: {', '.join(VARIANTS)} (default: all)",
    )
    ap.add_argument("--steps", type=int, default=100, help="steps per variant")
    ap.add_argument("--eval-every", type=int, default=25, help="validate every this many steps")
    ap.add_argument("--validation", type=int, default=200, help="validation examples")
    ap.add_argument("--target", type=float, default=0.60, help="target validation accuracy (a fraction)")
    ap.add_argument("--train", type=int, default=None, help="training examples (default: the task protocol's)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: RunConfig's (16)")
    ap.add_argument("--out", default=None, help="folder for the run directories (default runs/variants-<date>)")
    ap.add_argument("--machine", default="2-core AMD Zen 4 CPU", help="how RESULTS.md names the machine")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny random Llama, 4 steps, 16 validation examples, in a temporary folder (never appended)",
    )
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"unknown variants {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.smoke:
        args.steps, args.eval_every, args.validation = 4, 2, 16
        args.train = args.train or 32
        args.batch_size = args.batch_size or 4
    if min(args.steps, args.eval_every, args.validation) < 1 or not 0 < args.target <= 1:
        ap.error("--steps, --eval-every and --validation must be >= 1, --target in (0, 1]")

    sys.path.insert(0, str(HERE.parent / "src"))
    import torch

    from zotune.models import load_model
    from zotune.objectives import evaluate
    from zotune.optim.variants import layer_groups
    from zotune.train import prepare, run

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with contextlib.ExitStack() as stack:
        model_name = None
        if args.smoke:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zotune-variants-")))
            model_name = str(build_tiny_model(tmp / "tiny-llama"))
            out = tmp / "runs"
        else:
            out = Path(args.out or f"runs/variants-{time.strftime('%Y%m%d-%H%M%S')}")
        if out.exists() and any(out.iterdir()):
            ap.error(f"{out} is not empty: choose another --out")
        base = base_config(args, model_name)

        def logger(prefix):
            return lambda message: print(f"[{prefix}] {message}", flush=True)

        t0 = time.perf_counter()
        loaded = load_model(base.model, log=logger("load"))
        prepared = prepare(base, log=logger("load"), loaded=loaded)
        model = prepared.loaded.model
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        print(
            f"[load] {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}; "
            + ", ".join(f"{len(prepared.encoded[s])} {s}" for s in ("train", "validation")),
            flush=True,
        )
        t0 = time.perf_counter()
        zero_shot = evaluate(prepared.objective, model, prepared.encoded["validation"], base.train.eval_batch_size)
        metric = prepared.objective.metric_name
        print(
            f"[zero-shot] validation {metric} {100 * zero_shot[metric]:.1f} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )

        results = []
        for name in names:
            overrides = VARIANTS[name]
            restore(model, snapshot)
            run_dir = out / name
            print(f"[{name}] {describe(name, overrides)}", flush=True)
            if overrides is None:
                config = variant_config(base, {}, run_dir)
                run_forward_gradient(config, prepared, run_dir, logger(name))
                passes = None
            else:
                config = variant_config(base, overrides, run_dir)
                run(config, log=logger(name), loaded=prepared.loaded)
                passes = passes_per_step(config.optimizer)
            r = read_run(run_dir, args.target)
            n_layers = len(layer_groups([n for n, p in model.named_parameters() if p.requires_grad]))
            probes = None if overrides is None else (lambda k, oc=config.optimizer: probe_passes(oc, n_layers, k))
            r.update(
                name=name,
                overrides=describe(name, overrides),
                passes=passes,
                probe_passes=probes(r["steps"]) if probes else 0,
                target_probe_passes=probes(r["target_step"]) if probes and r["target_step"] else 0,
            )
            results.append(r)
            print(
                f"[{name}] evaluations "
                + ", ".join(f"{s}: {100 * v:.1f}" for s, v in r["evals"])
                + f"; wall {r['wall_s']:.1f} s, {r['s_per_step']:.2f} s/step",
                flush=True,
            )
        restore(model, snapshot)

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    pct = f"{100 * args.target:g}%"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    oc, tc = base.optimizer, base.train
    command = f"python benchmarks/variants.py {shlex.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    lines = [f"## Variants: steps to {pct} validation accuracy on SST-2 ({stamp})", ""]
    lines.append(
        f"- model: {prepared.loaded.source}, all {sum(p.numel() for p in snapshot.values()):,} parameters "
        f"trained, {base.model.dtype}; task {base.task.name}: {len(prepared.encoded['train'])} train, "
        f"{len(prepared.encoded['validation'])} validation examples (seed {base.task.seed})"
    )
    lines.append(f"- zero-shot validation accuracy: {100 * zero_shot[metric]:.1f}")
    lines.append(
        f"- settings: {tc.steps} steps, batch {tc.batch_size}, lr {oc.lr:g} (adam {ADAM_LR:g}), "
        f"eps {oc.eps:g}, seed {oc.seed}, validation every {tc.eval_every} steps (steps to target have "
        f"that resolution; 's to {pct}' is the loop's time to that step, earlier validations "
        f"included), target {pct}"
    )
    lines.append(
        f"- machine: {args.machine}, OMP_NUM_THREADS={threads()} "
        f"({platform.platform()}, torch {torch.__version__}, Python {platform.python_version()})"
    )
    lines.append(f"- command: `{command}`")
    lines.append(
        f"- 1-minute load average before / after: {load_before:.2f} / {load_after:.2f} on {os.cpu_count()} CPUs"
    )
    lines.append(f"- run directories: {out}" + (" (temporary)" if args.smoke else ""))
    lines += ["", *table(results, args.target), ""]
    lines.append(
        "Forward passes per step: 2n two-sided, n + 1 one-sided; the forward gradient makes one jvp "
        "(a forward pass in dual numbers, with unfused attention), its cost in forward passes "
        "estimated from its seconds per step against MeZO's (2 forwards). Adam: lr "
        f"{ADAM_LR:g} with stored m, v (zeroth-order Adam divides by ~|g|, not by a per-coordinate "
        "gradient; see the script's docstring). Momentum: the history form (window 32), which "
        "regenerates 32 z per element and step. layerwise (param-norm) scales each tensor's step by "
        f"(||theta_l|| / sqrt(d_l))^2, run at lr {PARAM_NORM_LR:g} (5e-5 over their mean, 0.033). "
        "grad-norm probes every layer alone at step 0 "
        "(2 forward passes per layer, counted in its forward passes) and then perturbs layer l along "
        "z / c_l and updates along c_l z (the expected step is MeZO's)."
    )
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.smoke:
        print("--smoke: not appended to RESULTS.md")
    elif not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
