"""``densenet-zoo``: thin command line over the library (parse, call, print).

Each command group has an ``add_<group>`` function (here or in its own module) that registers its
sub-parsers and sets ``func``; the function returns the process exit code. Errors print one line on stderr
(exit code 1; ``--debug`` shows the traceback), Ctrl-C exits with 130 and a closed pipe with 141.

Parsing imports nothing heavy: each ``_cmd_<name>`` imports the library when it runs, so ``--help``,
``--version`` and a mistyped flag answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, NoReturn, Optional

from .._utils import __version__
from ..allocator import reexec_with_preferred
from .common import add_overwrite, one_line, refuse_overwriting_inputs
from .infer import add_inference
from .profile import add_profile
from .quantize import add_quantize
from .train import add_train


def _cmd_models(args: argparse.Namespace) -> int:
    from ..models import create_model, list_models

    names = list_models(args.pattern)
    if not names:
        raise LookupError(f"no model name matches {args.pattern!r}; `densenet-zoo models` lists them all")
    for name in names:
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:18s} {params:>12,d} params  growth={model.growth_rate} blocks={model.block_config}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model names and their parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="glob on model names, e.g. 'densenet1*'")
    p.set_defaults(func=_cmd_models)


def _cmd_weights_list(args: argparse.Namespace) -> int:
    from ..weights import get_weights, list_weights

    names = list_weights(args.pattern)
    if not names:
        raise LookupError(f"no weights name matches {args.pattern!r}; `densenet-zoo weights list` lists them all")
    for name in names:
        e = get_weights(name)
        acc = f"acc@1 {e.metrics['acc@1']:.2f}" if e.metrics and "acc@1" in e.metrics else "acc@1 -"
        where = e.url or f"hf-hub:{e.hf_hub_id}"
        print(f"{name:28s} {'default ' if e.default else '        '}{acc:12s} {where}")
    return 0


def _cmd_weights_download(args: argparse.Namespace) -> int:
    from ..weights import fetch, get_weights

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
    from ..models import convert_checkpoint
    from ..weights import read_safetensors

    refuse_overwriting_inputs("output", args.output, [("input", args.input)])
    out = convert_checkpoint(args.input, args.output, use_ema=args.ema, overwrite=args.overwrite)
    _, meta = read_safetensors(out)
    print(f"wrote {out} ({meta.get('arch') or 'custom DenseNet'}, num_classes={meta['model_args']['num_classes']})")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a DenseNet checkpoint (.pth, wrapped, prefixed, legacy keys) to safetensors")
    p.add_argument("input", help="checkpoint path, URL or registered weights name")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--ema", action="store_true", help="take the EMA weights when the checkpoint has both")
    add_overwrite(p, "an existing OUTPUT that is not a model file")
    p.set_defaults(func=_cmd_convert)


class CommandLineError(Exception):
    """A command line argparse cannot parse, reported as one line like every other error."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: error: {message}; see `{prog} --help`")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become a :class:`CommandLineError` (one line, exit code 1) instead of five
    lines of usage and exit code 2; ``--help`` prints the full usage as before."""

    def error(self, message: str) -> "NoReturn":
        raise CommandLineError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="densenet-zoo", description="DenseNet model zoo for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version of densenet_zoo and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_models(sub)
    _add_weights(sub)
    _add_convert(sub)
    add_train(sub)      # sample-data, finetune, evaluate (cli/train.py)
    add_inference(sub)  # predict, info, export (cli/infer.py)
    add_profile(sub)    # profile (cli/profile.py)
    add_quantize(sub)   # quantize (cli/quantize.py)
    for command in sub.choices.values():  # --debug also after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CommandLineError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not getattr(args, "func", None):
        print("densenet-zoo: error: give a command; `densenet-zoo --help` lists them", file=sys.stderr)
        return 1
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
    except KeyboardInterrupt as exc:  # Ctrl-C; or a run that stopped on SIGINT/SIGTERM (its `signum`)
        signum = getattr(exc, "signum", signal.SIGINT)
        hint = getattr(args, "interrupted", None)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun, one line for the run
            print(f"densenet-zoo {args.command}: {what}" + (f"; {hint(args)}" if hint else ""), file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 - every error becomes one line unless --debug
        if args.debug:
            raise
        # Library errors are written for people: show the one line, not a traceback.
        print(f"densenet-zoo {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
