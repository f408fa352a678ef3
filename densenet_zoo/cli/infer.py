"""``densenet-zoo predict``, ``info`` and ``export``: parse, call the library (imported when a command runs), print."""

from __future__ import annotations

import argparse
import json
import sys

from .._utils import UsageError, check_output, printable
from .common import add_overwrite, refuse_overwriting_inputs


def _load_model(args: argparse.Namespace):
    """A model from ``--checkpoint FILE`` or ``--model NAME [--pretrained]``, in eval mode."""
    from ..models import create_model, load_model

    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
        return model.eval()
    if not args.model:
        raise UsageError("give --model NAME (with --pretrained for published weights) or --checkpoint FILE.safetensors")
    return create_model(args.model, pretrained=args.pretrained).eval()


def _cmd_predict(args: argparse.Namespace) -> int:
    from ..infer.predict import PREDICTIONS_CSV, Predictor, collect_images, predict_summary, write_csv

    if args.top_k < 1 or args.batch_size < 1:
        raise UsageError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
    paths = collect_images(args.inputs)
    refuse_overwriting_inputs("--csv", args.csv, [("--checkpoint", args.checkpoint), *(("input", p) for p in paths)])
    if args.csv:  # checked before the work, not after it
        check_output(args.csv, PREDICTIONS_CSV, overwrite=args.overwrite, flag="--csv")
    kwargs = dict(optimize=not args.no_optimize, device=args.device)
    if args.checkpoint and args.checkpoint.endswith(".onnx"):  # an int8 file from `densenet-zoo quantize`
        predictor = Predictor.from_quantized(args.checkpoint, **kwargs)
    elif args.checkpoint:
        predictor = Predictor.from_checkpoint(args.checkpoint, **kwargs)
    elif args.model and args.pretrained:
        predictor = Predictor.from_pretrained(args.model, **kwargs)
    else:
        raise UsageError("predict needs trained weights: --model NAME --pretrained, or --checkpoint FILE.safetensors")
    results = predictor.predict(paths, batch_size=args.batch_size, top_k=args.top_k,
                                progress=False if args.quiet else None)
    for r in results:
        if r.error:
            what = r.error if r.error.startswith("the model's output") else f"unreadable image ({r.error})"
            print(f"{printable(r.path)}: {printable(what)}; skipped", file=sys.stderr)
        else:
            print(f"{printable(r.path)}: " + ", ".join(f"{printable(label)} {100 * p:.1f}%" for label, p in zip(r.labels, r.probs)))
    summary = predict_summary(results)
    if args.csv:
        print(f"wrote {write_csv(results, args.csv, args.top_k, overwrite=args.overwrite)}")
    if summary["unreadable"]:
        print(f"{summary['predicted']} images predicted, {summary['unreadable']} unreadable (listed above)", file=sys.stderr)
    return 0 if summary["predicted"] else 1


def _cmd_info(args: argparse.Namespace) -> int:
    from ..infer.info import format_info, model_info

    info = model_info(args.name, args.image_size)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..infer import export, optimize_for_inference
    from ..infer.exporter import EXPORTED_MODEL

    refuse_overwriting_inputs("--out", args.out, [("--checkpoint", args.checkpoint)])
    check_output(args.out, EXPORTED_MODEL, overwrite=args.overwrite, flag="--out")
    model = _load_model(args)
    if args.optimize:
        model = optimize_for_inference(model, channels_last=False)
    out = export(model, args.out, args.format, image_size=args.image_size, opset=args.opset, check=not args.no_check,
                 overwrite=args.overwrite)
    print(f"wrote {out} ({args.format}, input (batch, {model.in_chans}, H, W), dynamic batch"
          f"{'' if args.no_check else ', checked against PyTorch'})")
    return 0


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="architecture or weights name, e.g. densenet121 or densenet121.tv_in1k")
    p.add_argument("--pretrained", action="store_true", help="load the published weights of --model")
    p.add_argument("--checkpoint", help="a .safetensors file written by finetune / save_model (has class names); predict also takes an int8 .onnx from quantize")


def add_inference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes of image files and folders")
    _add_model_source(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--csv", metavar="OUT", help="also write path,top1,top1_prob,...,error to this CSV file")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-optimize", action="store_true", help="run the model as built (no BN folding / fast path)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_overwrite(p, "an existing --csv that is not a predictions CSV")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("info", help="parameters, GFLOPs, layers, preprocessing and weights of a model")
    p.add_argument("name", help="e.g. densenet121")
    p.add_argument("--image-size", type=int, default=None, help="input size for the FLOP count (224; 32 for CIFAR models)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export", help="write ONNX (dynamic batch), TorchScript or torch.export files")
    _add_model_source(p)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "torch.export"])
    p.add_argument("--out", required=True, help="output file (.onnx, .pt, .pt2)")
    p.add_argument("--image-size", type=int, default=None, help="traced input size (224; 32 for CIFAR models)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--optimize", action="store_true", help="export the BN-folded fast network (fewer ops, same outputs)")
    p.add_argument("--no-check", action="store_true", help="skip running the export against PyTorch")
    add_overwrite(p, "an existing --out that is not an exported model")
    p.set_defaults(func=_cmd_export)
