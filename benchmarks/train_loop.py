"""Training throughput of densenet_zoo's fine-tuning loop against a plain hand-written loop.

    python benchmarks/train_loop.py                                   # torchvision densenet121, 64 px, batch 32
    python benchmarks/train_loop.py --image-size 32 --images 64 --epochs 2   # a quick check

Both loops train the same torchvision DenseNet (same initial weights) on the same images (the
digits sample data), with the same transform, DataLoader, batch size, SGD settings and number of
epochs; images/s is measured over the training pass of the last epoch (evaluation and file
writes of our loop are not counted). Prints one table row per loop and the ratio ours / plain.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

from densenet_zoo.hardware import describe_hardware
from densenet_zoo.data.dataset import ImageDataset
from densenet_zoo.data.sample_data import write_sample_data
from densenet_zoo.data.splits import load_splits
from densenet_zoo.data.transforms import resolve_preprocessing, train_transform
from densenet_zoo.train import finetune


def plain_loop(model, dataset, args) -> float:
    """The loop anyone would write: returns images/s of the last epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.train()
    rate = 0.0
    for epoch in range(args.epochs):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        rate = seen / (time.perf_counter() - start)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet121", help="a torchvision DenseNet builder name")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="training images used (from the digits data)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        write_sample_data("digits", root)
        # A subset of the train split as its own folder, so that both loops read the same files.
        splits = load_splits(root)
        order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0)).tolist()
        keep = [splits.train[i] for i in order[: args.images]]
        sub = Path(tmp) / "subset"
        for split, samples in (("train", keep), ("val", splits.val[::6])):
            for path, label in samples:
                dest = sub / split / str(label) / Path(path).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(Path(path).read_bytes())
        build = getattr(torchvision.models, args.model)
        torch.manual_seed(0)
        reference = build(num_classes=10)
        pre = resolve_preprocessing(None, args.image_size)
        dataset = ImageDataset(load_splits(sub).train, train_transform(pre, "light"), seed=0)

        model = build(num_classes=10)
        model.load_state_dict(reference.state_dict())
        plain = plain_loop(model, dataset, args)

        model = build(num_classes=10)
        model.load_state_dict(reference.state_dict())
        result = finetune(str(sub), out=str(Path(tmp) / "run"), model_obj=model, image_size=args.image_size,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment="light",
                          workers=args.workers, progress=False)
        ours = result["history"][-1]["train_images_per_s"]

    print(f"\n# hardware: {describe_hardware()}")
    print(f"{'loop':10s} {'images/s':>10s}   ({args.model}, {args.image_size} px, batch {args.batch_size}, "
          f"{len(keep)} images, {torch.get_num_threads()} threads, last of {args.epochs} epochs)")
    print(f"{'plain':10s} {plain:10.1f}")
    print(f"{'densenet_zoo':10s} {ours:10.1f}")
    print(f"ratio ours / plain: {ours / plain:.3f}")


if __name__ == "__main__":
    main()
