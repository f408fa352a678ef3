"""The main job: a real dataset, a DenseNet fine-tuned on it, evaluated, and used to predict.

    python examples/main_job.py            # what `make run` runs; a few minutes on a 2-core CPU

1. ``densenet-zoo sample-data digits data/digits``: scikit-learn's 1,797 handwritten digits as PNGs
   in class folders ``train/`` and ``val/`` (a fixed split);
2. ``densenet-zoo finetune``: a small CIFAR-style DenseNet-BC (3x3 stem, three dense blocks) at 16x16;
3. ``densenet-zoo evaluate``: accuracy on the held-out val split and a confusion matrix;
4. ``densenet-zoo predict``: the classes of a few val images.
"""

import shutil
import sys
import time
from pathlib import Path

from densenet_zoo.cli import main

ROOT = Path(__file__).resolve().parent.parent
DATA, OUT = ROOT / "data" / "digits", ROOT / "runs" / "main_job"
MODEL_ARGS = '{"growth_rate": 12, "block_config": [4, 4, 4], "num_init_features": 24}'


def run(*argv: str) -> None:
    print("$ densenet-zoo " + " ".join(a if " " not in a else f"'{a}'" for a in argv), flush=True)
    code = main(list(argv))
    if code:
        sys.exit(code)


start = time.perf_counter()
run("sample-data", "digits", str(DATA))
if (OUT / "config.json").is_file():  # this script's own previous output: start afresh
    shutil.rmtree(OUT)
run("finetune", "--data", str(DATA), "--out", str(OUT), "--model", "densenet_bc_100", "--model-args", MODEL_ARGS,
    "--image-size", "16", "--epochs", "6", "--batch-size", "64", "--lr", "0.1", "--warmup-epochs", "0.5",
    "--label-smoothing", "0.1", "--augment", "light", "--deterministic")
run("evaluate", "--checkpoint", str(OUT / "best.safetensors"), "--data", str(DATA / "val"))
images = [str(sorted((DATA / "val" / d).glob("*.png"))[0]) for d in ("0", "3", "5", "8")]
run("predict", "--checkpoint", str(OUT / "best.safetensors"), "--top-k", "3", "-q", *images)
print(f"\nplots: {OUT / 'curves.png'} (loss and accuracy per epoch), {OUT / 'confusion.png'} (confusion matrix)")
print(f"weights: {OUT / 'best.safetensors'}; metrics: {OUT / 'metrics.csv'}; total {time.perf_counter() - start:.0f} s")
