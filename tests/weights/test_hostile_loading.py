"""Checkpoints written by someone else, or damaged: every loading path answers with one line, or loads right."""

import json
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import densenet_zoo as dz
from densenet_zoo.models.arch_check import min_weights
from densenet_zoo.models import list_models, model_config
from _hostile_helpers import REPO, SMALL, forge, run_capped, small_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def saved(tmp_path):
    model = small_model()
    return model, dz.save_model(model, tmp_path / "good.safetensors", class_names=list("abcde"))


def _one_line(exc_info, *needles):
    text = str(exc_info.value)
    assert "\n" not in text, text
    for n in needles:
        assert n in text, text


# -- 1. a small file must not make a loader allocate without bound -------------------------------

def test_min_weights_counts_every_conv_and_linear_weight():
    """The bound the check relies on, against the parameters of the built models (independent count)."""
    configs = [model_config(n) for n in list_models()[:4]] + [dict(SMALL, compression=0.7, block_config=(3, 1, 2))]
    for cfg in configs:
        model = dz.DenseNet(**cfg)
        weights = sum(p.numel() for p in model.parameters() if p.dim() > 1)
        assert min_weights(cfg) == weights, cfg
        assert min_weights(cfg) <= sum(t.numel() for t in model.state_dict().values())


def test_forged_sizes_fail_before_anything_is_built(saved, tmp_path):
    """Each case ran (in a child capped at +768 MiB) until the allocator failed before the check existed."""
    _, good = saved
    files = {
        "layers": forge(good, tmp_path / "layers.safetensors", edit={"block_config": [100000, 100000]}),
        "classes": forge(good, tmp_path / "classes.safetensors", edit={"num_classes": 10_000_000_000}),
        "classes7": forge(good, tmp_path / "classes7.safetensors", edit={"num_classes": 10_000_000}),
        "growth": forge(good, tmp_path / "growth.safetensors", edit={"growth_rate": 1_000_000}),
        "bn": forge(good, tmp_path / "bn.safetensors", edit={"bn_size": 16_000_000, "block_config": [1, 1]}),
    }
    deep = dict(dz.DenseNet(**SMALL).state_dict())
    deep["features.denseblock1.denselayer100000.conv2.weight"] = deep["features.denseblock1.denselayer2.conv2.weight"]
    torch.save(deep, tmp_path / "deep.pth")
    # A 0-element classifier of 10^10 rows reads in no time; building its Linear would take 40 GB.
    wide = {"features.conv0.weight": torch.zeros(16, 3, 3, 3), "classifier.weight": torch.zeros(10_000_000_000, 0)}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    cases = [f"dz.load_model({str(p)!r})" for p in files.values()]
    cases.append(f"dz.convert_checkpoint({str(tmp_path / 'deep.pth')!r}, {str(tmp_path / 'out.safetensors')!r})")
    cases.append(f"dz.create_model('densenet_bc_100', weights={str(tmp_path / 'wide.safetensors')!r})")
    results = run_capped(cases)
    for case, res in zip(cases, results):
        assert not res["ok"] and res["zoo"] and res["type"] == "CheckpointFileError", (case, res)
        assert "\n" not in res["msg"] and res["s"] < 5, (case, res)
    assert "100,000 dense layers" in results[0]["msg"] or "200,000 dense layers" in results[0]["msg"]
    assert "num_classes=10000000000 is not an integer in" in results[1]["msg"]
    assert all("holds only" in results[i]["msg"] for i in (2, 3, 4, 6))


# -- 4. damaged files: one line naming the file and the fix --------------------------------------

@pytest.mark.parametrize("meta_text, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected an object"),
    ('{"model_args": "densenet121"}', "model_args must be a JSON object"),
    ('{"model_args": {"growth_rate": 8, "block_config": "22"}}', "block_config"),
    ('{"model_args": {"growth_rate": "8", "block_config": [2, 2]}}', "growth_rate='8'"),
    ('{"model_args": {"block_config": [2, 2], "evil": 1}}', "unknown model argument"),
    ('{"model_args": {"growth_rate": 8, "block_config": [2, 2], "num_init_features": 16, "small_inputs": true, '
     '"num_classes": 5, "drop_rate": 7}}', "do not build a DenseNet"),
])
def test_damaged_metadata_is_one_checkpoint_error(saved, tmp_path, meta_text, needle):
    model, good = saved
    bad = forge(good, tmp_path / "bad.safetensors", meta_text=meta_text)
    with pytest.raises(dz.CheckpointFileError) as info:
        dz.load_model(bad)
    _one_line(info, str(bad), needle)
    # load_weights needs only the tensors: the same file loads, exactly.
    fresh = dz.DenseNet(**SMALL)
    assert dz.load_weights(fresh, bad, strict=True).ok
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"PK\x03\x04garbage"])
def test_empty_or_garbage_pth_is_one_checkpoint_error(tmp_path, content):
    path = tmp_path / "empty.pth"
    path.write_bytes(content)
    for call in (lambda: dz.load_weights(dz.DenseNet(**SMALL), path), lambda: dz.convert_checkpoint(path, tmp_path / "o.safetensors")):
        with pytest.raises(dz.CheckpointFileError) as info:
            call()
        _one_line(info, str(path), "re-download")
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_into_a_folder_is_refused_and_the_folder_kept(saved, tmp_path):
    _, good = saved
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(dz.CheckpointFileError) as info:
        dz.convert_checkpoint(good, folder)
    _one_line(info, str(folder), "it is a folder")
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and (folder / "keep.txt").read_text() == "mine"
    # A folder given as the checkpoint to read: the same kind of answer.
    for call in (lambda: dz.load_weights(dz.DenseNet(**SMALL), folder), lambda: dz.convert_checkpoint(folder, tmp_path / "o.safetensors"),
                 lambda: dz.load_model(folder)):
        with pytest.raises(dz.CheckpointFileError) as info:
            call()
        _one_line(info, str(folder))


def test_key_names_that_contradict_the_tensors(tmp_path):
    state = dict(dz.DenseNet(**SMALL).state_dict())
    flat = dict(state, **{"features.denseblock1.denselayer1.conv2.weight": torch.zeros(8)})
    gap = {k.replace("denseblock2", "denseblock7"): v for k, v in state.items()}
    for name, sd in (("flat", flat), ("gap", gap)):
        path = tmp_path / f"{name}.pth"
        torch.save(sd, path)
        with pytest.raises(dz.CheckpointFileError, match="cannot tell the architecture") as info:
            dz.convert_checkpoint(path, tmp_path / "o.safetensors")
        _one_line(info)


# -- 5. files load_model would reject are not written; nothing loaded is an error ----------------

def test_save_model_refuses_what_load_model_cannot_read(tmp_path):
    tv = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)
    fast = dz.optimize_for_inference(small_model())
    for model, needle in ((tv, "convert_checkpoint"), (fast, "optimize_for_inference() after load_model")):
        path = tmp_path / "m.safetensors"
        with pytest.raises(dz.CheckpointFileError) as info:
            dz.save_model(model, path)
        _one_line(info, needle)
        assert not path.exists() and list(tmp_path.iterdir()) == []
    # What the messages advise works: torchvision weights through convert_checkpoint, then load_model.
    out = dz.convert_checkpoint(tv.state_dict(), tmp_path / "tv.safetensors")
    again, _ = dz.load_model(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (again.eval()(x) - tv.eval()(x)).abs().max().item() <= 1e-5
    # A norm given by name is part of model_args, so it saves and rebuilds.
    frozen_file = dz.save_model(dz.DenseNet(**SMALL, norm_layer="frozen_bn"), tmp_path / "f.safetensors")
    assert dz.load_model(frozen_file)[0].model_args["norm_layer"] == "frozen_bn"


def test_model_args_that_do_not_rebuild_the_model_are_said_so(tmp_path):
    """A norm given as a function is not in model_args: the file is written (training saves such models),
    load_model says what to do instead of a strict-load key list, and that advice works."""
    def group(c):
        return torch.nn.GroupNorm(4, c)

    model = dz.DenseNet(**SMALL, norm_layer=group).eval()
    path = dz.save_model(model, tmp_path / "g.safetensors")
    with pytest.raises(dz.CheckpointFileError) as info:
        dz.load_model(path)
    _one_line(info, str(path), "dz.load_weights(model, path)")
    again = dz.DenseNet(**SMALL, norm_layer=group)
    assert dz.load_weights(again, path, strict=True).ok
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_no_densenet_tensor_is_an_error_even_when_not_strict(tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(dz.CheckpointFileError) as info:
        dz.load_weights(dz.DenseNet(**SMALL), path)
    _one_line(info, str(path), "none of its", "tensors fits the model")
    # Same names, other shapes: still nothing loaded.
    big = dz.DenseNet(growth_rate=12, block_config=(2, 2), num_init_features=24, small_inputs=True, num_classes=5)
    with pytest.raises(dz.CheckpointFileError, match="none of its"):
        dz.load_weights(dz.DenseNet(**SMALL), {k: v for k, v in big.state_dict().items() if k != "classifier.bias"})
    # A partial fit still loads, and says what did not fit.
    report = dz.load_weights(dz.DenseNet(**SMALL), {k: v for k, v in small_model().state_dict().items() if "block2" not in k})
    assert report.loaded and report.missing


def test_readme_registry_name_of_the_project_weights_loads():
    """The README once said this 'does not yet' work; it does: by name, equal to load_model of the file."""
    by_name = dz.create_model("densenet_bc_100.digits", pretrained=True).eval()
    by_file, _ = dz.load_model(REPO / "weights" / "densenet_bc_100_digits.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(by_name(x), by_file.eval()(x))


def test_checks_cost_little_on_a_real_size_model(tmp_path):
    model = dz.densenet121()
    path = dz.save_model(model, tmp_path / "d121.safetensors")
    t0 = time.perf_counter()
    again, meta = dz.load_model(path)
    assert time.perf_counter() - t0 < 30 and meta["model_args"] == json.loads(json.dumps(model.model_args))


# -- beyond the reported cases: state dicts that are not what they seem ----------------------------

def _odd(kind):
    sd = dict(dz.DenseNet(**SMALL).state_dict())
    floats = [k for k, v in sd.items() if v.is_floating_point()]
    if kind == "int_key":
        return {**sd, 7: torch.zeros(3)}
    if kind == "sparse":
        return {**sd, "classifier.weight": sd["classifier.weight"].to_sparse()}
    if kind in ("complex64", "int8", "bool"):
        return {k: (v.to(getattr(torch, kind)) if k in floats else v) for k, v in sd.items()}
    return {"list": [sd], "tensor": torch.zeros(3), "strings": {"a": "b", "c": "d"}}[kind]


@pytest.mark.parametrize("kind", ["int_key", "sparse", "complex64", "int8", "bool", "list", "tensor", "strings"])
def test_odd_state_dicts_are_one_checkpoint_error(tmp_path, kind):
    """Each of these gave an AttributeError/RuntimeError traceback, or (complex, int8, bool) loaded cast garbage."""
    path = tmp_path / f"{kind}.pth"
    torch.save(_odd(kind), path)
    for call in (lambda: dz.load_weights(dz.DenseNet(**SMALL), path), lambda: dz.convert_checkpoint(path, tmp_path / "o.safetensors")):
        with pytest.raises(dz.CheckpointFileError) as info:
            call()
        _one_line(info, str(path))
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_plain_pickle_of_tensors_gives_one_line_and_no_warning(tmp_path, protocol, recwarn):
    """``pickle.dump(state_dict)`` instead of ``torch.save``: read or refused in one line, no torch warning through."""
    import pickle

    path = tmp_path / "plain.pth"
    with open(path, "wb") as f:
        pickle.dump(small_model(1).state_dict(), f, protocol=protocol)
    with pytest.raises(dz.CheckpointFileError) as info:
        dz.load_weights(dz.DenseNet(**SMALL), path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert [str(w.message) for w in recwarn if "pickle" in str(w.message)] == []
