"""Weights or outputs that are not finite never become a prediction or an accuracy: such checkpoints are
refused on load (unless asked for), and predict / evaluate name non-finite outputs instead of printing nan%."""

from __future__ import annotations

import pytest
import torch

import densenet_zoo as dz
from densenet_zoo.cli import main
from densenet_zoo.infer.predict import Predictor
from densenet_zoo.train import evaluate_checkpoint
from _train_helpers import TINY, digits_subset

pytestmark = pytest.mark.usefixtures("one_thread")

PRE = {"size": 16, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_subset(tmp_path_factory.mktemp("nanw") / "digits", classes=3, train_per_class=2, val_per_class=2)


def _model(poison=None) -> dz.DenseNet:
    torch.manual_seed(0)
    model = dz.DenseNet(**TINY, num_classes=3).eval()
    if poison is not None:
        name, value = poison
        with torch.no_grad():
            dict(model.named_parameters(), **dict(model.named_buffers()))[name].view(-1)[0] = value
    return model


@pytest.mark.parametrize("poison", [("features.conv0.weight", float("nan")), ("classifier.bias", float("inf")),
                                    ("features.norm5.running_var", float("-inf"))])
def test_a_checkpoint_holding_nan_or_inf_is_refused_unless_asked_for(tmp_path, poison, data, capsys):
    path = dz.save_model(_model(poison), tmp_path / "diverged.safetensors", class_names=["0", "1", "2"], preprocessing=PRE)
    for load in (lambda **kw: dz.load_model(path, **kw), lambda **kw: dz.load_weights(_model(), path, **kw)):
        with pytest.raises(dz.CheckpointFileError) as info:
            load()
        text = str(info.value)
        assert "\n" not in text and str(path) in text and poison[0] in text and "allow_nonfinite=True" in text
        load(allow_nonfinite=True)  # the explicit opt-in
    for argv in (["predict", "--checkpoint", str(path), str(data / "val"), "-q"],
                 ["evaluate", "--checkpoint", str(path), "--data", str(data / "val"), "--out", str(tmp_path / "eval")],
                 ["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]):
        assert main(argv) == 1
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "nan or inf" in lines[0] and "nan%" not in out, (argv[0], err)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "m.onnx").exists()


def test_non_finite_outputs_are_named_not_printed_as_percentages(tmp_path, data, capsys):
    """Finite weights whose outputs overflow (a classifier of 3e38 everywhere): no prediction, no accuracy."""
    model = _model()
    with torch.no_grad():
        model.classifier.weight.fill_(3e38)
    predictor = Predictor(model, dz.get_weights("densenet121").transforms(), ["0", "1", "2"], optimize=False)
    images = sorted((data / "val").rglob("*.png"))
    results = predictor.predict(images, top_k=2, progress=False)
    assert all(r.error == "the model's output is not finite (nan/inf): no prediction" for r in results)
    path = dz.save_model(model, tmp_path / "overflow.safetensors", class_names=["0", "1", "2"], preprocessing=PRE)
    with pytest.raises(dz.DataError, match="non-finite outputs .* an accuracy over them would mean nothing"):
        evaluate_checkpoint(str(path), str(data / "val"), out=str(tmp_path / "eval"))
    assert main(["predict", "--checkpoint", str(path), str(data / "val"), "-q"]) == 1  # nothing predicted
    out, err = capsys.readouterr()
    assert "nan%" not in out and "%" not in out and "output is not finite" in err
