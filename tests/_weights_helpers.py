"""Helpers for the weights tests: checkpoints in published formats and a loopback HTTP server."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn
import torchvision

TINY = dict(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2)


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Fixed random weights everywhere, including BN statistics, so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var") or (t.dim() == 1 and name.endswith("weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1:  # biases, running means
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:  # He-scaled, so that activations keep their size through the network
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
    return model.eval()


def tiny_torchvision(num_classes: int = 1000, seed: int = 1) -> nn.Module:
    return randomize(torchvision.models.DenseNet(num_classes=num_classes, **TINY), seed)


def legacy_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision's pre-0.2 key format (``norm.1``), without ``num_batches_tracked`` (older than it)."""
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        out[re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k)] = v.clone()
    return out


def save_legacy(model: nn.Module, folder: Path, stem: str) -> Path:
    """Save like download.pytorch.org's files: legacy keys, old serialisation, ``stem-<sha256[:8]>.pth``."""
    tmp = folder / f"{stem}.tmp"
    torch.save(legacy_state(model.state_dict()), tmp, _use_new_zipfile_serialization=False)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"{stem}-{digest[:8]}.pth"
    tmp.rename(path)
    return path


class LoopbackServer:
    """ThreadingHTTPServer on 127.0.0.1 serving byte routes with selectable misbehaviour.

    ``routes[path] = dict(body=bytes, status=200, ctype=..., mode="ok"|"drop", delay=seconds)``;
    ``headers`` adds response headers (to GET and HEAD); unknown paths answer 404 with an HTML page.
    """

    def __init__(self) -> None:
        self.routes: Dict[str, dict] = {}
        self.requests: List[str] = []  # GET paths
        self.heads: List[str] = []  # HEAD paths
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                server.heads.append(self.path)
                route = server.routes.get(self.path)
                self.send_response(200 if route else 404)
                if route:
                    self.send_header("Content-Length", str(len(route["body"])))
                    for k, v in route.get("headers", {}).items():
                        self.send_header(k, v)
                self.end_headers()

            def _misbehave(self, route):
                """``endless``: the body over and over, no Content-Length; ``drip``: one byte every ``drip`` seconds.
                Either stops when the client goes away, or after ``limit_s`` seconds (10 unless told)."""
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if route["mode"] == "drip":
                    self.send_header("Content-Length", str(len(route["body"])))
                self.send_header("Connection", "close")
                self.end_headers()
                stop = time.monotonic() + route.get("limit_s", 10.0)
                body, i = route["body"], 0
                try:
                    while time.monotonic() < stop:
                        if route["mode"] == "endless":
                            self.wfile.write(body)
                        else:
                            self.wfile.write(body[i % len(body):i % len(body) + 1])
                            self.wfile.flush()
                            i += 1
                            time.sleep(route.get("drip", 0.1))
                except OSError:  # the client stopped reading: what the test wanted
                    pass
                self.close_connection = True

            def do_GET(self):
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    page = b"<html><body><h1>404 Not Found</h1></body></html>"
                    self.send_response(404)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                body = route["body"]
                if route.get("mode") in ("endless", "drip"):
                    self._misbehave(route)
                    return
                self.send_response(route.get("status", 200))
                self.send_header("Content-Type", route.get("ctype", "application/octet-stream"))
                self.send_header("Content-Length", str(len(body)))
                for k, v in route.get("headers", {}).items():
                    self.send_header(k, v)
                self.end_headers()
                time.sleep(route.get("delay", 0))
                if route.get("mode") == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, body: bytes, **opts) -> str:
        self.routes[path] = dict(body=body, **opts)
        return self.base + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def isolated_registry(tmp_path: Path, monkeypatch) -> Path:
    """An empty cache, a fresh registry, no offline switch, no proxy for the loopback server; the cache."""
    from densenet_zoo.weights import registry

    cache = tmp_path / "cache"
    monkeypatch.setenv("DENSENET_ZOO_CACHE", str(cache))
    for var in ("DENSENET_ZOO_OFFLINE", "HF_HUB_OFFLINE", "DENSENET_ZOO_MIRROR", "DENSENET_ZOO_MANIFEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_LOADED_MANIFESTS", [])
    return cache
