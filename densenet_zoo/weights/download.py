"""Verified downloads into a cache shared by processes, with an offline switch.

Environment:
``DENSENET_ZOO_CACHE``     cache folder (default ``$TORCH_HOME/densenet_zoo``, ``~/.cache/torch/densenet_zoo``);
``DENSENET_ZOO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touch the network, use the cache only.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional, Union

from filelock import FileLock

from .._utils import WeightsError




_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")  # torchvision's convention: densenet121-a639ec97.pth


def cache_dir() -> Path:
    """``DENSENET_ZOO_CACHE``, else ``$TORCH_HOME/densenet_zoo``, else ``~/.cache/torch/densenet_zoo``.

    >>> cache_dir()
    PosixPath('/root/.cache/torch/densenet_zoo')
    """
    if os.environ.get("DENSENET_ZOO_CACHE"):
        return Path(os.environ["DENSENET_ZOO_CACHE"]).expanduser()
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(torch_home).expanduser() / "densenet_zoo"


def is_offline() -> bool:
    """True when ``DENSENET_ZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on: ``is_offline()``."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("DENSENET_ZOO_OFFLINE", "HF_HUB_OFFLINE"))


def expected_hash(url: str, sha256: Optional[str] = None) -> Optional[str]:
    """The hash to check: the given one, else the prefix in a torchvision-style file name.

    >>> expected_hash("https://download.pytorch.org/models/densenet121-a639ec97.pth")
    'a639ec97'
    """
    if sha256:
        return sha256.lower()
    m = _HASH_IN_NAME.search(Path(urllib.parse.urlparse(url).path).name)
    return m.group(1) if m else None


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks: ``sha256_file("densenet121-a639ec97.pth")``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, url: str, sha256: Optional[str], file_size: Optional[int]) -> Optional[str]:
    """A one-line reason why ``path`` is not the expected file, or None."""
    size = path.stat().st_size
    if file_size is not None and size != file_size:
        return f"it has {size} bytes, expected {file_size} (truncated or wrong file)"
    want = expected_hash(url, sha256)
    if want:
        got = sha256_file(path)
        if not got.startswith(want):
            return f"its sha256 is {got}, expected one starting with {want} (corrupted, truncated or wrong file)"
    return None


def _unreadable(path: Path) -> Optional[str]:
    """Why a file with no known hash is not a complete checkpoint (truncated, not weights), or None."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(9)
    try:
        if len(head) == 9 and head[8:9] == b"{":  # safetensors: header length, then JSON
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as st:  # checks that the data fills the file exactly
                st.keys()
        elif zipfile.is_zipfile(path):  # torch.save's format: every member's CRC
            with zipfile.ZipFile(path) as z:
                broken = z.testzip()
            if broken:
                return f"its member {broken} is corrupted"
        else:  # torch's legacy format has no index to check: read it (weights_only, never runs code)
            import torch

            torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        return f"it is not a complete weights file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def download(url: str, filename: Optional[str] = None, *, sha256: Optional[str] = None, file_size: Optional[int] = None,
             progress: bool = True, cache: Optional[Path] = None, timeout: float = 60.0) -> Path:
    """A verified local copy of ``url`` in the cache, downloaded once across processes.

    >>> download("https://download.pytorch.org/models/densenet121-a639ec97.pth")
    PosixPath('/root/.cache/torch/densenet_zoo/densenet121-a639ec97.pth')

    The file is written to a temporary name and renamed only after its size and sha256 (or the
    hash prefix in its name) check out. ``file://`` URLs are verified and used in place.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.is_file():
            raise WeightsError(f"{url}: no such file {path}")
        bad = _verify(path, url, sha256, file_size)
        if bad:
            raise WeightsError(f"{path}: {bad}")
        return path
    if parsed.scheme not in ("http", "https"):
        raise WeightsError(f"cannot download {url!r}: expected an http(s):// or file:// URL")
    cache = Path(cache) if cache is not None else cache_dir()
    dest = cache / (filename or Path(parsed.path).name or "weights.bin")
    if dest.is_file():
        bad = _verify(dest, url, sha256, file_size)
        if not bad:
            return dest
        if is_offline():
            raise WeightsError(f"cached file {dest} is not the expected one: {bad}; replace it with a good copy of {url}")
    if is_offline():
        raise WeightsError(
            f"offline mode (DENSENET_ZOO_OFFLINE/HF_HUB_OFFLINE) and {dest.name} is not in the cache: download {url} "
            f"on a machine with network access and place it at {dest} (or unset the offline switch)"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        # Another process may have finished the download while this one waited for the lock.
        if dest.is_file():
            if not _verify(dest, url, sha256, file_size):
                return dest
            dest.unlink()  # a bad copy must not survive a failed re-download either
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
        try:
            _fetch(url, tmp, dest, progress=progress, timeout=timeout)
            bad = _verify(tmp, url, sha256, file_size)
            if bad is None and not expected_hash(url, sha256):
                bad = _unreadable(tmp)
            if bad:
                raise WeightsError(f"downloaded {url} but {bad}; nothing was cached, retry or check the mirror (DENSENET_ZOO_MIRROR)")
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
    return dest


def _fetch(url: str, dest: Path, final: Path, *, progress: bool, timeout: float) -> None:
    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "densenet_zoo"})
    received, total = 0, None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            ctype = (resp.headers.get("Content-Type") or "").lower()
            with open(dest, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                             desc=final.name, disable=not progress) as bar:
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    if received == 0 and ("text/html" in ctype or chunk.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))):
                        raise WeightsError(
                            f"{url} returned an HTML page (Content-Type {ctype or 'unknown'}) instead of a weights file: "
                            "an error or login page, or a wrong mirror URL; check the URL in a browser"
                        )
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL or the mirror (DENSENET_ZOO_MIRROR)") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            f"download of {url} failed after {received}" + (f" of {total}" if total else "") + f" bytes ({type(exc).__name__}: {reason}); "
            f"nothing was cached; retry, set DENSENET_ZOO_MIRROR to a reachable copy, or place the file at {final}"
        ) from None
    if total is not None and received != total:
        raise WeightsError(f"download of {url} stopped after {received} of {total} bytes; nothing was cached, retry")


def hf_download(repo_id: str, filename: str = "model.safetensors", *, progress: bool = True) -> Path:
    """A file of a Hugging Face hub repository through ``huggingface_hub`` (its own cache and lock).

    >>> hf_download("timm/densenet121.ra_in1k")
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = is_offline()
    try:
        # HF_ENDPOINT is read again here: huggingface_hub reads it only once, when first imported.
        endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline, endpoint=endpoint))
    except LocalEntryNotFoundError:
        if offline:
            raise WeightsError(
                f"offline mode and {repo_id}/{filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}): "
                f"run `huggingface-cli download {repo_id} {filename}` on a connected machine and copy its cache folder "
                f"models--{repo_id.replace('/', '--')} there, or pass the .safetensors path as weights="
            ) from None
        raise WeightsError(f"could not download {repo_id}/{filename} from the Hugging Face hub (no connection?); retry, or set HF_ENDPOINT to a mirror") from None
    except Exception as exc:  # huggingface_hub raises many HTTP error types
        raise WeightsError(f"could not get {repo_id}/{filename} from the Hugging Face hub: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
