"""``densenet-zoo``: thin command line over the library (parse, call, print).

Each command group lives in a ``_add_<group>`` function that registers its sub-parsers and
sets ``func``; the function returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _cmd_models(args: argparse.Namespace) -> int:
    from .model import create_model, list_models

    for name in list_models(args.pattern):
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:18s} {params:>12,d} params  growth={model.growth_rate} blocks={model.block_config}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model names and their parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="glob on model names, e.g. 'densenet1*'")
    p.set_defaults(func=_cmd_models)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``sample-data``, ``finetune`` and ``evaluate`` (their flags live in cli_train.py)."""
    from .cli_train import add_train

    add_train(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densenet-zoo", description="DenseNet model zoo for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_models(sub)
    _add_train(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        # Library errors are written for people: show the one line, not a traceback.
        print(f"densenet-zoo {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
