"""Weights without a network: registry data, checkpoint formats, key normalisation, adaptation, safe loading."""

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import densenet_zoo as dz
from densenet_zoo.weights import cache as weights_cache
from densenet_zoo.weights import registry as hub
from densenet_zoo.weights.checkpoint import read_checkpoint
from densenet_zoo.weights.state_dict import adapt_input_conv, infer_config
from densenet_zoo.cli import main as cli_main
from densenet_zoo.memory import list_memory_strategies
from densenet_zoo.norms.registry import get_norm_factory
from _weights_helpers import TINY, legacy_state, randomize, save_legacy, tiny_torchvision

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def ref():
    return tiny_torchvision()


# -- registry data -------------------------------------------------------------------------------

def test_manifest_matches_torchvision_and_timm():
    tv = {a: getattr(torchvision.models, a.replace("densenet", "DenseNet") + "_Weights").IMAGENET1K_V1
          for a in ("densenet121", "densenet161", "densenet169", "densenet201")}
    for arch, w in tv.items():
        e = dz.get_weights(arch)
        assert e.default and e.url == w.url and e.name == f"{arch}.IMAGENET1K_V1"
        assert w.url.endswith(f"-{e.sha256}.pth")
        assert e.num_params == w.meta["num_params"] == sum(p.numel() for p in dz.create_model(arch).parameters())
        assert e.metrics["acc@1"] == w.meta["_metrics"]["ImageNet-1K"]["acc@1"]
        assert e.categories == w.meta["categories"]
    for name in timm.list_pretrained("densenet[0-9]*"):
        e = dz.get_weights(name)
        assert e.hf_hub_id == timm.models.get_pretrained_cfg(name).hf_hub_id == f"timm/{name}"
    assert hub.data_dir().joinpath("manifest.json").is_file()


def test_weights_names_resolve():
    tv = torchvision.models.DenseNet169_Weights.IMAGENET1K_V1
    assert dz.get_weights(tv).name == "densenet169.IMAGENET1K_V1"
    assert dz.get_weights("IMAGENET1K_V1", "densenet201").name == "densenet201.IMAGENET1K_V1"
    assert dz.get_weights("DEFAULT", "densenet161").name == "densenet161.IMAGENET1K_V1"
    assert dz.get_weights("hf-hub:timm/densenet121.ra_in1k").name == "densenet121.ra_in1k"
    with pytest.raises(dz.WeightsError, match="did you mean 'densenet121.tv_in1k'"):
        dz.get_weights("densenet121.tv_in1")
    with pytest.raises(dz.WeightsError, match="are for densenet161, not densenet121"):
        dz.densenet121(weights="densenet161.tv_in1k")  # refused before any download
    with pytest.raises(dz.WeightsError, match="DenseNet169_Weights.IMAGENET1K_V1 are weights for densenet169"):
        dz.densenet121(weights=tv)
    with pytest.raises(dz.WeightsError, match="no default weights registered for 'densenet264'"):
        dz.densenet264(pretrained=True)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DENSENET_ZOO_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert weights_cache.cache_dir() == tmp_path / "th" / "densenet_zoo"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights_cache.cache_dir() == tmp_path / "xdg" / "torch" / "densenet_zoo"
    monkeypatch.setenv("DENSENET_ZOO_CACHE", str(tmp_path / "mine"))
    assert weights_cache.cache_dir() == tmp_path / "mine"


def test_transforms_equal_the_references():
    img = Image.fromarray((torch.rand(300, 250, 3) * 255).byte().numpy())
    ours = dz.get_weights("densenet121").transforms()(img)
    theirs = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.transforms()(img)
    assert ours.shape == (3, 224, 224) and _max_diff(ours, theirs) <= 1e-6
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("densenet121", pretrained=False, pretrained_cfg_overlay=dict(
        **timm.models.get_pretrained_cfg("densenet121.ra_in1k").to_dict())))
    timm_tf = timm.data.create_transform(**cfg)
    assert _max_diff(dz.get_weights("densenet121.ra_in1k").transforms()(img), timm_tf(img)) <= 1e-5


def test_register_weights_and_user_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_REGISTRY", {})
    monkeypatch.setattr(hub, "_LOADED_MANIFESTS", [])
    e = dz.register_weights({"name": "densenet121.mine", "arch": "densenet121", "url": "https://example.org/d121-0123abcd.pth",
                             "num_classes": 10, "default": True})
    assert dz.get_weights("densenet121") is e and not dz.get_weights("densenet121.IMAGENET1K_V1").default
    with pytest.raises(dz.WeightsError, match="already registered"):
        dz.register_weights(e)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"name": "densenet169.x", "arch": "densenet169", "url": "file:///w/d169.pth"}]))
    monkeypatch.setenv("DENSENET_ZOO_MANIFEST", str(manifest))
    assert "densenet169.x" in dz.list_weights("densenet169*")
    with pytest.raises(dz.WeightsError, match="unknown field"):
        dz.register_weights({"name": "a.b", "arch": "densenet121", "url": "http://x/y.pth", "acc": 1})
    with pytest.raises(dz.WeightsError, match="not a hex digest"):
        dz.register_weights({"name": "a.b", "arch": "densenet121", "url": "http://x/y.pth", "sha256": "xyz"})


# -- formats and key normalisation -----------------------------------------------------------------

def _variants(sd):
    legacy = legacy_state(sd)
    return {
        "plain": sd,
        "legacy": legacy,
        "ddp": {"module." + k: v for k, v in sd.items()},
        "state_dict+optimizer": {"epoch": 3, "state_dict": {"module." + k: v for k, v in legacy.items()},
                                 "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
        "model": {"model": {"model." + k: v for k, v in sd.items()}},
        "model_state": {"model_state": {"backbone." + k: v for k, v in sd.items() if "num_batches" not in k}},
        "ema_only": {"ema": sd},
        "compiled": {"_orig_mod." + k: v for k, v in sd.items()},
    }


@pytest.mark.parametrize("variant", list(_variants(tiny_torchvision().state_dict())))
def test_real_world_checkpoints_load(ref, tmp_path, variant):
    obj = _variants(ref.state_dict())[variant]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = dz.DenseNet(**TINY)
    report = dz.load_weights(model, path, strict=True)
    assert report.ok and not report.adapted and not report.reinitialized
    assert len(report.loaded) >= len([k for k in ref.state_dict() if "num_batches" not in k])
    with torch.no_grad():
        assert _max_diff(model.eval()(X), ref(X)) <= 1e-5


def test_ema_is_taken_on_request(ref):
    other = tiny_torchvision(seed=9)
    ckpt = {"state_dict": ref.state_dict(), "state_dict_ema": other.state_dict(), "optimizer": {}}
    model = dz.DenseNet(**TINY).eval()
    assert dz.load_weights(model, ckpt).wrapper == "state_dict"
    with torch.no_grad():
        assert _max_diff(model(X), ref(X)) <= 1e-5
        assert dz.load_weights(model, ckpt, use_ema=True).wrapper == "state_dict_ema"
        assert _max_diff(model(X), other(X)) <= 1e-5


def test_report_and_strict_list_the_problems(ref):
    sd = dict(ref.state_dict())
    del sd["features.denseblock1.denselayer1.conv1.weight"]
    sd["features.extra.weight"] = torch.zeros(3)
    sd["features.norm5.running_mean"] = torch.zeros(7)
    model = dz.DenseNet(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dz.CheckpointFileError) as info:
        dz.load_weights(model, sd, strict=True)
    msg = str(info.value)
    for part in ("features.denseblock1.denselayer1.conv1.weight", "features.extra.weight", "features.norm5.running_mean (7,)"):
        assert part in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # strict failure changes nothing
    report = dz.load_weights(model, sd)
    assert report.missing == ["features.denseblock1.denselayer1.conv1.weight"]
    assert report.unexpected == ["features.extra.weight"]
    assert report.mismatched == [("features.norm5.running_mean", (7,), (model.num_features,))]
    assert torch.equal(model.features.conv0.weight, ref.features.conv0.weight)


def test_num_batches_tracked_missing_or_extra(ref):
    legacy = legacy_state(ref.state_dict())  # no num_batches_tracked
    model = dz.DenseNet(**TINY, norm_layer="frozen_bn" if "frozen_bn" in dz.list_norms() else None)
    assert dz.load_weights(model, legacy, strict=True).ok
    assert dz.load_weights(dz.DenseNet(**TINY), ref.state_dict(), strict=True).ok


# -- adaptation ------------------------------------------------------------------------------------

def test_num_classes_keeps_backbone_and_fresh_classifier(ref):
    torch.manual_seed(11)
    fresh = dz.DenseNet(**TINY, num_classes=10)
    torch.manual_seed(11)
    model = dz.DenseNet(**TINY, num_classes=10)
    report = dz.load_weights(model, ref.state_dict())
    assert report.ok and report.reinitialized == ["classifier.weight", "classifier.bias"]
    assert "freshly initialised" in str(report)
    assert torch.equal(model.classifier.weight, fresh.classifier.weight) and torch.equal(model.classifier.bias, torch.zeros(10))
    with torch.no_grad():
        assert _max_diff(model.eval().forward_features(X), ref.features(X).relu()) <= 1e-5


def test_adapt_input_conv_expected_tensors():
    w = torch.randn(8, 3, 7, 7)
    assert torch.equal(adapt_input_conv(w, 3), w)
    assert torch.allclose(adapt_input_conv(w, 1), w[:, 0:1] + w[:, 1:2] + w[:, 2:3])
    assert torch.allclose(adapt_input_conv(w, 7), torch.cat([w, w, w[:, :1]], 1) * (3 / 7))
    for c in (1, 2, 4, 7):
        assert torch.allclose(adapt_input_conv(w, c), timm.models.adapt_input_conv(c, w.clone()))
    with pytest.raises(dz.CheckpointFileError, match="3-channel"):
        adapt_input_conv(torch.randn(8, 4, 7, 7), 2)


def test_in_chans_1_sees_grey_like_rgb(ref):
    model = dz.DenseNet(**TINY, in_chans=1).eval()
    report = dz.load_weights(model, ref.state_dict(), strict=True)
    assert report.adapted == ["features.conv0.weight: in_chans 3 -> 1 (summed over RGB)"]
    grey = X[:, :1]
    with torch.no_grad():
        assert _max_diff(model(grey), ref(grey.expand(-1, 3, -1, -1))) <= 1e-4


def test_pretrained_entry_builds_with_other_head_and_input(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_REGISTRY", {})
    monkeypatch.setattr(hub, "_LOADED_MANIFESTS", [])
    src = randomize(dz.densenet_bc_100(), seed=2)
    path = dz.save_model(src, tmp_path / "bc.safetensors")
    dz.register_weights({"name": "densenet_bc_100.local", "arch": "densenet_bc_100", "url": path.as_uri(), "num_classes": 10,
                         "sha256": weights_cache.sha256_file(path), "default": True})
    m = dz.densenet_bc_100(pretrained=True, num_classes=3, in_chans=1)
    assert m.load_report.reinitialized == ["classifier.weight", "classifier.bias"] and len(m.load_report.adapted) == 1
    assert torch.allclose(m.features.conv0.weight, src.features.conv0.weight.sum(1, keepdim=True))
    for weights in ("densenet_bc_100.local", path.as_uri(), str(path)):
        m2 = dz.create_model("densenet_bc_100", weights=weights)
        assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), src.state_dict().values()))
    assert dz.create_model("densenet_bc_100.local", pretrained=True).weights_entry.name == "densenet_bc_100.local"
    tuned = randomize(dz.densenet121(num_classes=7, in_chans=1), seed=3)
    tuned_path = dz.save_model(tuned, tmp_path / "tuned.safetensors")
    back = dz.densenet121(weights=str(tuned_path))  # its own 7-class head and 1-channel stem
    assert back.num_classes == 7 and back.in_chans == 1 and back.load_report.ok and not back.load_report.reinitialized
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), tuned.state_dict().values()))
    with pytest.raises(dz.WeightsError, match="do not fit densenet_bc_100 with these arguments"):
        dz.densenet_bc_100(pretrained=True, growth_rate=8)


# -- norms and memory modes ------------------------------------------------------------------------

def _stat_norms():
    names = []
    for n in dz.list_norms():
        if any(b == "running_mean" for b, _ in get_norm_factory(n)(4).named_buffers()):
            names.append(n)
    return names


@pytest.mark.parametrize("norm", _stat_norms())
def test_loads_into_every_norm_with_statistics(ref, norm):
    model = dz.DenseNet(**TINY, norm_layer=norm).eval()
    assert dz.load_weights(model, legacy_state(ref.state_dict()), strict=True).ok
    with torch.no_grad():
        assert _max_diff(model(X), ref(X)) <= 1e-5


@pytest.mark.parametrize("strategy", list_memory_strategies())
def test_loads_in_every_memory_mode(ref, strategy):
    model = dz.DenseNet(**TINY, memory_efficient=strategy)
    assert dz.load_weights(model, ref.state_dict(), strict=True).ok
    ref_train = tiny_torchvision().train()
    x = X.clone().requires_grad_(False)
    out, expected = model.train()(x), ref_train(x)
    assert _max_diff(out, expected) <= 1e-5


# -- safe loading ----------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_malicious_pickle_never_runs(tmp_path, ref):
    marker = tmp_path / "side_effect"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": ref.state_dict(), "payload": _Evil(marker)}, path)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(dz.CheckpointFileError, match=r"refused to unpickle.*could run code.*safetensors"):
        dz.load_weights(dz.DenseNet(**TINY), path)
    with pytest.raises(dz.CheckpointFileError):
        read_checkpoint(raw)
    with pytest.raises(dz.CheckpointFileError):
        dz.convert_checkpoint(path, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load does run it
    assert marker.read_text() == "ran"


def test_html_and_truncated_local_files(tmp_path, ref):
    html = tmp_path / "w.pth"
    html.write_text("<!DOCTYPE html><html>Sign in</html>")
    with pytest.raises(dz.CheckpointFileError, match="HTML"):
        dz.load_weights(dz.DenseNet(**TINY), html)
    good = tmp_path / "g.pth"
    torch.save(ref.state_dict(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(dz.CheckpointFileError, match="truncated"):
        dz.load_weights(dz.DenseNet(**TINY), cut)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dz.densenet121(weights=str(tmp_path / "nope.safetensors"))


# -- safetensors round trip and conversion ---------------------------------------------------------

def test_safetensors_round_trip_is_exact(tmp_path):
    model = randomize(dz.DenseNet(**TINY, num_classes=5, in_chans=2), seed=6)
    path = dz.save_model(model, tmp_path / "m.safetensors", class_names=list("abcde"), preprocessing={"crop_size": 32})
    back, meta = dz.load_model(path)
    assert meta["class_names"] == list("abcde") and meta["preprocessing"] == {"crop_size": 32}
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), back.eval()(x))


def test_convert_cli(tmp_path, ref, capsys):
    ckpt = {"epoch": 1, "state_dict": {"module." + k: v for k, v in legacy_state(ref.state_dict()).items()}, "optimizer": {}}
    src = tmp_path / "trained.pth"
    torch.save(ckpt, src)
    out = tmp_path / "trained.safetensors"
    assert cli_main(["convert", str(src), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model, meta = dz.load_model(out)
    assert meta["model_args"]["block_config"] == [2, 2] and meta["converted_from"] == str(src)
    with torch.no_grad():
        assert _max_diff(model.eval()(X), ref(X)) <= 1e-5
    legacy = save_legacy(ref, tmp_path, "tiny")
    assert cli_main(["convert", legacy.as_uri(), str(tmp_path / "b.safetensors")]) == 0
    assert cli_main(["convert", str(tmp_path / "missing.pth"), str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_infer_config_of_published_architectures():
    for arch in ("densenet121", "densenet161", "densenet_bc_100"):
        cfg = infer_config(dz.create_model(arch).state_dict())
        ref = dz.model_config(arch)
        assert (cfg["growth_rate"], cfg["block_config"], cfg["num_init_features"]) == (
            ref["growth_rate"], tuple(ref["block_config"]), ref["num_init_features"])


def test_weights_list_cli(capsys):
    assert cli_main(["weights", "list", "densenet121*"]) == 0
    out = capsys.readouterr().out
    assert "densenet121.IMAGENET1K_V1" in out and "74.43" in out and "hf-hub:timm/densenet121.ra_in1k" in out
    assert cli_main(["weights", "download", "densenet999"]) == 1


def test_shipped_imagenet_class_names_are_torchvisions():
    from densenet_zoo.weights.registry import class_names

    assert list(class_names("imagenet1k")) == torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.meta["categories"]
    assert dz.get_weights("densenet121").categories == list(class_names("imagenet1k"))


def test_checkpoint_error_is_a_deprecated_name_of_checkpoint_file_error():
    # The old name clashed with torch.utils.checkpoint.CheckpointError (activation checkpointing).
    with pytest.warns(DeprecationWarning, match="use densenet_zoo.CheckpointFileError"):
        old = dz.CheckpointError
    assert old is dz.CheckpointFileError
    assert issubclass(old, dz.ZooError) and issubclass(old, RuntimeError)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchError'"):
        dz.NoSuchError  # noqa: B018


def test_the_error_family_keeps_the_builtin_bases():
    # ``except ValueError`` / ``except FileNotFoundError`` around our calls keeps working.
    assert issubclass(dz.UsageError, ValueError) and issubclass(dz.UsageTypeError, TypeError)
    assert issubclass(dz.MissingFileError, FileNotFoundError) and issubclass(dz.DataError, ValueError)
    with pytest.raises(ValueError) as info:
        dz.create_model("densenet_does_not_exist")
    assert isinstance(info.value, dz.UsageError)
    with pytest.raises(FileNotFoundError) as info:
        dz.load_model("/nonexistent/model.safetensors")
    assert isinstance(info.value, dz.ZooError)
