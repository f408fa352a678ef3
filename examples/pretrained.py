"""Pretrained weights: build densenet121(pretrained=True), fine-tune-ready variants, and the registry.

    python examples/pretrained.py

With network access this downloads torchvision's densenet121-a639ec97.pth (31 MB) into the cache
(DENSENET_ZOO_CACHE, else $TORCH_HOME/densenet_zoo). Without it (or with DENSENET_ZOO_OFFLINE=1)
the error says where to put the file, and the script goes on with a locally made checkpoint
registered as its own entry, which takes the very same path: file URL, hash check, key
normalisation, load report.
"""

import tempfile
from pathlib import Path

import torch
import torchvision

import densenet_zoo as dz

print(f"{'weights':28s} {'acc@1':>7s}  source")
for name in dz.list_weights():
    e = dz.get_weights(name)
    acc = f"{e.metrics['acc@1']:.2f}" if e.metrics else "-"
    print(f"{name:28s} {acc:>7s}  {e.url or 'hf-hub:' + e.hf_hub_id}")

info = dz.get_weights("densenet121")
print("\ndefault densenet121 weights:", info.name, info.sha256, f"{info.num_params:,d} params")
print("preprocessing:", info.transforms())
print("first classes:", info.categories[:3])

try:
    model = dz.densenet121(pretrained=True)
    arch = "densenet121"
except dz.WeightsError as exc:
    print(f"\nno published weights here: {exc}\n")
    # A checkpoint in torchvision's format, from torchvision itself, registered as an entry.
    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    ref = torchvision.models.densenet121().eval()
    path = folder / "densenet121-local.pth"
    torch.save(ref.state_dict(), path)
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    dz.register_weights({"name": "densenet121.local", "arch": "densenet121", "url": path.as_uri(), "sha256": digest,
                         "preprocessing": info.preprocessing, "categories": "imagenet1k", "default": True}, overwrite=True)
    model = dz.densenet121(pretrained=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        print("max |ours - torchvision| =", (model.eval()(x) - ref(x)).abs().max().item())

print(model.load_report)

# Fine-tuning variants: a new 10-class head, and grey-scale input with the first conv summed over RGB.
model10 = dz.densenet121(pretrained=True, num_classes=10)
print(model10.load_report)
grey = dz.densenet121(pretrained=True, in_chans=1)
print(grey.load_report)

# Save with metadata (architecture, preprocessing, class names) and rebuild.
out = Path(tempfile.mkdtemp()) / "densenet121.safetensors"
dz.save_model(model, out)
back, meta = dz.load_model(out)
print("saved and reloaded:", out, meta["arch"], len(meta.get("class_names", [])), "class names")
