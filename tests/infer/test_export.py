"""ONNX (via onnxruntime), TorchScript and torch.export against the PyTorch model; export CLI."""

import numpy as np
import pytest
import torch

import densenet_zoo as dz
from densenet_zoo import cli
from densenet_zoo.infer.exporter import export, load_exported
from densenet_zoo.infer.fast import optimize_for_inference

ort = pytest.importorskip("onnxruntime")


def _tiny(**kwargs) -> dz.DenseNet:
    torch.manual_seed(0)
    args = dict(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)
    args.update(kwargs)
    model = dz.DenseNet(**args)
    with torch.no_grad():  # non-trivial statistics so eval differs from train
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _onnx_vs_torch(model, path, sizes, image_size):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # the batch axis is symbolic
    for n in sizes:
        x = torch.randn(n, model.in_chans, image_size, image_size)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4


def test_onnx_tiny_two_batch_sizes(tmp_path):
    model = _tiny()
    out = export(model, tmp_path / "tiny.onnx", "onnx", image_size=32)
    _onnx_vs_torch(model, out, (1, 5), 32)


def test_onnx_densenet121_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = dz.densenet121().eval()
    out = export(model, tmp_path / "d121.onnx", "onnx", image_size=64, check=False)  # checked here instead
    _onnx_vs_torch(model, out, (1, 3), 64)


def test_onnx_of_the_optimized_network(tmp_path):
    model = _tiny()
    fast = optimize_for_inference(model, channels_last=False)
    out = export(fast, tmp_path / "fast.onnx", "onnx", image_size=32)
    _onnx_vs_torch(model, out, (2, 4), 32)  # compared with the unfused model


def test_onnx_features_only(tmp_path):
    model = _tiny(features_only=True, out_indices=(1, 2))
    out = export(model, tmp_path / "feats.onnx", "onnx", image_size=32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert [g.shape for g in got] == [tuple(r.shape) for r in ref]
    assert all(np.abs(g - r.numpy()).max() <= 1e-4 * r.abs().max().item() for g, r in zip(got, ref))


def test_torchscript_round_trip(tmp_path):
    model = _tiny()
    out = export(model, tmp_path / "tiny.pt", "torchscript", image_size=32)
    loaded = torch.jit.load(str(out))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_torch_export_round_trip(tmp_path):
    model = _tiny()
    out = export(model, tmp_path / "tiny.pt2", "torch.export", image_size=32)
    program = torch.export.load(str(out))
    x = torch.randn(5, 3, 32, 32)  # a batch size other than the traced one
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), rtol=1e-4, atol=1e-5)
        assert torch.allclose(load_exported(out, "torch.export")(x), model(x), rtol=1e-4, atol=1e-5)


def test_bad_export_requests(tmp_path):
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        export(_tiny().train(), tmp_path / "t.onnx", "onnx", image_size=32)
    with pytest.raises(ValueError, match="unknown export format 'tflite'.*onnx, torchscript, torch.export"):
        export(_tiny(), tmp_path / "t.tflite", "tflite")
    with pytest.raises(ValueError, match="is a folder"):
        export(_tiny(), tmp_path, "onnx", image_size=32)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_cli_from_checkpoint(tmp_path, capsys):
    model = _tiny()
    ckpt = dz.save_model(model, tmp_path / "best.safetensors", class_names=list("abcde"))
    out = tmp_path / "m.onnx"
    rc = cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--image-size", "32"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    _onnx_vs_torch(model, out, (2,), 32)
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "caffe", "--out", str(out)]) == 1
    assert "invalid choice: 'caffe'" in capsys.readouterr().err  # one line that lists the choices
    assert cli.main(["export", "--format", "onnx", "--out", str(out)]) == 1
    assert "--model NAME" in capsys.readouterr().err
