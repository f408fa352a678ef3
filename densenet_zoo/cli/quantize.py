"""``densenet-zoo quantize``: an int8 ONNX file calibrated on a folder of images (torch imported when run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._utils import MissingFileError, UsageError, check_output
from .common import add_overwrite, refuse_overwriting_inputs


def _source(spec: str):
    """``(model, preprocessing, class_names)`` from a checkpoint file or a weights name."""
    from ..models import create_model, load_model

    if Path(spec).is_file():
        model, meta = load_model(spec)
        return model.eval(), meta.get("preprocessing"), meta.get("class_names")
    if Path(spec).suffix in (".safetensors", ".pth", ".pt"):
        raise MissingFileError(f"checkpoint {spec!r} does not exist; give a .safetensors file or a weights name such as densenet121")
    model = create_model(spec, pretrained=True).eval()
    return model, None, None


def _cmd_quantize(args: argparse.Namespace) -> int:
    from ..infer.int8 import quantize
    from ..infer.quantized import QUANTIZED_MODEL

    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    if not 0.0 < args.target_agreement <= 1.0:
        raise UsageError(f"--target-agreement must be in (0, 1], got {args.target_agreement}")
    refuse_overwriting_inputs("--out", args.out, [("MODEL_OR_CHECKPOINT", args.model)])
    check_output(args.out, QUANTIZED_MODEL, overwrite=args.overwrite, flag="--out")  # before minutes of calibration
    if not Path(args.calibration).is_dir():
        raise MissingFileError(f"--calibration {args.calibration!r} is not a folder; give a folder of images (flat or one sub-folder per class)")
    model, pre, names = _source(args.model)
    q = quantize(model, args.calibration, num_images=args.num_images, preprocessing=pre, class_names=names,
                 target_agreement=args.target_agreement, max_float_nodes=args.max_float_nodes, reduce_range=args.reduce_range)
    out = q.save(args.out, overwrite=args.overwrite)
    m = q.meta
    print(f"wrote {out} (int8, input (batch, {m['in_chans']}, {m['image_size']}, {m['image_size']}); "
          f"{len(q.float_nodes)} nodes kept in float; on {m['calibration_images']} calibration images: "
          f"top-1 agreement with float {100 * m['agreement']:.1f}%, logit error {m['error']:.3f})")
    return 0


def add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="int8 ONNX model calibrated on images (post-training static quantization)")
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT", help="a .safetensors checkpoint or a weights name, e.g. densenet121")
    p.add_argument("--calibration", required=True, metavar="FOLDER", help="images to calibrate on (flat or one sub-folder per class)")
    p.add_argument("--out", required=True, help="the .onnx file to write (load with densenet_zoo.load_quantized, or predict --checkpoint)")
    p.add_argument("--num-images", type=int, default=256, help="calibration images used at most (default 256)")
    p.add_argument("--target-agreement", type=float, default=0.99, help="top-1 agreement with float on the calibration images (0.99)")
    p.add_argument("--max-float-nodes", type=int, default=16, help="at most this many nodes kept in float by the fallback")
    p.add_argument("--reduce-range", action="store_true", help="7-bit weights: for CPUs without VNNI (AVX2 only)")
    add_overwrite(p, "an existing --out that is not an int8 model file")
    p.set_defaults(func=_cmd_quantize)
