"""The ``zotune`` command: it parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import sys

from zotune import __version__

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zotune",
        description="Fine-tune language models with forward passes only (MeZO, arXiv 2305.17333).",
    )
    parser.add_argument("--version", action="version", version=f"zotune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="fine-tune a tiny built-in model on a toy task and print the loss falling",
                          description="MeZO memorises random token sequences with a tiny Llama built from a "
                                      "config: no download, about half a minute on a laptop CPU.")
    from zotune.demo import DemoConfig

    defaults = DemoConfig()
    demo.add_argument("--steps", type=int, default=defaults.steps, help=f"MeZO steps (default {defaults.steps})")
    demo.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default {defaults.lr})")
    demo.add_argument("--eps", type=float, default=defaults.eps, help=f"perturbation scale (default {defaults.eps})")
    demo.add_argument("--seed", type=int, default=defaults.seed, help=f"seed (default {defaults.seed})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from zotune.demo import DemoConfig, run_demo

        try:
            config = DemoConfig(steps=args.steps, lr=args.lr, eps=args.eps, seed=args.seed)
        except ValueError as err:
            print(f"zotune demo: error: {err}", file=sys.stderr)
            return 2
        run_demo(config)
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
