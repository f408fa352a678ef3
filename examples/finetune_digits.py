"""Fine-tune from Python (a notebook, a script): the digits data, a small DenseNet, then evaluate.

    python examples/finetune_digits.py [--epochs 3]

The same as the command line; every keyword of ``dz.finetune`` is a field of ``dz.TrainConfig``.
"""

import argparse
from pathlib import Path

import densenet_zoo as dz
from densenet_zoo.data.sample_data import write_sample_data
from densenet_zoo.train.evaluate import evaluate_checkpoint

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--out", default="runs/finetune_digits")
args = p.parse_args()

data = Path("data/digits")
write_sample_data("digits", data)  # reused when already there
out = Path(args.out)
if (out / "state.pt").is_file():
    result = dz.finetune(resume=str(out), epochs=args.epochs)  # continue (or extend) the saved run
else:
    result = dz.finetune(
        str(data), out=str(out),
        model="densenet_bc_100", model_args={"growth_rate": 12, "block_config": [4, 4, 4], "num_init_features": 24},
        image_size=16, epochs=args.epochs, batch_size=64, lr=0.1, warmup_epochs=0.5, label_smoothing=0.1,
        augment="light", seed=0,
    )
print(f"best val acc@1 {result['best_acc1']:.2f}% (epoch {result['best_epoch']})")
report = evaluate_checkpoint(str(out / "best.safetensors"), str(data / "val"))
print(f"evaluate: acc@1 {report['acc1']:.2f}%, acc@5 {report['acc5']:.2f}%; confusion matrix in {report['confusion_png']}")
model, meta = dz.load_model(out / "best.safetensors")
print(f"the checkpoint rebuilds {meta['arch']} with classes {meta['class_names']} and preprocessing {meta['preprocessing']}")
