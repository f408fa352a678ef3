"""predict CLI on a folder of generated images with a checkpoint written by save_model; info CLI."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import densenet_zoo as dz
from densenet_zoo import cli
from densenet_zoo.data.images import open_image
from densenet_zoo.data.transforms import eval_transform, resolve_preprocessing

CLASSES = ["circle", "square", "triangle"]
PRE = {"size": 32, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture()
def checkpoint_and_images(tmp_path):
    torch.manual_seed(0)
    model = dz.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=len(CLASSES))
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    ckpt = dz.save_model(model.eval(), tmp_path / "run" / "best.safetensors", class_names=CLASSES, preprocessing=PRE)
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        mode = ["RGB", "L", "RGBA"][i % 3]  # grayscale and transparent images are converted
        arr = rng.integers(0, 256, size=(40, 48, 4 if mode == "RGBA" else 3) if mode != "L" else (40, 48), dtype=np.uint8)
        p = images / ("nested" if i == 4 else ".") / f"img{i}.png"
        Image.fromarray(arr, mode=mode).save(p)
        paths.append(p.resolve())
    (images / "broken.jpg").write_bytes(b"this is not a jpeg")
    (images / "notes.txt").write_text("not an image, ignored in folders")
    return model.eval(), ckpt, images, paths


def _reference_probs(model, path):
    x = eval_transform(resolve_preprocessing(PRE, None, 3))(open_image(path)).unsqueeze(0)
    with torch.no_grad():
        return model(x).softmax(1)[0]


def test_predict_folder_with_checkpoint(checkpoint_and_images, tmp_path, capsys):
    model, ckpt, images, paths = checkpoint_and_images
    out_csv = tmp_path / "pred.csv"
    rc = cli.main(["predict", "--checkpoint", str(ckpt), str(images), "--batch-size", "2", "--top-k", "2",
                   "--csv", str(out_csv), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "broken.jpg: unreadable image" in captured.err and "5 images predicted, 1 unreadable" in captured.err
    rows = {r["path"]: r for r in csv.DictReader(out_csv.open())}
    assert len(rows) == 6 and "notes.txt" not in "".join(rows)
    broken = [r for p, r in rows.items() if p.endswith("broken.jpg")][0]
    assert broken["error"] and broken["top1"] == ""
    for p in paths:
        row = [r for q, r in rows.items() if q.endswith(p.name)][0]
        ref = _reference_probs(model, p)
        values, indices = ref.topk(2)
        assert [row["top1"], row["top2"]] == [CLASSES[i] for i in indices]
        assert abs(float(row["top1_prob"]) - values[0].item()) <= 1e-4
        assert f"{p.name.split('.')[0]}" in captured.out


def test_predict_single_files_and_errors(checkpoint_and_images, capsys):
    model, ckpt, images, paths = checkpoint_and_images
    assert cli.main(["predict", "--checkpoint", str(ckpt), str(paths[0]), "--quiet", "--no-optimize"]) == 0
    out = capsys.readouterr().out
    top = CLASSES[int(_reference_probs(model, paths[0]).argmax())]
    assert out.startswith(f"{paths[0]}: {top} ")
    assert cli.main(["predict", "--checkpoint", str(ckpt), str(images / "missing.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["predict", "--model", "densenet121", str(paths[0])]) == 1
    assert "--pretrained" in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(ckpt), str(images / "broken.jpg"), "--quiet"]) == 1  # nothing readable
    assert cli.main(["predict", "--checkpoint", str(ckpt), str(paths[0]), "--top-k", "0"]) == 1


@pytest.mark.timeout(120)
def test_predict_console_script(checkpoint_and_images):
    _, ckpt, images, _ = checkpoint_and_images
    proc = subprocess.run([sys.executable, "-m", "densenet_zoo", "predict", "--checkpoint", str(ckpt), str(images / "nested")],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "img4.png:" in proc.stdout and any(c in proc.stdout for c in CLASSES)


def test_progress_bar_on_request(checkpoint_and_images, capsys):
    from densenet_zoo.infer.predict import Predictor

    _, ckpt, _, paths = checkpoint_and_images
    results = Predictor.from_checkpoint(ckpt).predict(paths, batch_size=2, top_k=1, progress=True)
    assert [r.path for r in results] == [str(p) for p in paths] and all(r.error is None for r in results)
    assert "5/5" in capsys.readouterr().err  # tqdm's counter


def test_info_flops_match_torchvision_published_ops(capsys):
    from torchvision.models import DenseNet121_Weights

    from densenet_zoo.infer.info import model_info

    info = model_info("densenet121")
    assert info["params"] == DenseNet121_Weights.IMAGENET1K_V1.meta["num_params"]
    # torchvision publishes multiply-adds as "GFLOPS"; the flop counter counts 2 per multiply-add
    assert abs(info["gmacs"] - DenseNet121_Weights.IMAGENET1K_V1.meta["_ops"]) <= 0.01 * info["gmacs"]
    assert info["layers"]["dense_layers"] == 58 and info["layers"]["conv"] == 120
    assert cli.main(["info", "densenet_bc_100"]) == 0
    out = capsys.readouterr().out
    assert "densenet_bc_100" in out and "GFLOPs" in out and "preprocessing" in out


def test_output_into_a_closed_pipe_ends_quietly():
    """``densenet-zoo weights list | head -1``: the reader leaves early; no traceback on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "densenet_zoo", "weights", "list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=110) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
