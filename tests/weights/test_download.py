"""Pretrained weights over the network path: a loopback HTTP server, the cache, failures, offline mode."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import densenet_zoo as dz
from densenet_zoo.weights import cache as weights_cache
from densenet_zoo.weights import registry as hub
from densenet_zoo.cli import main as cli_main
from _weights_helpers import TINY, isolated_registry, randomize, save_legacy, tiny_torchvision

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache, a fresh registry, no offline switch, no proxy for the loopback server."""
    return isolated_registry(tmp_path, monkeypatch)


def _cache_files(cache: Path):
    return sorted(p.name for p in cache.glob("*") if not p.name.endswith((".lock", ".record.json"))) if cache.exists() else []


@pytest.fixture(scope="module")
def tv121(tmp_path_factory):
    """torchvision densenet121 with fixed random weights, saved in the published legacy format."""
    folder = tmp_path_factory.mktemp("published")
    model = randomize(torchvision.models.densenet121(), seed=3)
    return model, save_legacy(model, folder, "densenet121")


def test_pretrained_true_downloads_once_through_the_registry(env, server, tv121, tmp_path, monkeypatch):
    ref, path = tv121
    served = server.serve("/models/" + path.name, path.read_bytes())
    # A user manifest overrides the default entry with the URL published under a mirror-able base.
    manifest = tmp_path / "mine.json"
    entry = dz.get_weights("densenet121").to_dict()
    entry["url"] = "https://download.pytorch.org/models/" + path.name
    entry["sha256"] = path.name.split("-")[1][:8]
    manifest.write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setattr(hub, "_LOADED_MANIFESTS", [])
    monkeypatch.setenv("DENSENET_ZOO_MANIFEST", str(manifest))
    monkeypatch.setenv("DENSENET_ZOO_MIRROR", server.base + "/models/")
    assert dz.get_weights("densenet121").resolved_url() == served

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        model = dz.densenet121(pretrained=True, progress=False).eval()
        assert (model(x) - expected).abs().max().item() <= 1e-5
    assert server.requests == ["/models/" + path.name]
    assert _cache_files(env) == [path.name]
    assert model.load_report.ok and model.load_report.renamed > 0  # legacy keys were renamed

    # Second load, and the other spellings of the same weights: from the cache, no request.
    for weights in ("IMAGENET1K_V1", torchvision.models.DenseNet121_Weights.IMAGENET1K_V1):
        again = dz.densenet121(weights=weights, progress=False).eval()
        with torch.no_grad():
            assert (again(x) - expected).abs().max().item() <= 1e-5
    assert len(server.requests) == 1

    # The CLI download finds it cached, too.
    assert cli_main(["weights", "download", "densenet121"]) == 0
    assert len(server.requests) == 1


@pytest.fixture(scope="module")
def ref_tiny():
    return tiny_torchvision()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    model = tiny_torchvision()
    return model, save_legacy(model, tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.mark.parametrize("fault, message", [
    ("hash", r"sha256 is [0-9a-f]{64}, expected one starting with"),
    ("truncated", r"sha256 is .* expected one starting with"),
    ("html", r"HTML page"),
    ("drop", r"failed after|stopped after"),
    ("404", r"HTTP 404"),
])
def test_bad_downloads_fail_clearly_and_cache_nothing(env, server, tiny_file, fault, message):
    ref, path = tiny_file
    body = path.read_bytes()
    route = "/w/" + path.name
    if fault == "hash":
        server.serve(route, body[:-1] + bytes([body[-1] ^ 1]))
    elif fault == "truncated":
        server.serve(route, body[: len(body) // 3])
    elif fault == "html":
        server.serve(route, b"<!DOCTYPE html><html><body>Please log in</body></html>", ctype="text/html; charset=utf-8")
    elif fault == "drop":
        server.serve(route, body, mode="drop")
    model = dz.DenseNet(**TINY)
    with pytest.raises(dz.WeightsError, match=message) as info:
        dz.load_weights(model, server.base + route, progress=False)
    assert "\n" not in str(info.value)
    assert _cache_files(env) == []
    # Once the server is fixed the same call succeeds: nothing bad was left behind.
    server.serve(route, body)
    dz.load_weights(model, server.base + route, progress=False, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.eval()(x) - ref(x)).abs().max().item() <= 1e-5
    assert _cache_files(env) == [path.name]


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_truncated_file_without_known_hash_is_not_cached(env, server, ref_tiny, tmp_path, fmt):
    path = tmp_path / f"tiny.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file(ref_tiny.state_dict(), str(path))
    else:
        torch.save(ref_tiny.state_dict(), path, _use_new_zipfile_serialization=fmt == "zip")
    url = server.serve("/w/" + path.name, path.read_bytes()[:-300])  # honest Content-Length, cut file
    with pytest.raises(dz.WeightsError, match="not a complete weights file|corrupted"):
        dz.load_weights(dz.DenseNet(**TINY), url, progress=False)
    assert _cache_files(env) == []
    server.serve("/w/" + path.name, path.read_bytes())
    assert dz.load_weights(dz.DenseNet(**TINY), url, progress=False, strict=True).ok


def test_bad_file_in_cache_is_replaced(env, server, tiny_file):
    _, path = tiny_file
    env.mkdir(parents=True)
    (env / path.name).write_bytes(b"garbage")
    url = server.serve("/w/" + path.name, path.read_bytes())
    got = weights_cache.download(url, progress=False)
    assert got.read_bytes() == path.read_bytes() and len(server.requests) == 1


def test_offline_with_empty_cache_names_url_and_path(env, server, monkeypatch):
    monkeypatch.setenv("DENSENET_ZOO_OFFLINE", "1")
    url = dz.get_weights("densenet121").url
    with pytest.raises(dz.WeightsError) as info:
        dz.densenet121(pretrained=True)
    assert url in str(info.value) and str(env / "densenet121-a639ec97.pth") in str(info.value)
    monkeypatch.setenv("DENSENET_ZOO_MIRROR", server.base)
    monkeypatch.delenv("DENSENET_ZOO_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dz.WeightsError, match="offline"):
        dz.densenet121(pretrained=True)
    assert server.requests == []  # the network was never touched
    assert cli_main(["weights", "download", "densenet121"]) == 1


def test_timm_hub_weights_through_huggingface_hub(env, tmp_path, monkeypatch):
    """timm/densenet121.ra_in1k resolved by hf_hub_download from a populated hub cache (offline)."""
    import huggingface_hub.constants as hfc

    ref = randomize(timm.create_model("densenet121", pretrained=False), seed=4)
    snap = tmp_path / "hf" / "models--timm--densenet121.ra_in1k" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x = torch.randn(1, 3, 32, 32)
    for weights in ("timm/densenet121.ra_in1k", "ra_in1k"):
        model = dz.densenet121(weights=weights).eval()
        with torch.no_grad():
            assert (model(x) - ref(x)).abs().max().item() <= 1e-5
    assert model.weights_entry.preprocessing["interpolation"] == "bicubic"
    with pytest.raises(dz.WeightsError, match="timm/densenet121.tv_in1k"):
        dz.densenet121(weights="tv_in1k")  # not in that cache


def test_timm_hub_weights_downloaded_by_huggingface_hub(env, server, tmp_path, monkeypatch):
    """The online hub path: huggingface_hub talks to a loopback endpoint (HF_ENDPOINT) and caches the file."""
    import hashlib

    import huggingface_hub.constants as hfc

    ref = randomize(timm.create_model("densenet121", pretrained=False), seed=8)
    blob = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(blob))
    body = blob.read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    server.serve("/timm/densenet121.tv_in1k/resolve/main/model.safetensors", body,
                 headers={"X-Repo-Commit": "b" * 40, "ETag": f'"{digest}"'})
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    x = torch.randn(1, 3, 32, 32)
    for _ in range(2):
        model = dz.densenet121(weights="tv_in1k").eval()
        with torch.no_grad():
            assert (model(x) - ref(x)).abs().max().item() <= 1e-5
    assert server.requests == ["/timm/densenet121.tv_in1k/resolve/main/model.safetensors"]  # one GET; HEADs check freshness
    assert list((tmp_path / "hf").glob("models--timm--densenet121.tv_in1k/blobs/*"))[0].name == digest


_CHILD = textwrap.dedent("""
    import sys, torch, densenet_zoo as dz
    torch.manual_seed(0)
    model = dz.densenet_bc_100(pretrained=True, progress=False).eval()
    with torch.no_grad():
        torch.save(model(torch.ones(1, 3, 32, 32)), sys.argv[1])
""")


@pytest.mark.timeout(120)
def test_two_processes_download_once(env, server, tmp_path):
    ref = randomize(dz.densenet_bc_100(), seed=5)
    path = tmp_path / "bc100.safetensors"
    dz.save_model(ref, path)
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    url = server.serve(f"/w/densenet_bc_100-{digest[:8]}.safetensors", path.read_bytes(), delay=1.0)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"name": "densenet_bc_100.test", "arch": "densenet_bc_100", "url": url,
                                     "sha256": digest, "num_classes": 10, "default": True}]))
    child_env = dict(os.environ, DENSENET_ZOO_MANIFEST=str(manifest), PYTHONPATH=str(REPO))
    outs = [tmp_path / f"out{i}.pt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(o)], env=child_env, stderr=subprocess.PIPE, text=True) for o in outs]
    for p in procs:
        _, err = p.communicate(timeout=100)
        assert p.returncode == 0, err
    with torch.no_grad():
        expected = ref(torch.ones(1, 3, 32, 32))
    for o in outs:
        assert (torch.load(o, weights_only=True) - expected).abs().max().item() <= 1e-6
    assert len(server.requests) == 1
    assert _cache_files(env) == [Path(url).name]
