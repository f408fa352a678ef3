"""int8 inference: accuracy of the digits model against float32, the per-layer fallback, the saved
file (round trip, forged files refused), calibration from a folder, and the quantize/predict CLI."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="int8 quantization runs on onnxruntime (the [export] extra)")
onnx = pytest.importorskip("onnx", reason="int8 files are ONNX (the [export] extra)")

import densenet_zoo as dz  # noqa: E402
from densenet_zoo import CheckpointFileError, DataError  # noqa: E402
from densenet_zoo.cli.app import main  # noqa: E402
from densenet_zoo.infer.int8 import calibration_batches  # noqa: E402
from densenet_zoo.infer.quantized import _META_KEY, _graph_digest  # noqa: E402
from densenet_zoo.data.images import open_image  # noqa: E402
from densenet_zoo.data.sample_data import write_sample_data  # noqa: E402
from densenet_zoo.data.transforms import eval_transform, resolve_preprocessing  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = Path(__file__).resolve().parents[2] / "weights" / "densenet_bc_100_digits.safetensors"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_sample_data("digits", root)
    model, meta = dz.load_model(DIGITS)
    return model.eval(), meta, root


@pytest.fixture(scope="module")
def digits_int8(digits):
    model, meta, root = digits
    return dz.quantize(model, root / "train", num_images=128, preprocessing=meta["preprocessing"],
                       class_names=meta["class_names"], threads=1)


def _held_out(root: Path, meta: dict):
    """Normalised val images and labels, read independently of the quantizer (one class folder each)."""
    transform = eval_transform(resolve_preprocessing(meta["preprocessing"], None, 3))
    xs, ys = [], []
    for label, name in enumerate(meta["class_names"]):
        for path in sorted((root / "val" / name).iterdir()):
            xs.append(transform(open_image(path, 3)))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def test_digits_int8_keeps_the_accuracy_of_float32(digits, digits_int8):
    model, meta, root = digits
    x, y = _held_out(root, meta)
    assert len(y) == 359
    with torch.no_grad():
        p32 = model(x).argmax(1)
    p8 = digits_int8(x).argmax(1)
    acc32, acc8 = 100 * float((p32 == y).float().mean()), 100 * float((p8 == y).float().mean())
    assert abs(acc8 - acc32) <= 0.5, (acc32, acc8)
    assert float((p8 == p32).float().mean()) >= 0.98
    assert digits_int8.meta["calibration_images"] == 128  # a folder tree, sampled across its classes


def _tiny(num_classes: int = 5, small_inputs: bool = True, seed: int = 0) -> dz.DenseNet:
    torch.manual_seed(seed)
    model = dz.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=num_classes, small_inputs=small_inputs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_fallback_keeps_a_hurting_layer_in_float_and_meets_the_target():
    model = _tiny(small_inputs=False)
    with torch.no_grad():  # one stem channel ~1e4, normalised away by every norm that reads it: the float
        model.features.norm0.weight[0], model.features.norm0.bias[0] = 1e4, 1e4  # model is fine, a per-tensor
        for norm in (model.features.denseblock1.denselayer1.norm1, model.features.denseblock1.denselayer2.norm1,
                     model.features.transition1.norm):  # uint8 range over that tensor drowns the other channels
            norm.running_mean[0], norm.running_var[0] = 1e4, 1e8
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 64, 64, generator=g) for _ in range(4)]
    fresh = torch.randn(32, 3, 64, 64, generator=g)
    with torch.no_grad():
        want = model(fresh)
    plain = dz.quantize(model, batches, max_float_nodes=0, threads=1)
    assert plain.float_nodes == [] and _rel_error(plain(fresh), want) > 0.5
    q = dz.quantize(model, batches, max_error=0.05, threads=1)
    assert q.float_nodes and q.meta["error"] <= 0.05
    assert any("denseblock1/denselayer1/norm1" in n for n in q.float_nodes)
    assert _rel_error(q(fresh), want) <= 0.05  # on images it was not calibrated on


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    model = _tiny()
    q = dz.quantize(model, [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))], threads=1)
    return model, q, q.save(tmp_path_factory.mktemp("q") / "tiny.int8.onnx")


def test_saved_file_round_trip(tiny_file):
    model, q, path = tiny_file
    loaded = dz.load_quantized(path)
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(loaded(x), q(x), atol=0, rtol=0)
    assert loaded.meta == q.meta and loaded(x).dtype == torch.float32
    with torch.no_grad():
        assert _rel_error(loaded(x), model(x)) < 0.1
    with pytest.raises(DataError, match="32 px"):
        loaded(torch.randn(2, 3, 64, 64))


def _rewrite(proto, path: Path, meta_from=None) -> Path:
    """Write ``proto`` with valid-looking metadata (checksum recomputed), as a forger would."""
    import json

    props = {p.key: p.value for p in (meta_from or proto).metadata_props}
    meta = dict(json.loads(props[_META_KEY]), graph_sha256=_graph_digest(proto))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {_META_KEY: json.dumps(meta)})
    path.write_bytes(proto.SerializeToString())
    return path


def _forgeries(tiny_file, tmp_path):
    _, _, path = tiny_file
    data = path.read_bytes()
    (tmp_path / "random.onnx").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                         dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    yield "random bytes", tmp_path / "random.onnx"
    yield "truncated", tmp_path / "truncated.onnx"
    edited = bytearray(data)
    edited[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.onnx").write_bytes(bytes(edited))
    yield "one byte changed", tmp_path / "flipped.onnx"
    custom = onnx.load_from_string(data)
    custom.graph.node[3].domain = "evil.ops"
    custom.opset_import.add(domain="evil.ops", version=1)
    yield "custom-domain op", _rewrite(custom, tmp_path / "custom.onnx")
    external = onnx.load_from_string(data)
    weight = next(t for t in external.graph.initializer if t.dims)
    weight.ClearField("raw_data"), weight.ClearField("float_data"), weight.ClearField("int32_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../../../etc/passwd")
    yield "external data outside", _rewrite(external, tmp_path / "external.onnx")
    other = dz.quantize(_tiny(num_classes=5, seed=3), [torch.randn(4, 3, 48, 48)], threads=1)
    other_path = other.save(tmp_path / "other.onnx")
    yield "another model, other input shape", _rewrite(onnx.load(str(other_path)), tmp_path / "other_forged.onnx",
                                                     meta_from=onnx.load_from_string(data))
    plain = dz.export(tiny_file[0], tmp_path / "plain.onnx", image_size=32)
    yield "a float ONNX without our metadata", plain


def test_forged_files_are_refused_with_one_line(tiny_file, tmp_path):
    for what, path in _forgeries(tiny_file, tmp_path):
        with pytest.raises(CheckpointFileError) as info:
            dz.load_quantized(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "quantize" in message, (what, message)


def test_calibration_batches_are_checked():
    model = _tiny()
    with pytest.raises(DataError, match="calibration batch 1"):
        calibration_batches([torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)], model)
    with pytest.raises(DataError, match="no images"):
        calibration_batches([], model)
    assert sum(len(b) for b in calibration_batches([torch.randn(8, 3, 32, 32)] * 3, model, num_images=20)) == 20
    with pytest.raises(ValueError, match="eval"):
        dz.quantize(model.train(), [torch.randn(2, 3, 32, 32)])
    with pytest.raises(DataError, match="not a folder"):
        dz.quantize(model.eval(), "no/such/folder")


def test_cli_quantize_then_predict(digits, tmp_path, capsys):
    _, meta, root = digits
    out = tmp_path / "digits.int8.onnx"
    assert main(["quantize", str(DIGITS), "--calibration", str(root / "train"), "--out", str(out), "--num-images", "64"]) == 0
    assert "wrote" in capsys.readouterr().out and dz.load_quantized(out).meta["class_names"] == meta["class_names"]
    image = sorted((root / "val" / "7").iterdir())[0]
    assert main(["predict", "--checkpoint", str(out), str(image), "-q", "--top-k", "1"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(str(image)) and printed.endswith("%") and ": 7 " in printed, printed
    assert main(["quantize", str(DIGITS), "--calibration", str(tmp_path / "missing"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--calibration" in err
