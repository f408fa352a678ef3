"""The download cache against hostile situations: name collisions, bad or half-written files, unusable
folders, and the caches of torch.hub and Hugging Face that users already have. Real HTTP on 127.0.0.1."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import densenet_zoo as dz
from densenet_zoo.weights import cache as dl
from _hostile_helpers import PACKAGE_ROOT, SMALL, small_model
from _weights_helpers import isolated_registry, randomize


@pytest.fixture
def env(tmp_path, monkeypatch, one_thread):
    """Empty caches of our own, of torch.hub and of Hugging Face; no offline switch; no proxy for 127.0.0.1."""
    cache = isolated_registry(tmp_path, monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return cache


def _files(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith((".lock", ".record.json"))) if folder.exists() else []


def _safetensors_bytes(model, tmp_path, name="w.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.read_bytes()


def _same_outputs(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# -- 2. the cache is keyed by URL: same file name, other URL, other weights -----------------------

def test_same_file_name_at_two_urls_gives_each_its_own_weights(env, server, tmp_path):
    one, two = small_model(1), small_model(2)
    url_a = server.serve("/a/w.safetensors", _safetensors_bytes(one, tmp_path))
    url_b = server.serve("/b/w.safetensors", _safetensors_bytes(two, tmp_path))
    for _ in range(2):  # the second round comes from the cache
        for url, ref in ((url_a, one), (url_b, two)):
            model = dz.DenseNet(**SMALL)
            assert dz.load_weights(model, url, strict=True, progress=False).ok
            assert _same_outputs(model, ref)
    assert server.requests == ["/a/w.safetensors", "/b/w.safetensors"]
    names = _files(env)
    assert len(names) == 2 and all(n.startswith("w.") and n.endswith(".safetensors") for n in names)


def test_a_name_carrying_its_hash_is_shared_by_mirrors(env, server, tmp_path):
    body = _safetensors_bytes(small_model(3), tmp_path)
    name = f"w-{hashlib.sha256(body).hexdigest()[:8]}.safetensors"
    first = server.serve("/mirror1/" + name, body)
    second = server.serve("/mirror2/" + name, body)
    assert dl.download(first, progress=False) == dl.download(second, progress=False) == env / name
    assert server.requests == ["/mirror1/" + name]
    assert dl.cache_name("http://h/x/" + name, sha256="ffffff") != name  # another hash: not that file


# -- 3. a cache that heals: bad cached files, partials of killed downloads -------------------------

@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_bad_cached_file_without_hash_is_fetched_again_once(env, server, tmp_path, damage):
    ref = small_model(4)
    body = _safetensors_bytes(ref, tmp_path)
    url = server.serve("/w/model.safetensors", body)
    dl.download(url, progress=False)
    [cached] = [env / n for n in _files(env)]
    cached.write_bytes({"truncate": body[:-100], "garbage": b"\x00" * 50, "empty": b""}[damage])
    model = dz.DenseNet(**SMALL)
    assert dz.load_weights(model, url, strict=True, progress=False).ok and _same_outputs(model, ref)
    assert server.requests == ["/w/model.safetensors"] * 2 and cached.read_bytes() == body
    # Served bad again: one clear error, and no bad file left to fail the next run.
    cached.write_bytes(b"")
    server.serve("/w/model.safetensors", body[:-100])
    with pytest.raises(dz.WeightsError, match="not a complete weights file") as info:
        dz.load_weights(dz.DenseNet(**SMALL), url, progress=False)
    assert "\n" not in str(info.value) and len(server.requests) == 3 and not cached.exists()


_KILLED = textwrap.dedent("""
    import sys
    from densenet_zoo.weights import cache as download
    download.download(sys.argv[1], progress=False)
""")


@pytest.mark.timeout(120)
def test_partial_of_a_killed_download_is_removed(env, server, tmp_path):
    ref = small_model(5)
    body = _safetensors_bytes(ref, tmp_path)
    url = server.serve("/w/slow.safetensors", body, delay=60)  # headers now, body in a minute
    child = subprocess.Popen([sys.executable, "-c", _KILLED, url], env=dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT)))
    try:
        deadline = time.time() + 60
        while not list(env.glob(".*.partial")) and time.time() < deadline:
            time.sleep(0.1)
        partials = list(env.glob(".*.partial"))
        assert partials, "the child never started writing"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert [p.exists() for p in partials] == [True]  # SIGKILL runs no cleanup
    old = env / ".other.safetensors.99999.partial"  # another file's, untouched for two hours
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fresh = env / ".busy.safetensors.99998.partial"  # another file's, being written right now
    fresh.write_bytes(b"x")
    server.serve("/w/slow.safetensors", body)
    model = dz.DenseNet(**SMALL)
    assert dz.load_weights(model, url, strict=True, progress=False).ok and _same_outputs(model, ref)
    assert not partials[0].exists() and not old.exists() and fresh.exists()


# -- 4. an unusable cache folder is one line naming it and the fix --------------------------------

@pytest.mark.parametrize("kind", ["file", "under_a_file", "read_only"])
def test_unusable_cache_folder_is_one_weights_error(env, server, tmp_path, monkeypatch, kind):
    url = server.serve("/w/model.safetensors", _safetensors_bytes(small_model(), tmp_path))
    blocker = tmp_path / "blocker"
    if kind == "read_only" and os.geteuid() == 0:  # root writes through permissions: take a place the kernel refuses
        if not os.path.isdir("/sys"):
            pytest.skip("running as root without /sys: no folder root cannot write")
        cache = Path("/sys/densenet_zoo_test_cache")
    elif kind == "read_only":
        blocker.mkdir(mode=0o500)
        cache = blocker
    else:
        blocker.write_text("a file, not a folder")
        cache = blocker if kind == "file" else blocker / "cache"
    monkeypatch.setenv("DENSENET_ZOO_CACHE", str(cache))
    with pytest.raises(dz.WeightsError) as info:
        dz.load_weights(dz.DenseNet(**SMALL), url, progress=False)
    text = str(info.value)
    assert "\n" not in text and str(cache) in text and "DENSENET_ZOO_CACHE" in text
    if kind != "read_only":
        assert blocker.read_text() == "a file, not a folder"


# -- 6. caches users already have ------------------------------------------------------------------

def _register(url, sha256=None):
    dz.register_weights({"name": "densenet_bc_100.test", "arch": "densenet_bc_100", "url": url, "sha256": sha256,
                         "num_classes": 10, "default": True}, overwrite=True)


def test_pretrained_uses_the_torch_hub_copy_before_downloading(env, server, tmp_path):
    ref = randomize(dz.densenet_bc_100(), seed=6)
    tmp = tmp_path / "bc.pth"
    torch.save(ref.state_dict(), tmp)
    name = f"densenet_bc_100-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / name).write_bytes(tmp.read_bytes())
    _register(server.base + "/models/" + name)  # the server has no such route: any request would fail
    model = dz.densenet_bc_100(pretrained=True, progress=False)
    assert _same_outputs(model, ref)
    assert server.requests == [] and _files(env) == []
    # A copy whose bytes do not match its name's hash is not taken: downloaded instead.
    (checkpoints / name).write_bytes(tmp.read_bytes()[:-10])
    server.serve("/models/" + name, tmp.read_bytes())
    assert _same_outputs(dz.densenet_bc_100(pretrained=True, progress=False), ref)
    assert server.requests == ["/models/" + name] and _files(env) == [name]


def test_timm_weights_in_the_hf_cache_need_no_request(env, server, tmp_path, monkeypatch):
    ref = randomize(timm.create_model("densenet121", pretrained=False), seed=7)
    snap = tmp_path / "hf_home" / "hub" / "models--timm--densenet121.ra_in1k" / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_ENDPOINT", server.base)  # answers 404 to everything: a request would fail the load
    model = dz.densenet121(weights="timm/densenet121.ra_in1k")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model.eval()(x) - ref.eval()(x)).abs().max().item() <= 1e-5
    assert server.requests == [] and server.heads == []
