"""Does the default learning rate hold on models other than the one it was tuned on, and how soon does
the divergence guard stop a run whose rate is too high? (issue 18, point 6)

For each model and rate, a short `zotune train` on the bundled SST-2 (the default task and prompt):
the starting loss the guard compares with, the step the guard stopped at (or none), validation before
and after, and the test of the weights the run kept. Models:

- ``tiny-tied``: a random 2-layer Llama (hidden 64) with SmolLM2's tokenizer and a tied 49152 x 64
  embedding, which holds 94% of its parameters: the shape of a small model with a large vocabulary.
- ``smollm2``: the embedded default, SmolLM2-135M-Instruct, for which the default rate was tuned.

    python benchmarks/divergence.py                              # both models, default rate and 10x, 100x
    python benchmarks/divergence.py --models tiny-tied --lrs 5e-5 5e-4 --steps 40

It appends a dated table to benchmarks/RESULTS.md (``--no-record``: print only).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import tempfile
from pathlib import Path

import torch

from zotune.config import RunConfig
from zotune.models import load_model
from zotune.train import run


def tiny_tied(folder: Path) -> str:
    """A random Llama with SmolLM2's tokenizer and a large tied embedding, saved as a model folder."""
    import transformers as tf

    tokenizer = load_model(RunConfig().model, log=lambda s: None).tokenizer
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():  # HF initialises from the global generator: seed it here, in this script only
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def one_run(model: str, lr: float, steps: int, out: Path, n_eval: int) -> dict:
    config = RunConfig()
    config.train.init = "none"  # MeZO's divergence from the model as loaded, as these figures were measured
    config.model.name = model
    config.optimizer.lr = lr
    config.train.steps = steps
    config.train.eval_every = max(1, steps // 4)
    config.train.progress = False
    config.train.output_dir = str(out)
    config.task.validation = config.task.test = n_eval
    lines: list[str] = []
    with contextlib.redirect_stderr(io.StringIO()):
        result = run(config, log=lines.append)
    summary = result.summary
    # state.json holds the guard's numbers at the last validation; a run stopped before one has only the summary's
    state = json.loads((out / "state.json").read_text())["loop"] if (out / "state.json").is_file() else {}
    guard = summary.get("divergence") or {
        "starting_loss": state.get("loss_reference"),
        "running_loss": state.get("loss_ema"),
    }
    return {
        "lr": lr,
        "steps": summary["steps"],
        "stopped": summary["stopped"],
        "reference": guard["starting_loss"],
        "running_loss": guard["running_loss"],
        "zero_shot": summary["zero_shot"].get("validation", {}).get("accuracy"),
        "best_step": (summary["best_validation"] or {}).get("step"),
        "best": (summary["best_validation"] or {}).get("metric"),
        "test": summary["test"].get("accuracy"),
        "zero_shot_test": summary["zero_shot"].get("test", {}).get("accuracy"),
        "message": next((s for s in lines if "diverged" in s), ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-tied", "smollm2"], choices=["tiny-tied", "smollm2"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 5e-4, 5e-3])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval", type=int, default=200, help="validation and test examples")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = tiny_tied(Path(tmp) / "tiny-tied") if name == "tiny-tied" else "smollm2-135m-instruct"
            for lr in args.lrs:
                r = one_run(model, lr, args.steps, Path(tmp) / f"{name}-{lr:g}", args.eval)
                rows.append({"model": name, **r})
                print(json.dumps(rows[-1]), flush=True)
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
    num = lambda x: "–" if x is None else f"{x:.3g}"  # noqa: E731
    table = [
        "| model | lr | stopped | steps | starting loss | running loss at stop | validation: start → best (step) "
        "| test: start → kept |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['lr']:g} | {r['stopped']} | {r['steps']} | {num(r['reference'])} | "
            f"{num(r['running_loss'])} | {pct(r['zero_shot'])} → {pct(r['best'])} ({r['best_step']}) | "
            f"{pct(r['zero_shot_test'])} → {pct(r['test'])} |"
        )
    text = "\n".join(table)
    print(text)
    if not args.no_record:
        command = "python benchmarks/divergence.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "no_record"
        )
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(
                f"\n## Divergence guard and the default rate on other models ({datetime.date.today()}, "
                f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)\n\n"
                f"`{command}`: bundled SST-2, the default config but for the rate and steps "
                f"({args.eval} validation / test examples).\n\n{text}\n"
            )


if __name__ == "__main__":
    main()
