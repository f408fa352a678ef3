"""Inference throughput of DenseNet-121: torchvision, timm and densenet_zoo's optimized network.

    .venv/bin/python benchmarks/inference.py                     # batch 16, 224x224, the full table
    .venv/bin/python benchmarks/inference.py --compile           # adds torch.compile rows (slow to warm up)
    .venv/bin/python benchmarks/inference.py --batch-size 2 --image-size 64 --rounds 1 --gemm-size 256 --agree-images 4  # smoke test

All candidates run in the same process, interleaved round by round (so a burst of load elsewhere
hits every row), and the median over rounds is reported. GFLOP/s use the FLOPs of the reference
network counted by ``torch.utils.flop_counter`` (5.67 GFLOP per 224x224 image), so a row that
does less work (our transitions pool before their 1x1 conv) is credited with the nominal work.
"GEMM peak" is the best fp32 matmul rate measured in the same rounds (sampled before each round,
best kept: a conservative ceiling), which a convolution network can approach but hardly pass; the
script also reports the rate of the optimized network's convolution kernels alone (torch.profiler
self time), the ceiling for the whole network on this machine. Top-1 agreement compares bf16 and fp32 predictions of our network on fixed random
inputs (random weights unless ``--pretrained`` finds published weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import densenet_zoo as dz  # noqa: E402
from densenet_zoo.hardware import cpu_capabilities, describe_hardware  # noqa: E402
from densenet_zoo.infer.info import count_flops  # noqa: E402


def machine() -> str:
    """The hardware line every report names (densenet_zoo.hardware), with the versions measured."""
    return (f"{describe_hardware()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}")


class GemmPeak:
    """Best fp32 GFLOP/s of ``size`` x ``size`` matmuls, sampled once per round beside the models."""

    def __init__(self, size: int, repeats: int = 3) -> None:
        self.a, self.b, self.repeats, self.best = torch.randn(size, size), torch.randn(size, size), repeats, 0.0

    def sample(self) -> None:
        n = self.a.shape[0]
        with torch.inference_mode():
            self.a @ self.b
            for _ in range(self.repeats):
                t = time.perf_counter()
                self.a @ self.b
                self.best = max(self.best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)


def timed_rounds(cands: Dict[str, Tuple[Callable, torch.Tensor]], rounds: int, warmup: int, gemm: GemmPeak) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {k: [] for k in cands}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn, x in cands.values():
                fn(x)
        for _ in range(rounds):
            gemm.sample()
            for name, (fn, x) in cands.items():
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
    return times


def top1_agreement(fp32: torch.nn.Module, bf16: torch.nn.Module, n: int, image_size: int, batch: int) -> float:
    g = torch.Generator().manual_seed(1234)
    agree = 0
    with torch.inference_mode():
        for start in range(0, n, batch):
            x = torch.randn(min(batch, n - start), 3, image_size, image_size, generator=g)
            agree += int((fp32(x).argmax(1) == bf16(x.bfloat16()).argmax(1)).sum())
    return agree / n


def int8_candidates(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> Dict[str, Tuple[Callable, torch.Tensor]]:
    """onnxruntime fp32 and int8 (:func:`densenet_zoo.quantize`) rows; none without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("int8 rows skipped: onnxruntime is not installed (pip install 'densenet_zoo[export]')")
        return {}
    import tempfile

    g = torch.Generator().manual_seed(7)
    calib = [torch.randn(8, 3, args.image_size, args.image_size, generator=g) for _ in range(max(1, args.int8_calibration // 8))]
    t = time.perf_counter()
    q = dz.quantize(model, calib, max_float_nodes=args.int8_float_nodes, threads=torch.get_num_threads())
    print(f"int8: quantized in {time.perf_counter() - t:.0f} s, {len(q.float_nodes)} nodes kept in float")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = dz.export(model, os.path.join(tmp, "fp32.onnx"), image_size=args.image_size, check=False)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {"onnxruntime fp32": (lambda inp: session.run(None, {"input": inp.numpy()}), x),
            "densenet_zoo int8 (onnxruntime)": (q, x)}


def convolution_seconds(model: Callable, x: torch.Tensor) -> float:
    """Self time of the convolution kernels in one forward (all the network's FLOPs but the classifier's)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    return sum(e.self_cpu_time_total for e in prof.key_averages() if "convolution" in e.key) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gemm-size", type=int, default=2048)
    ap.add_argument("--agree-images", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows")
    ap.add_argument("--pretrained", action="store_true", help="use published weights (must be cached or downloadable)")
    ap.add_argument("--no-bf16", action="store_true", help="no bf16 rows (left out anyway where the CPU has no native bf16)")
    ap.add_argument("--no-int8", action="store_true", help="no int8 (onnxruntime) rows")
    ap.add_argument("--int8-calibration", type=int, default=16, help="random calibration images for int8")
    ap.add_argument("--int8-float-nodes", type=int, default=0, help="most nodes the int8 fallback keeps in float")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(0)

    print(f"machine: {machine()}")
    gemm = GemmPeak(args.gemm_size)

    tv = torchvision.models.densenet121().eval()
    ours = dz.densenet121(pretrained=args.pretrained).eval()
    if not args.pretrained:
        ours.load_state_dict(tv.state_dict())  # the same random weights everywhere
    else:
        tv.load_state_dict(ours.state_dict())
    import timm

    tm = timm.create_model("densenet121").eval()
    tm.load_state_dict(tv.state_dict())
    flops = count_flops(tv, args.image_size) / 1e9
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    xcl = x.contiguous(memory_format=torch.channels_last)
    tv_cl = torchvision.models.densenet121().eval().to(memory_format=torch.channels_last)
    tv_cl.load_state_dict(tv.state_dict())
    fast = dz.optimize_for_inference(ours)
    if not args.no_bf16 and not cpu_capabilities().native_bf16:
        print(f"bf16 rows skipped: no native bf16 here ({cpu_capabilities().summary()})")
        args.no_bf16 = True
    fast16 = None if args.no_bf16 else dz.optimize_for_inference(ours, dtype=torch.bfloat16)

    def tv_autocast(inp: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return tv_cl(inp)

    cands: Dict[str, Tuple[Callable, torch.Tensor]] = {
        "torchvision fp32 eager": (tv, x),
        "timm fp32 eager": (tm, x),
        "torchvision fp32 channels_last": (tv_cl, xcl),
        "densenet_zoo optimized fp32": (fast, x),
    }
    if fast16 is not None:
        cands["torchvision bf16 autocast channels_last"] = (tv_autocast, xcl)
        cands["densenet_zoo optimized bf16"] = (fast16, x.bfloat16())
    if args.compile:
        cands["torchvision fp32 channels_last + torch.compile"] = (torch.compile(tv_cl), xcl)
        cands["densenet_zoo optimized fp32 + torch.compile"] = (dz.optimize_for_inference(ours, compile=True), x)
    if not args.no_int8:
        cands.update(int8_candidates(ours, x, args))
    times = timed_rounds(cands, args.rounds, args.warmup, gemm)
    peak = gemm.best
    print(f"fp32 GEMM peak: {peak:.1f} GFLOP/s (best {args.gemm_size}x{args.gemm_size} matmul over the rounds)")
    base = args.batch_size / statistics.median(times["torchvision fp32 eager"])

    print(f"\nDenseNet-121, batch {args.batch_size}, {args.image_size}x{args.image_size}, {flops:.2f} GFLOP/image, "
          f"median of {args.rounds} interleaved rounds")
    print(f"| {'configuration':46s} | {'img/s':>7s} | {'vs torchvision fp32':>19s} | {'GFLOP/s':>8s} | {'% of GEMM peak':>14s} |")
    print(f"|{'-' * 48}|{'-' * 9}|{'-' * 21}|{'-' * 10}|{'-' * 16}|")
    rows = []
    for name, ts in times.items():
        ips = args.batch_size / statistics.median(ts)
        rows.append(dict(name=name, img_s=ips, ratio=ips / base, gflop_s=ips * flops, peak_pct=100 * ips * flops / peak))
        print(f"| {name:46s} | {ips:7.1f} | {ips / base:18.2f}x | {ips * flops:8.1f} | {100 * ips * flops / peak:13.0f}% |")
    conv_s = convolution_seconds(fast, x)
    conv_rate = args.batch_size * flops / conv_s
    print(f"\nconvolution kernels alone in densenet_zoo optimized fp32 (torch.profiler, one batch): {1000 * conv_s:.0f} ms, "
          f"{conv_rate:.1f} GFLOP/s = {100 * conv_rate / peak:.0f}% of the GEMM peak; the whole network cannot do better")
    agree = top1_agreement(fast, fast16, args.agree_images, args.image_size, args.batch_size) if fast16 is not None else float("nan")
    if fast16 is not None:
        print(f"\ntop-1 agreement, densenet_zoo bf16 vs fp32, {args.agree_images} fixed random inputs "
              f"({'published' if args.pretrained else 'random'} weights): {100 * agree:.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(), gemm_peak=peak, gflop_per_image=flops, rows=rows, top1_agreement=agree,
                           convolution_gflop_s=conv_rate,
                           batch_size=args.batch_size, image_size=args.image_size, rounds=args.rounds), f, indent=1)


if __name__ == "__main__":
    main()
