"""The ``zotune`` command: it parses arguments and calls the library, nothing more.

Every error a user can cause (a bad config, data file, model, trajectory or run directory: a
:class:`zotune.errors.UserError`) is printed as one line on stderr with exit code 2, before anything
is written; anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from zotune.version import __version__

__all__ = ["main"]


def _train_epilog() -> str:
    """The config fields, listed from the dataclasses themselves so the help cannot go stale."""
    import dataclasses
    import textwrap

    from zotune.config import section_classes

    sections = "; ".join(
        f"{name} ({', '.join(f.name for f in dataclasses.fields(cls))})" for name, cls in section_classes().items()
    )
    return "\n".join(
        [
            "Any config field can be given as --section.field VALUE or, where unique, --field VALUE:",
            "  zotune train --task.name rte --data_dir ../shared/data --lr 1e-6 --steps 2000",
            "  zotune train --config run.yaml --batch_size 8",
            *textwrap.wrap(f"Sections and fields: {sections}.", 100),
            "With no arguments: the embedded SmolLM2-135M-Instruct on the bundled SST-2 sample, from a linear probe.",
        ]
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zotune",
        description="Fine-tune language models with forward passes only (MeZO, arXiv 2305.17333).",
    )
    parser.add_argument("--version", action="version", version=f"zotune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _train_arguments(sub)
    _replay_arguments(sub)
    _compare_arguments(sub)
    _plot_arguments(sub)
    mem = sub.add_parser(
        "memory",
        help="predict peak GPU memory of inference, MeZO (+LoRA/prefix) and backprop",
        description="Predicts, from a model's shapes alone, the peak memory of inference, "
        "MeZO (full, LoRA, prefix), reference-style MeZO and backprop with Adam.",
    )
    _memory_arguments(mem)

    _demo_arguments(sub)
    return parser


def _train_arguments(sub) -> None:
    """`zotune train` and `zotune eval`."""
    train = sub.add_parser(
        "train",
        help="fine-tune a model on a task with MeZO (the main job)",
        description="Fine-tune with MeZO: the start (by default, for classification tasks, a linear probe "
        "written into the label words' output rows; --train.init none: the model as loaded, the paper's MeZO) "
        "evaluated, training with periodic validation, the best checkpoint, the test score, logs and a plot.",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="a YAML file with sections model, task, optimizer, train")
    train.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR (after Ctrl-C, SIGTERM, a crash, its time limit or its last step); "
        "of the config, only --steps (more of them) and --optimizer.lr (for the steps still to come), "
        "both under a constant schedule, --time_limit (minutes in all, the time before "
        "included), --divergence, --progress and --snapshot may change",
    )

    ev = sub.add_parser(
        "eval",
        help="evaluate a model, a run's best checkpoint, or base + trajectory on a task",
        epilog="Other config fields as in `zotune train` (e.g. --task.name, --data_dir, --test).",
    )
    ev.add_argument("--config", help="a YAML file (as for train)")
    ev.add_argument("--run", metavar="DIR", help="a run directory: its config, and its best weights")
    ev.add_argument("--trajectory", metavar="FILE", help="replay this trajectory onto the model first")
    ev.add_argument("--split", default="test", choices=("train", "validation", "test"), help="default: test")


def _compare_arguments(sub) -> None:
    """`zotune compare`."""
    cmp = sub.add_parser(
        "compare",
        help="run methods x tasks x seeds (zero-shot, ICL, LP, MeZO, FT, ...) into one table",
        description="Runs a grid of methods, tasks and seeds, each cell in its own process (resumable: cells "
        "already done are skipped), and writes the paper's Table-1-shaped markdown table with each "
        "method's peak memory.",
        epilog="Grid keys (override any as --key value; lists as a,b,c): tasks, methods, seeds, output_dir, isolate, jobs "
        "(cells at once), run (sections of the train config), method_overrides, task_overrides, icl, lp, ft.\n"
        "Methods: " + ", ".join(_methods()) + ".\n"
        "Example: zotune compare --config examples/grid.yaml --tasks sst2 --seeds 0,1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmp.add_argument("--config", help="a grid YAML file (see examples/grid.yaml)")
    cmp.add_argument(
        "--table-only",
        action="store_true",
        help="run nothing: write the table of the cells finished so far (the rest shown as –)",
    )


def _plot_arguments(sub) -> None:
    """`zotune plot`."""
    plot = sub.add_parser(
        "plot",
        help="draw learning curves: one run's, or several side by side",
        description="Draws the training loss and the validation metric of runs (finished, "
        "interrupted or still running) from their metrics.jsonl.",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by zotune train")
    plot.add_argument(
        "--out",
        metavar="FILE",
        help="the PNG to write (default: RUN_DIR/curves.png for one run, curves.png here for several)",
    )
    plot.add_argument(
        "--x",
        default="step",
        choices=("step", "minutes", "passes"),
        help="the x axis: steps, wall-clock minutes or training forward passes (default: step)",
    )
    plot.add_argument("--labels", metavar="A,B,...", help="one legend label per run (default: the directory names)")


def _demo_arguments(sub) -> None:
    """`zotune demo`."""
    demo = sub.add_parser(
        "demo",
        help="fine-tune a tiny built-in model on a toy task and print the loss falling",
        description="MeZO memorises random token sequences with a tiny Llama built from a "
        "config: no download, a few seconds on a laptop CPU.",
    )
    from zotune.demo import DemoConfig

    defaults = DemoConfig()
    demo.add_argument("--steps", type=int, default=defaults.steps, help=f"MeZO steps (default {defaults.steps})")
    demo.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default {defaults.lr})")
    demo.add_argument("--eps", type=float, default=defaults.eps, help=f"perturbation scale (default {defaults.eps})")
    demo.add_argument("--seed", type=int, default=defaults.seed, help=f"seed (default {defaults.seed})")


def _methods() -> list[str]:
    from zotune.compare import METHODS

    return list(METHODS)


def _plot(args, rest) -> int:
    from zotune.config import ConfigError
    from zotune.plot import plot_runs, redraw_run

    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    labels = args.labels.split(",") if args.labels else None
    if len(args.runs) == 1 and args.x == "step" and labels is None:  # a run's own curves.png, redrawn
        out = redraw_run(args.runs[0], args.out)
    else:
        out = plot_runs(args.runs, args.out or "curves.png", x=args.x, labels=labels)
    print(f"wrote {out}")
    return 0


def _replay_arguments(sub) -> None:
    rp = sub.add_parser(
        "replay",
        help="rebuild fine-tuned weights from a base model and a trajectory",
        description="Replays the trajectory onto the base model (no data, no forward pass) "
        "and saves the result with its config and tokenizer, loadable by from_pretrained.",
    )
    rp.add_argument("--base", required=True, help="the base model (as for --model.name)")
    rp.add_argument("--trajectory", required=True, metavar="FILE")
    rp.add_argument("--out", required=True, metavar="DIR")
    rp.add_argument("--dtype", default=None, help="the dtype the run trained in (default: the run's, else float32)")
    rp.add_argument(
        "--device",
        default=None,
        help="where to replay: cpu, cuda or cuda:N (default: the device in summary.json beside the "
        "trajectory, else the run's model.device). Bit for bit on the kind of device the run "
        "trained on",
    )
    rp.add_argument(
        "--config",
        metavar="FILE",
        help="the run's config.yaml, for its tuning mode (default: config.yaml beside the trajectory, "
        "if any). LoRA is merged into the saved weights; prefixes go to prefix.safetensors",
    )
    rp.add_argument(
        "--step",
        default=None,
        metavar="N|best",
        help="replay the first N steps only (default: all); 'best': up to the run's best validation "
        "(best/best.json beside the trajectory), the weights its test was of",
    )


def _memory_arguments(mem: argparse.ArgumentParser) -> None:
    from zotune.memory import DTYPES

    mem.add_argument(
        "--model", required=True, help="a hub id or local directory, a config.json, or an OPT size like opt-13b"
    )
    mem.add_argument("--gpu-memory", default=None, help="memory of one GPU, e.g. 80GB: says what fits")
    mem.add_argument("--dtype", default="float16", choices=DTYPES)
    mem.add_argument("--batch", type=int, default=16)
    mem.add_argument("--seq", type=int, default=64, help="sequence length in tokens")
    mem.add_argument("--lora-rank", type=int, default=8)
    mem.add_argument("--prefix-tokens", type=int, default=5)
    mem.add_argument("--eager-attention", action="store_true", help="attention scores are materialised")


def _memory(args, rest) -> int:
    from zotune.memory import report

    print(
        report(
            args.model,
            gpu_memory=args.gpu_memory,
            dtype=args.dtype,
            batch=args.batch,
            seq=args.seq,
            lora_rank=args.lora_rank,
            prefix_tokens=args.prefix_tokens,
            eager_attention=args.eager_attention,
        )
    )
    return 0


def _compare(args, rest) -> int:
    from zotune.compare import compare, load_compare_config

    compare(load_compare_config(args.config, rest), run=not args.table_only)
    return 0


def _train(args, rest) -> int:
    from zotune.config import ConfigError, load_config, parse_overrides
    from zotune.train import run

    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its own config: give no --config")
        result = run(resume=args.resume, changes=parse_overrides(rest))
    else:
        result = run(load_config(args.config, rest))
    return 130 if result.interrupted else 0


def _eval(args, rest) -> int:
    from pathlib import Path

    from zotune import checkpoint, start
    from zotune.config import ConfigError, load_config
    from zotune.objectives import evaluate
    from zotune.optim.replay import replay
    from zotune.train import prepare

    config_path = args.config or (Path(args.run) / "config.yaml" if args.run else None)
    config = load_config(config_path, rest, saved=not args.config and bool(args.run))
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    stored = None  # a run's weights: its start first (train.init), as the run wrote it, from the run's own
    if args.run or args.trajectory:  # config.yaml whatever --config says (a missing file fails before loading)
        stored = start.stored_start(Path(args.run) if args.run else Path(args.trajectory).parent)
    prepared = prepare(config, log=log)
    model = prepared.loaded.model
    if stored:  # quietly: the run chose and logged its start; here it is only written back (stderr is errors')
        start.initialise(prepared, "probe", batch_size=config.train.batch_size, stored=stored, log=lambda m: None)
    if args.trajectory:
        replay(model, args.trajectory)
    if args.run:
        weights_path = Path(args.run) / "best" / "model.safetensors"
        if not weights_path.is_file():
            raise ConfigError(f"{args.run} has no best checkpoint ({weights_path} is missing)")
        try:
            checkpoint.copy_into(weights_path, dict(model.named_parameters()))
        except checkpoint.CheckpointMismatch as err:
            raise ConfigError(f"the checkpoint in {args.run} does not belong to this model ({err})") from None
    metrics = evaluate(prepared.objective, model, prepared.encoded[args.split], config.train.eval_batch_size)
    shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items())
    print(f"{config.task.name} {args.split} ({len(prepared.encoded[args.split])} examples): {shown}")
    return 0


def _replay(args, rest) -> int:
    from zotune.config import ConfigError
    from zotune.export import export

    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    done = export(
        args.base,
        args.trajectory,
        args.out,
        step=args.step,
        config=args.config,
        device=args.device,
        dtype=args.dtype,
        log=lambda m: print(m, file=sys.stderr),
    )
    extra = {
        "lora": " (LoRA merged into the weights)",
        "prefix": " (the base model; the trained prefixes in prefix.safetensors)",
    }.get(done.tuning, "")
    print(f"replayed {done.steps} steps onto {args.base}; saved to {done.out}{extra}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help()
        return 0
    if args.command == "demo":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from zotune.demo import DemoConfig, run_demo

        try:
            config = DemoConfig(steps=args.steps, lr=args.lr, eps=args.eps, seed=args.seed)
        except ValueError as err:
            print(f"zotune demo: error: {err}", file=sys.stderr)
            return 2
        run_demo(config)
        return 0
    if args.command == "memory" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    command = {
        "train": _train,
        "eval": _eval,
        "replay": _replay,
        "compare": _compare,
        "plot": _plot,
        "memory": _memory,
    }[args.command]
    from zotune.errors import UserError

    try:
        return command(args, rest)
    except UserError as err:
        print(f"zotune {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """The first line of an error's message: a message quoting a library's error may run on."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
