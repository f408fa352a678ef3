"""The checks timm runs on its own registered models (after timm's tests/test_models.py), on every ``dz_*`` name,
plus timm's data config, optimizer factory and ``pretrained=True`` through our loader on a served file.

Inputs are small (the smallest each model takes, or 32-64 px); outputs are compared with the untraced /
unwrapped model, with slicing the plain forward, and with our registry's own preprocessing.
"""

import json
import math

import numpy as np
import pytest
import timm
import timm.optim
import torch
from PIL import Image
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import densenet_zoo as dz
from densenet_zoo.weights import cache as weights_cache
from densenet_zoo.weights import registry as hub
from _weights_helpers import LoopbackServer, isolated_registry

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

NAMES = timm.list_models("dz_*")
FEATURE_CLASSES = ("getter", "list", "dict", "hook", "fx")  # every class timm's factory knows


def _size(model) -> int:
    """The smallest square input the model takes, rounded up to a multiple of 8 (timm's tests use 96-384)."""
    return max(8, math.ceil(model.pretrained_cfg["min_input_size"][-1] / 8) * 8)


def test_every_builder_is_registered_and_timm_keeps_its_own():
    assert NAMES == sorted(f"dz_{n}" for n in dz.list_models())
    assert type(timm.create_model("densenet121")).__module__ == "timm.models.densenet"


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_grad_checkpointing(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, _size(model), _size(model))
    with torch.no_grad():
        out = model(x)
        model.set_grad_checkpointing()
        assert model.memory_strategy.name == "bottleneck"
        assert torch.allclose(model(x), out, rtol=1e-4, atol=1e-5)
    assert out.shape == (1, model.num_classes) and not out.isnan().any()


@pytest.mark.parametrize("name", NAMES)
def test_backward(name):
    model = timm.create_model(name, num_classes=42).train()
    x = torch.randn(2, 3, _size(model), _size(model))
    out = model(x)
    out.mean().backward()
    assert out.shape == (2, 42) and not out.isnan().any()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_and_head(name):
    model = timm.create_model(name).eval()
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg and cfg == timm.models.get_pretrained_cfg(name).to_dict()
    assert model.num_classes == cfg["num_classes"] and model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    arch = dz.model_config(name[3:])
    # pool_size: the final map at input_size (run at that size for the small models, by geometry for the others)
    side = cfg["input_size"][-1] if name in ("dz_densenet121", "dz_densenet_bc_100") else _size(model)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
    expected = cfg["pool_size"] if side == cfg["input_size"][-1] else (dz.models.inputs.final_map_size(side, len(arch["block_config"]), bool(arch.get("small_inputs"))),) * 2
    assert feats.shape[1] == model.num_features and tuple(feats.shape[-2:]) == tuple(expected)
    assert pre.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == pre.shape
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(x).shape == feats.shape
    bare = timm.create_model(name, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert bare(x).shape == feats.shape


def test_pretrained_cfgs_are_our_registry():
    """Every weights entry is a timm tag whose cfg is the entry's preprocessing; defaults match ours."""
    tags = timm.list_pretrained("dz_*")
    packaged = {e.name: e for e in hub.read_manifest(hub.data_dir() / "manifest.json")}  # tags known at import
    assert sorted(tags) == sorted("dz_" + n for n in packaged)
    for tag in tags:
        entry, cfg = packaged[tag[3:]], timm.models.get_pretrained_cfg(tag)
        pre = entry.preprocessing
        assert cfg.input_size == (3, pre["crop_size"], pre["crop_size"]) and cfg.interpolation == pre["interpolation"]
        assert cfg.crop_pct == pytest.approx(pre["crop_pct"]) and cfg.mean == tuple(pre["mean"]) and cfg.std == tuple(pre["std"])
        assert cfg.num_classes == entry.num_classes and cfg.first_conv == "features.conv0" and cfg.classifier == "classifier"
        assert cfg.has_weights
    assert timm.models.get_pretrained_cfg("dz_densenet121").tag == next(e.tag for e in packaged.values() if e.default and e.arch == "densenet121")
    assert timm.models.get_pretrained_cfg("dz_densenet121.ra_in1k").test_input_size == (3, 288, 288)
    assert not timm.models.get_pretrained_cfg("dz_densenet_bc_100").has_weights  # no default weights in our registry


def test_data_config_and_transform_give_our_preprocessing():
    model = timm.create_model("dz_densenet121")
    config = timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (3, 224, 224) and config["interpolation"] == "bilinear" and config["crop_pct"] == 0.875
    transform = timm.data.create_transform(**config)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    ours = dz.get_weights("densenet121").transforms()(image)
    assert torch.allclose(transform(image), ours, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_every_feature_class(name):
    """timm's feature classes with a real FeatureInfo; every class gives the same maps as forward_intermediates."""
    torch.manual_seed(0)
    ref = timm.create_model(name).eval()
    x = torch.randn(1, 3, _size(ref), _size(ref))
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
    for cls in FEATURE_CLASSES:
        torch.manual_seed(0)  # the same initial weights as ref (the wrappers rename the backbone's keys)
        feats = timm.create_model(name, features_only=True, feature_cls=cls).eval()
        assert isinstance(feats.feature_info, FeatureInfo)
        assert feats.feature_info.channels() == [i["num_chs"] for i in ref.feature_info]
        assert feats.feature_info.reduction() == [i["reduction"] for i in ref.feature_info]
        with torch.no_grad():
            out = feats(x)
        out = list(out.values()) if isinstance(out, dict) else out
        assert len(out) == len(expected), cls
        for o, e in zip(out, expected):
            assert torch.allclose(o, e, atol=1e-5), (cls, o.shape)
    some = timm.create_model(name, features_only=True, out_indices=(1, -1))
    assert some.feature_info.out_indices == (1, len(ref.feature_info) - 1)


def test_features_only_matches_slicing_the_plain_forward():
    """Independent of forward_intermediates: cut the plain network by hand (densenet121, taps 1..4)."""
    torch.manual_seed(1)
    full = timm.create_model("dz_densenet121").eval()
    f, x = full.features, torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        b1 = f[3:5](f[:3](x))
        b2 = f[5:7](b1)
        b3 = f[7:9](b2)
        expected = [b1, b2, b3, torch.relu(f[9:](b3))]
        for cls in FEATURE_CLASSES:
            torch.manual_seed(1)
            feats = timm.create_model("dz_densenet121", features_only=True, out_indices=(1, 2, 3, 4), feature_cls=cls)
            out = feats.eval()(x)
            out = list(out.values()) if isinstance(out, dict) else out
            assert len(out) == 4, cls
            for got, e in zip(out, expected):
                assert torch.allclose(got, e, atol=1e-5), cls


@pytest.mark.parametrize("name", ["dz_densenet121", "dz_densenet_bc_100"])
def test_forward_intermediates_arguments(name):
    model = timm.create_model(name).eval()
    n = len(model.feature_info)
    info = FeatureInfo(model.feature_info, n)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, output_fmt="NCHW")
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
        for c, r, m in zip(info.channels(), info.reduction(), maps):
            assert m.shape == (2, c, math.ceil(64 / r), math.ceil(64 / r))
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)  # last two
        assert [torch.equal(a, b) for a, b in zip(only, maps[-2:])] == [True, True]
        picked = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        assert torch.equal(picked[0], maps[0]) and torch.equal(picked[1], maps[-2])
        early, got = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(early, maps[1]) and torch.equal(got[0], maps[1])
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(normed, maps))
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        assert all(torch.equal(a, b.permute(0, 2, 3, 1)) for a, b in zip(nhwc, maps))
        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x)
        assert torch.allclose(again, final, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="output_fmt must be one of"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_prune_intermediate_layers():
    model = timm.create_model("dz_densenet_bc_100").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 2])
    assert kept == [0, 2]
    assert list(model.features._modules)[-1] == "denseblock2" and model.num_classes == 0 and model.global_pool == ""
    assert len(model.feature_info) == 3 and model.num_features == model.head_hidden_size == model.feature_info[2]["num_chs"]
    with torch.no_grad():
        got = model.forward_intermediates(x, kept, intermediates_only=True)
        assert torch.equal(got[0], maps[0]) and torch.equal(got[1], maps[2])
        assert torch.equal(model(x), maps[2])  # the features now end at tap 2
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, [3])
    whole = timm.create_model("dz_densenet_bc_100")
    assert whole.prune_intermediate_layers(2) == [2, 3] and whole.num_classes == 0 and "norm5" in whole.features._modules


def _timm_fx_model(model, train=False):
    """As timm's tests build one: torchvision's extractor with timm's non-traceable module/function lists."""
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kwargs)


@pytest.mark.parametrize("name", ["dz_densenet121", "dz_densenet_bc_100", "dz_densenet_bc_250"])
def test_fx_forward_and_backward(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, _size(model), _size(model))
    with torch.inference_mode():
        out = model(x)
        fx_out = torch.cat(tuple(_timm_fx_model(model)(x).values()))
    assert torch.equal(fx_out, out)
    model = timm.create_model(name, num_classes=42).train()
    fx = _timm_fx_model(model, train=True)
    y = torch.cat(tuple(fx(torch.randn(2, 3, _size(model), _size(model))).values()))
    y.mean().backward()
    assert y.shape == (2, 42) and all(p.grad is not None for p in model.parameters())


def test_torchscript_of_the_model_of_its_fx_graph_and_of_fx_features():
    """timm's test_model_forward_torchscript, test_model_forward_fx_torchscript and ..._with_features_fx."""
    with timm.layers.set_layer_config(scriptable=True):
        model = timm.create_model("dz_densenet_bc_100").eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        out = model(x)
        assert torch.equal(torch.jit.script(model)(x), out)
        assert torch.equal(torch.jit.script(_timm_fx_model(model))(x)["classifier"], out)
    feats = timm.create_model("dz_densenet_bc_100", features_only=True, feature_cls="fx").eval()
    scripted = torch.jit.script(feats)
    with torch.inference_mode():
        maps = scripted(x)
    assert isinstance(maps, list) and [m.shape[1] for m in maps] == feats.feature_info.channels()
    with pytest.raises(Exception, match="in_chans=3"):  # the input checks survive tracing and scripting
        scripted(torch.randn(1, 1, 16, 16))


def test_layer_decay_optimizer_groups():
    model = timm.create_model("dz_densenet_bc_100", block_config=(2, 3, 2), num_classes=4)
    opt = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.7)
    scale = {}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[p] = group["lr_scale"]
    named = dict(model.named_parameters())
    assert set(scale) == set(named.values())
    layers = 1 + 7 + 1  # stem, seven dense layers, then norm5 with the classifier
    assert scale[named["classifier.weight"]] == 1.0 and scale[named["features.norm5.weight"]] == 1.0
    assert scale[named["features.conv0.weight"]] == pytest.approx(0.7 ** (layers - 1))
    assert scale[named["features.transition1.conv.weight"]] == scale[named["features.denseblock1.denselayer2.conv1.weight"]]
    assert scale[named["features.denseblock2.denselayer1.conv1.weight"]] == pytest.approx(0.7 ** (layers - 4))
    assert dz.models.timm_methods.JOIN_PREVIOUS_GROUP == timm.models._manipulate.MATCH_PREV_GROUP
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + 3 + 1


def test_unsupported_timm_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="drop_path_rate.*no stochastic depth"):
        timm.create_model("dz_densenet_bc_100", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="cache_dir.*DENSENET_ZOO_CACHE"):
        timm.create_model("dz_densenet_bc_100", cache_dir="/tmp/x")
    with pytest.raises(dz.WeightsError, match="no default weights registered for 'densenet_bc_100'"):
        timm.create_model("dz_densenet_bc_100", pretrained=True)
    with pytest.raises(dz.WeightsError, match="unknown weights 'densenet121.nope'"):
        timm.create_model("dz_densenet121.nope", pretrained=True)


# -- pretrained=True through our loader ---------------------------------------------------------

@pytest.fixture
def registry(tmp_path, monkeypatch):
    """An empty cache, a fresh registry, no offline switch, no proxy for the loopback server."""
    cache = isolated_registry(tmp_path, monkeypatch)
    server = LoopbackServer()
    yield cache, server
    server.close()


def _published(tmp_path, seed=5):
    """A densenet_bc_100 with random weights saved as torchvision does (``name-<sha256[:8]>.pth``)."""
    torch.manual_seed(seed)
    src = dz.densenet_bc_100(num_classes=10).eval()
    with torch.no_grad():
        for name, t in src.state_dict().items():
            if t.is_floating_point() and t.dim() == 1:
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name or "weight" in name else torch.randn_like(t) * 0.1)
    path = tmp_path / "tmp.pth"
    torch.save(src.state_dict(), path)
    digest = weights_cache.sha256_file(path)
    final = path.rename(tmp_path / f"densenet_bc_100-{digest[:8]}.pth")
    return src, final, digest


def test_pretrained_through_our_loader_from_a_served_file(registry, tmp_path, monkeypatch):
    cache, server = registry
    src, path, digest = _published(tmp_path)
    url = server.serve("/w/" + path.name, path.read_bytes())
    dz.register_weights({"name": "densenet_bc_100.served", "arch": "densenet_bc_100", "url": url, "sha256": digest,
                         "num_classes": 10, "preprocessing": {"resize_size": 40, "crop_size": 36, "interpolation": "bicubic"}})
    x = torch.randn(2, 3, 36, 36)
    model = timm.create_model("dz_densenet_bc_100.served", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), src(x), atol=1e-5)
    assert server.requests == ["/w/" + path.name] and (cache / path.name).is_file()
    assert model.weights_entry.name == "densenet_bc_100.served" and model.load_report.ok
    config = timm.data.resolve_data_config(model=model)  # a tag registered after import has its cfg too
    assert config["input_size"] == (3, 36, 36) and config["interpolation"] == "bicubic" and config["crop_pct"] == 0.9

    # again: from the cache, offline too; adapted head and input channels; features
    monkeypatch.setenv("DENSENET_ZOO_OFFLINE", "1")
    feats = timm.create_model("dz_densenet_bc_100.served", pretrained=True, features_only=True).eval()
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(feats(x), src.forward_intermediates(x, intermediates_only=True)))
    gray = timm.create_model("dz_densenet_bc_100.served", pretrained=True, in_chans=1, num_classes=5)
    assert gray.features.conv0.in_channels == 1 and gray.num_classes == 5
    assert server.requests == ["/w/" + path.name]


def test_pretrained_checks_hash_and_offline_rules(registry, tmp_path, monkeypatch):
    cache, server = registry
    _, path, digest = _published(tmp_path)
    body = bytearray(path.read_bytes())
    body[-100] ^= 0xFF  # corrupted in transit
    url = server.serve("/w/" + path.name, bytes(body))
    dz.register_weights({"name": "densenet_bc_100.bad", "arch": "densenet_bc_100", "url": url, "sha256": digest, "num_classes": 10})
    with pytest.raises(dz.WeightsError, match="sha256"):
        timm.create_model("dz_densenet_bc_100.bad", pretrained=True)
    assert not (cache / path.name).exists()
    monkeypatch.setenv("DENSENET_ZOO_OFFLINE", "1")
    with pytest.raises(dz.WeightsError, match="offline"):
        timm.create_model("dz_densenet_bc_100.bad", pretrained=True)


def test_pretrained_from_a_file_url_and_the_packaged_weights(registry, tmp_path):
    src, path, digest = _published(tmp_path, seed=7)
    manifest = tmp_path / "mine.json"
    manifest.write_text(json.dumps([{"name": "densenet_bc_100.local", "arch": "densenet_bc_100", "url": path.as_uri(),
                                     "sha256": digest, "num_classes": 10}]))
    x = torch.randn(1, 3, 32, 32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSENET_ZOO_MANIFEST", str(manifest))
        model = timm.create_model("dz_densenet_bc_100.local", pretrained=True).eval()
        with torch.no_grad():
            assert torch.allclose(model(x), src(x), atol=1e-5)
    digits = timm.create_model("dz_densenet_bc_100.digits", pretrained=True).eval()
    ref = dz.densenet_bc_100(weights="densenet_bc_100.digits").eval()
    with torch.no_grad():
        assert torch.allclose(digits(x), ref(x), atol=1e-6)
    overlay = timm.create_model("dz_densenet_bc_100", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert torch.allclose(overlay(x), src(x), atol=1e-5)
