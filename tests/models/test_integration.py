"""features_only / forward_intermediates against slicing the normal forward; timm factory; torch.hub."""

from pathlib import Path

import pytest
import timm
import torch
import torchvision

import densenet_zoo as dz

REPO = Path(__file__).resolve().parents[2]


def _tiny(**kwargs) -> dz.DenseNet:
    args = dict(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, num_classes=5)
    args.update(kwargs)
    return dz.DenseNet(**args).eval()


def test_features_only_densenet121_shapes_and_values():
    torch.manual_seed(0)
    full = dz.densenet121().eval()
    feats = dz.densenet121(features_only=True, out_indices=(1, 2, 3, 4)).eval()
    feats.load_state_dict(full.state_dict())  # same keys: pretrained weights load as they are
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = feats(x)
        f = full.features  # the plain network, cut by hand: stem | block1 | t1+block2 | t2+block3 | t3+block4+norm5
        stem = f[:3](x)
        b1 = f[3:5](stem)
        b2 = f[5:7](b1)
        b3 = f[7:9](b2)
        final = torch.relu(f[9:](b3))
        expected = [b1, b2, b3, final]
        assert torch.allclose(final, full.forward_features(x), atol=1e-5)
    assert len(maps) == 4
    for i, (m, e) in enumerate(zip(maps, expected), start=1):
        info = feats.feature_info[i]
        assert m.shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
        assert torch.allclose(m, e, atol=1e-5)
    assert [i["num_chs"] for i in feats.feature_info] == [64, 256, 512, 1024, 1024]
    assert [i["reduction"] for i in feats.feature_info] == [2, 4, 8, 16, 32]
    with torch.no_grad():
        last, inter = full.forward_intermediates(x, indices=(0, 2))
        assert torch.allclose(last, final, atol=1e-5)
        assert torch.allclose(inter[0], stem, atol=1e-5) and torch.allclose(inter[1], b2, atol=1e-5)


def test_forward_intermediates_stop_early_and_small_inputs():
    model = _tiny(small_inputs=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(final, maps[0]) and torch.allclose(maps[0], model.features[:2](x), atol=1e-6)
        assert model.feature_info[0] == dict(num_chs=16, reduction=1, module="features.conv0")
        assert torch.allclose(model.forward_intermediates(x, [0], intermediates_only=True)[0], model.features.conv0(x))
        last_two = model.forward_intermediates(x, 2, intermediates_only=True)  # an int: the last n maps
        assert [m.shape[1] for m in last_two] == [model.feature_info[2]["num_chs"], model.feature_info[3]["num_chs"]]


def test_feature_index_errors():
    with pytest.raises(ValueError, match="out of range.*indices 0..3"):
        _tiny(features_only=True, out_indices=(1, 4))
    with pytest.raises(ValueError, match="repeat"):
        _tiny(features_only=True, out_indices=(1, -3))
    with pytest.raises(ValueError, match="empty"):
        _tiny().forward_intermediates(torch.randn(1, 3, 32, 32), indices=())


def test_timm_factory_builds_our_models():
    assert "dz_densenet121" in timm.list_models("dz_*")
    model = timm.create_model("dz_densenet121", num_classes=10, drop_rate=0.2, proj_drop_rate=0.1)
    assert isinstance(model, dz.DenseNet) and model.num_classes == 10
    assert model.head_drop_rate == 0.2 and model.drop_rate == 0.1  # timm's meanings of the two dropouts
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in torchvision.models.densenet121(num_classes=10).parameters())
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    feats = timm.create_model("dz_densenet_bc_100", features_only=True, out_indices=(1, 2, 3))
    assert [f.shape[1] for f in feats(torch.randn(1, 3, 32, 32))] == [216, 300, 342]


def test_timm_factory_pretrained_by_tag(tmp_path, monkeypatch):
    # A published-style checkpoint (torchvision format) served from a file:// URL, registered as a tag.
    monkeypatch.setenv("DENSENET_ZOO_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1)
    src = dz.densenet_bc_100().eval()
    path = tmp_path / "densenet_bc_100-test.pth"
    torch.save(src.state_dict(), path)
    dz.register_weights({"name": "densenet_bc_100.testtag", "arch": "densenet_bc_100", "url": path.as_uri(),
                         "num_classes": 10, "key_format": "torchvision"}, overwrite=True)
    model = timm.create_model("dz_densenet_bc_100.testtag", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), src(x), atol=1e-5)


def test_hubconf_local_load():
    model = torch.hub.load(str(REPO), "densenet121", source="local", pretrained=False)
    ref = torchvision.models.densenet121()
    model.load_state_dict(ref.state_dict())  # torchvision's exact module names
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), ref.eval()(x), atol=1e-5)
    small = torch.hub.load(str(REPO), "densenet_bc_100", source="local", num_classes=3, block_config=(2, 2, 2))
    assert small.num_classes == 3 and small.block_config == (2, 2, 2)
    fast = torch.hub.load(str(REPO), "optimize_for_inference", small.eval(), source="local")
    with torch.no_grad():
        y = torch.randn(2, 3, 32, 32)
        assert torch.allclose(fast(y), small(y), rtol=1e-4, atol=1e-5)
