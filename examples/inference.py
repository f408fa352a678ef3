"""Fast inference, multi-scale features, export and the timm / torch.hub entry points.

    .venv/bin/python examples/inference.py

Runs offline on random weights (pass --pretrained to use the published ImageNet weights).
"""

import argparse
import tempfile
from pathlib import Path

import timm
import torch

import densenet_zoo as dz

ap = argparse.ArgumentParser()
ap.add_argument("--pretrained", action="store_true")
ap.add_argument("--image-size", type=int, default=96)
args = ap.parse_args()

torch.manual_seed(0)
model = dz.densenet121(pretrained=args.pretrained).eval()
x = torch.randn(4, 3, args.image_size, args.image_size)

# 1. BN folded where exact, norm+ReLU turned into one clamp, one buffer per dense block, channels_last.
fast = dz.optimize_for_inference(model)
fast16 = dz.optimize_for_inference(model, dtype=torch.bfloat16)
with torch.inference_mode():
    ref, out, out16 = model(x), fast(x), fast16(x).float()  # fp32 input: cast to bf16 inside
print(f"optimized fp32 vs eval model: max rel diff {((out - ref).abs().max() / ref.abs().max()):.1e}")
print(f"optimized bf16 vs eval model: max rel diff {((out16 - ref).abs().max() / ref.abs().max()):.1e}, "
      f"top-1 equal on {(out16.argmax(1) == ref.argmax(1)).sum().item()}/{len(x)}")

# 2. Feature pyramid for detection / segmentation.
backbone = dz.densenet121(features_only=True, out_indices=(1, 2, 3, 4)).eval()
backbone.load_state_dict(model.state_dict())
with torch.inference_mode():
    for info, fmap in zip([backbone.feature_info[i] for i in backbone.out_indices], backbone(x)):
        print(f"  {info['module']:22s} {tuple(fmap.shape)}  ({info['num_chs']} channels, stride {info['reduction']})")

# 3. Export with a dynamic batch axis, checked against PyTorch before it is kept.
with tempfile.TemporaryDirectory() as tmp:
    path = dz.export(model, Path(tmp) / "densenet121.onnx", "onnx", image_size=args.image_size)
    print(f"ONNX written and checked: {path.name}, {path.stat().st_size / 2**20:.1f} MiB")

# 4. Through timm's factory and torch.hub.
m = timm.create_model("dz_densenet121", num_classes=10)
print(f"timm.create_model('dz_densenet121') -> {type(m).__module__}.{type(m).__name__}, {m.num_classes} classes")
repo = Path(__file__).resolve().parents[1]
hub_model = torch.hub.load(str(repo), "densenet121", source="local", pretrained=False)
print(f"torch.hub.load(<repo>, 'densenet121', source='local') -> {type(hub_model).__name__}")
