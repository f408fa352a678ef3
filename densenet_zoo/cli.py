"""``densenet-zoo``: thin command line over the library (parse, call, print).

Each command group lives in a ``_add_<group>`` function that registers its sub-parsers and
sets ``func``; the function returns the process exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .allocator import reexec_with_preferred


def _cmd_models(args: argparse.Namespace) -> int:
    from .zoo import create_model, list_models

    for name in list_models(args.pattern):
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:18s} {params:>12,d} params  growth={model.growth_rate} blocks={model.block_config}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model names and their parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="glob on model names, e.g. 'densenet1*'")
    p.set_defaults(func=_cmd_models)


def _cmd_weights_list(args: argparse.Namespace) -> int:
    from .weights import get_weights, list_weights

    for name in list_weights(args.pattern):
        e = get_weights(name)
        acc = f"acc@1 {e.metrics['acc@1']:.2f}" if e.metrics and "acc@1" in e.metrics else "acc@1 -"
        where = e.url or f"hf-hub:{e.hf_hub_id}"
        print(f"{name:28s} {'default ' if e.default else '        '}{acc:12s} {where}")
    return 0


def _cmd_weights_download(args: argparse.Namespace) -> int:
    from .hub import fetch
    from .weights import get_weights

    for name in args.names:
        print(fetch(get_weights(name), progress=not args.quiet))
    return 0


def _add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="list or download published weights")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    ls = wsub.add_parser("list", help="registered weights with accuracy and source")
    ls.add_argument("pattern", nargs="?", default="*", help="glob on weight names, e.g. 'densenet121*'")
    ls.set_defaults(func=_cmd_weights_list)
    dl = wsub.add_parser("download", help="download into the cache (DENSENET_ZOO_CACHE) and print the path")
    dl.add_argument("names", nargs="+", metavar="NAME", help="e.g. densenet121, densenet121.tv_in1k")
    dl.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dl.set_defaults(func=_cmd_weights_download)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .weights import convert_checkpoint, read_safetensors

    out = convert_checkpoint(args.input, args.output, use_ema=args.ema)
    _, meta = read_safetensors(out)
    print(f"wrote {out} ({meta.get('arch') or 'custom DenseNet'}, num_classes={meta['model_args']['num_classes']})")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a DenseNet checkpoint (.pth, wrapped, prefixed, legacy keys) to safetensors")
    p.add_argument("input", help="checkpoint path, URL or registered weights name")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--ema", action="store_true", help="take the EMA weights when the checkpoint has both")
    p.set_defaults(func=_cmd_convert)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``sample-data``, ``finetune`` and ``evaluate`` (their flags live in cli_train.py)."""
    from .cli_train import add_train

    add_train(sub)


def _add_inference(sub: argparse._SubParsersAction) -> None:
    """``predict``, ``info`` and ``export`` (their flags live in cli_infer.py)."""
    from .cli_infer import add_inference

    add_inference(sub)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    """``profile`` (its flags live in cli_profile.py)."""
    from .cli_profile import add_profile

    add_profile(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densenet-zoo", description="DenseNet model zoo for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_models(sub)
    _add_weights(sub)
    _add_convert(sub)
    _add_train(sub)
    _add_inference(sub)
    _add_profile(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        reexec_with_preferred(args.command, argv)  # finetune: tcmalloc/jemalloc when installed (DENSENET_ZOO_ALLOCATOR)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`densenet-zoo weights list | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        # Library errors are written for people: show the one line, not a traceback.
        print(f"densenet-zoo {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
