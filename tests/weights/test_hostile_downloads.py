"""Downloads a server or a planted file cannot turn against the user: endless and dripping servers, sizes
beyond what was declared, loose file: URLs, cache files swapped after download, links planted for temp names.
Real HTTP on 127.0.0.1 with short limits."""

import json
import os
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

import densenet_zoo as dz
from densenet_zoo.cli import main as cli_main
from densenet_zoo.weights import cache as dl
from densenet_zoo.weights.transfer import TransferLimits
from _hostile_helpers import SMALL, small_model
from _weights_helpers import isolated_registry

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def env(tmp_path, monkeypatch):
    return isolated_registry(tmp_path, monkeypatch)


@pytest.fixture
def weights_file(tmp_path):
    model = small_model(1)
    path = tmp_path / "served" / "w.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _nothing_cached(cache: Path) -> bool:
    return not cache.exists() or all(p.name.endswith(".lock") for p in cache.iterdir())


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("declared", [None, "registry", "content-length"])
def test_a_server_that_sends_more_than_the_file_may_have_is_cut_off(env, server, weights_file, declared):
    """Endless bodies: bounded by the registry's size, else the server's Content-Length, else the maximum."""
    _, path = weights_file
    body = path.read_bytes()
    url = server.serve("/endless/w.safetensors", body, mode="endless") if declared != "content-length" else \
        server.serve("/big/w.safetensors", body * 50)
    size = len(body) if declared else None
    limits = TransferLimits(read_timeout=5, deadline=20, max_bytes=3 * len(body))
    start = time.monotonic()
    with pytest.raises(dz.WeightsError) as info:
        dl.download(url, file_size=size, progress=False, limits=limits)
    text = _one_line(info)
    assert url in text and time.monotonic() - start < 15
    if declared == "content-length":  # announced more than declared: refused before reading it
        assert f"announces {len(body) * 50} bytes, but the weights have {len(body)}" in text
    else:
        assert f"sent more than the {size or 3 * len(body)} bytes" in text
    assert _nothing_cached(env)


def test_a_dripping_server_is_cut_off_at_the_overall_deadline(env, server, weights_file, monkeypatch):
    _, path = weights_file
    url = server.serve("/drip/w.safetensors", path.read_bytes(), mode="drip", drip=0.05)
    monkeypatch.setenv("DENSENET_ZOO_DOWNLOAD_DEADLINE", "1")
    start = time.monotonic()
    with pytest.raises(dz.WeightsError) as info:
        dz.load_weights(dz.DenseNet(**SMALL), url, progress=False)
    assert "took longer than 1 s" in _one_line(info) and url in str(info.value)
    assert time.monotonic() - start < 6  # each read returned a drip; none waited for the 60 s per-read timeout
    assert _nothing_cached(env)


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_a_bad_deadline_setting_is_named(env, server, weights_file, monkeypatch, value):
    _, path = weights_file
    monkeypatch.setenv("DENSENET_ZOO_DOWNLOAD_DEADLINE", value)
    with pytest.raises(dz.WeightsError, match="DENSENET_ZOO_DOWNLOAD_DEADLINE"):
        dl.download(server.serve("/w.safetensors", path.read_bytes()), progress=False)
    assert server.requests == []


@pytest.mark.parametrize("make_url, problem", [
    (lambda p: "file://../" + str(p).lstrip("/"), "names the host '..'"),
    (lambda p: "file://otherhost" + str(p), "names the host 'otherhost'"),
    (lambda p: "file:" + os.path.relpath(p), "absolute path"),
    (lambda p: "file://" + str(p.parent) + "/../" + p.parent.name + "/" + p.name, "absolute path without '..'"),
    (lambda p: p.as_uri() + "?download=1", "query or fragment"),
    (lambda p: p.as_uri() + "#frag", "query or fragment"),
])
def test_loose_file_urls_are_refused(env, weights_file, make_url, problem, monkeypatch):
    _, path = weights_file
    monkeypatch.chdir(path.parent.parent)
    with pytest.raises(dz.WeightsError) as info:
        dz.load_weights(dz.DenseNet(**SMALL), make_url(path), progress=False)
    assert problem in _one_line(info) and "file:///absolute/path" in str(info.value)


@pytest.mark.parametrize("form", ["file:///{}", "file://localhost/{}", "file:/{}"])
def test_strict_file_urls_load(env, weights_file, form):
    ref, path = weights_file
    model = dz.DenseNet(**SMALL)
    assert dz.load_weights(model, form.format(str(path).lstrip("/")), progress=False, strict=True).ok
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("content", [b"just some notes\n", b"\x00" * 64, b"PK\x03\x04broken zip"])
def test_a_file_url_to_something_that_is_not_weights_is_refused(env, tmp_path, content, monkeypatch):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(dz.WeightsError, match="not a complete weights file|corrupted"):
        dl.download(path.as_uri(), progress=False)
    manifest = tmp_path / "mine.json"
    entry = dict(dz.get_weights("densenet121").to_dict(), name="densenet121.notes", url=path.as_uri(), sha256=None,
                 file_size=None, default=False)
    manifest.write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setenv("DENSENET_ZOO_MANIFEST", str(manifest))
    assert cli_main(["weights", "download", "densenet121.notes"]) == 1  # not reported as a success


@pytest.mark.parametrize("swap", ["other_weights", "truncated", "same_size_flipped_byte"])
def test_a_cache_file_replaced_after_download_is_noticed_without_a_hash_in_the_url(env, server, weights_file, tmp_path,
                                                                                  monkeypatch, swap):
    ref, path = weights_file
    url = server.serve("/plain/w.safetensors", path.read_bytes())
    cached = dl.download(url, progress=False)
    if swap == "other_weights":
        save_file({k: v.contiguous() for k, v in small_model(7).state_dict().items()}, str(cached))
    elif swap == "truncated":
        cached.write_bytes(cached.read_bytes()[:-10])
    else:
        data = bytearray(cached.read_bytes())
        data[-1] ^= 1
        cached.write_bytes(bytes(data))
    monkeypatch.setenv("DENSENET_ZOO_OFFLINE", "1")
    with pytest.raises(dz.WeightsError) as info:
        dl.download(url, progress=False)
    assert "not the file downloaded from" in _one_line(info) and str(cached) in str(info.value)
    monkeypatch.delenv("DENSENET_ZOO_OFFLINE")
    model = dz.DenseNet(**SMALL)  # online: the swapped file is replaced by a fresh download
    assert dz.load_weights(model, url, progress=False, strict=True).ok and len(server.requests) == 2
    assert cached.read_bytes() == path.read_bytes()


def test_a_link_planted_at_the_temporary_name_is_not_followed(env, server, weights_file, tmp_path):
    _, path = weights_file
    url = server.serve("/w/w.safetensors", path.read_bytes())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    dest = env / dl.cache_name(url)
    env.mkdir(parents=True)
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the names the next downloads would use
        os.symlink(victim, dest.with_name(f".{dest.name}.{pid}.partial"))
    assert dl.download(url, progress=False).read_bytes() == path.read_bytes()
    assert victim.read_text() == "precious"
    assert not [p for p in env.iterdir() if p.name.endswith(".partial")]
