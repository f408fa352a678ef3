"""The project's own weights (weights/densenet_bc_100_digits.safetensors): file, card, registry
entry, and the accuracy the card states, measured again on the held-out digits."""

import hashlib
from pathlib import Path

import pytest
import torch

import densenet_zoo as dz

pytestmark = pytest.mark.usefixtures("one_thread")

from densenet_zoo.weights import registry as hub
from densenet_zoo.data.sample_data import write_sample_data
from densenet_zoo.train.evaluate import evaluate_checkpoint


WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
FILE = WEIGHTS / "densenet_bc_100_digits.safetensors"




def _registered_path() -> Path:
    return hub.data_dir() / FILE.name


def test_file_card_and_entry_agree():
    entry = dz.get_weights("densenet_bc_100.digits")
    path = _registered_path()
    data = path.read_bytes()
    assert len(data) == entry.file_size < 5 * 2**20
    assert hashlib.sha256(data).hexdigest() == entry.sha256
    model, meta = dz.load_model(path)
    assert meta["arch"] == entry.arch == "densenet_bc_100" and meta["class_names"] == entry.categories == [str(i) for i in range(10)]
    assert sum(p.numel() for p in model.parameters()) == entry.num_params == sum(p.numel() for p in dz.densenet_bc_100().parameters())
    card = (WEIGHTS / "densenet_bc_100_digits.md").read_text()
    assert entry.sha256 in card and f"{entry.metrics['acc@1']:.2f} % top-1" in card


@pytest.mark.timeout(180)
def test_stated_accuracy_on_the_held_out_digits(tmp_path):
    entry = dz.get_weights("densenet_bc_100.digits")
    data = tmp_path / "digits"
    write_sample_data("digits", data)
    report = evaluate_checkpoint(str(_registered_path()), str(data / "val"), out=str(tmp_path))
    assert report["count"] == 359
    assert report["acc1"] == pytest.approx(entry.metrics["acc@1"], abs=0.01)
    assert report["acc1"] > 99.0


def test_create_model_pretrained_loads_the_file_offline(monkeypatch):
    monkeypatch.setenv("DENSENET_ZOO_OFFLINE", "1")
    model = dz.create_model("densenet_bc_100.digits", pretrained=True).eval()
    ref, _ = dz.load_model(_registered_path())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x), atol=0, rtol=0)
