"""Verified downloads into a cache shared by processes, with an offline switch.

Environment:
``DENSENET_ZOO_CACHE``     cache folder (default ``$TORCH_HOME/densenet_zoo``, ``~/.cache/torch/densenet_zoo``);
``DENSENET_ZOO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touch the network, use the cache only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator, Optional, Union

import torch.hub
from filelock import FileLock

from .._utils import WeightsError, atomic_write
from .checkpoint import check_safetensors, is_safetensors, read_checkpoint
from .transfer import TransferLimits, transfer

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")  # torchvision's convention: densenet121-a639ec97.pth


def cache_dir() -> Path:
    """``DENSENET_ZOO_CACHE``, else ``$TORCH_HOME/densenet_zoo``, else ``~/.cache/torch/densenet_zoo``.

    Example::

        cache_dir()  # -> PosixPath('/root/.cache/torch/densenet_zoo')
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
    try:
        if is_safetensors(path):  # reading the header checks that the data fills the file exactly
            check_safetensors(path)
        elif zipfile.is_zipfile(path):  # torch.save's format: every member's CRC
            with zipfile.ZipFile(path) as z:
                broken = z.testzip()
            if broken:
                return f"its member {broken} is corrupted"
        else:  # torch's legacy format has no index to check: read it (weights_only, never runs code)
            read_checkpoint(path, metadata=False)
    except Exception as exc:
        return f"it is not a complete weights file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def cache_name(url: str, filename: Optional[str] = None, sha256: Optional[str] = None) -> str:
    """The file name of ``url`` in the cache: readable, and never shared by two different files.

    >>> cache_name("https://download.pytorch.org/models/densenet121-a639ec97.pth")
    'densenet121-a639ec97.pth'
    >>> cache_name("http://host/a/w.safetensors") != cache_name("http://host/b/w.safetensors")
    True

    A name that carries the expected hash (torchvision's ``name-<sha256 prefix>.ext``) names its
    content, which is verified on every use, so mirrors of it share one file; any other name gets
    a digest of the URL, so ``http://host/a/w.pth`` and ``http://host/b/w.pth`` never collide.
    """
    name = filename or Path(urllib.parse.urlparse(url).path).name
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        name = "weights.bin"
    m = _HASH_IN_NAME.search(name)
    want = expected_hash(url, sha256)
    if m and want and (want.startswith(m.group(1)) or m.group(1).startswith(want)):
        return name
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{digest}.{ext}" if dot and stem else f"{name}.{digest}"


def torch_hub_copy(url: str, sha256: Optional[str] = None, file_size: Optional[int] = None) -> Optional[Path]:
    """torch.hub's cached copy of ``url`` (``torch.hub.get_dir()/checkpoints/<name>``), when its hash checks out.

    Example::

        # after torchvision's pretrained=True: PosixPath('/root/.cache/torch/hub/checkpoints/densenet121-a639ec97.pth')
        torch_hub_copy("https://download.pytorch.org/models/densenet121-a639ec97.pth")

    Only a file whose expected hash is known is taken: a name alone does not identify weights.
    """
    name = Path(urllib.parse.urlparse(url).path).name
    if not name or not expected_hash(url, sha256):
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    try:
        return path if path.is_file() and _verify(path, url, sha256, file_size) is None else None
    except OSError:  # unreadable: not ours to fix, download instead
        return None


def _cached_problem(path: Path, url: str, sha256: Optional[str], file_size: Optional[int]) -> Optional[str]:
    """Why the cached ``path`` cannot be used, or None: the hash when one is known, else the size and
    digest recorded at download (else, for an entry cached before records existed, a structural read)."""
    try:
        bad = _verify(path, url, sha256, file_size)
        if bad is None and not expected_hash(url, sha256):
            record = _read_record(path)
            bad = _unreadable(path) if record is None else _differs_from_record(path, record)
    except OSError as exc:  # e.g. removed by another process that found it bad: the locked path re-checks
        return f"it cannot be read ({type(exc).__name__})"
    return bad


def _record_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.record.json")


def _read_record(path: Path) -> Optional[dict]:
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("size"), int) and isinstance(record.get("sha256"), str)
    return record if ok else {"size": -1, "sha256": ""}  # a damaged record vouches for nothing


def _differs_from_record(path: Path, record: dict) -> Optional[str]:
    size = path.stat().st_size
    if size != record["size"] or sha256_file(path) != record["sha256"]:
        return (f"it is not the file downloaded from {record.get('url', 'its URL')} ({size} bytes now, "
                f"{record['size']} recorded; the content changed since)")
    return None


def _write_record(path: Path, url: str) -> None:
    record = {"url": url, "size": path.stat().st_size, "sha256": sha256_file(path)}
    atomic_write(_record_path(path), lambda f: f.write(json.dumps(record)), binary=False)


def download(url: str, filename: Optional[str] = None, *, sha256: Optional[str] = None, file_size: Optional[int] = None,
             progress: bool = True, cache: Optional[Path] = None, timeout: float = 60.0,
             limits: Optional[TransferLimits] = None) -> Path:
    """A verified local copy of ``url`` in the cache, downloaded once across processes.

    Example::

        download("https://download.pytorch.org/models/densenet121-a639ec97.pth")  # -> PosixPath('/root/.cache/torch/densenet_zoo/densenet121-a639ec97.pth')

    The file is written to a temporary name and renamed only after its size and sha256 (or the
    hash prefix in its name) check out; the download is bounded in size and time (``limits``, see
    :class:`~densenet_zoo.weights.transfer.TransferLimits`; ``timeout`` is the per-read one). A cached
    file is checked again on every use, against its hash or, where the URL carries none, against the
    size and sha256 recorded at download; a bad one is deleted and downloaded once more. torch.hub's
    copy of a hash-named file is used when present. ``file:///absolute/path`` URLs are checked like
    downloads and used in place. The cache file name is :func:`cache_name`.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return _local_file(url, sha256, file_size)
    if parsed.scheme not in ("http", "https"):
        raise WeightsError(f"cannot download {url!r}: expected an http(s):// or file:// URL")
    cache = Path(cache) if cache is not None else cache_dir()
    dest = cache / cache_name(url, filename, sha256)
    cached = dest.is_file()
    bad = _cached_problem(dest, url, sha256, file_size) if cached else None
    if cached and bad is None:
        return dest
    hub_copy = torch_hub_copy(url, sha256, file_size)
    if hub_copy is not None:
        return hub_copy
    if is_offline():
        if bad:
            raise WeightsError(f"cached file {dest} is not the expected one: {bad}; replace it with a good copy of {url}")
        raise WeightsError(
            f"offline mode (DENSENET_ZOO_OFFLINE/HF_HUB_OFFLINE) and {dest.name} is not in the cache: download {url} "
            f"on a machine with network access and place it at {dest} (or unset the offline switch)"
        )
    limits = limits or TransferLimits.from_env(read_timeout=timeout)
    with _cache_lock(cache, dest):
        _remove_partials(cache, dest.name)
        # Another process may have finished the download while this one waited for the lock.
        if dest.is_file():
            if not _cached_problem(dest, url, sha256, file_size):
                return dest
            dest.unlink()  # a bad copy must not survive a failed re-download either
        _fetch_verified(url, dest, sha256, file_size, progress, limits)
    return dest


def _fetch_verified(url: str, dest: Path, sha256: Optional[str], file_size: Optional[int], progress: bool,
                    limits: TransferLimits) -> None:
    """Download into a temporary sibling, check it, then rename it to ``dest`` and record what it is."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        transfer(url, tmp, dest, declared_size=file_size, limits=limits, progress=progress)
        bad = _verify(tmp, url, sha256, file_size)
        if bad is None and not expected_hash(url, sha256):
            bad = _unreadable(tmp)
        if bad:
            raise WeightsError(f"downloaded {url} but {bad}; nothing was cached, retry or check the mirror (DENSENET_ZOO_MIRROR)")
        os.replace(tmp, dest)
        if not expected_hash(url, sha256):  # a hash verifies every use; without one, the record does
            _write_record(dest, url)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def local_path(url: str) -> Path:
    """The file a ``file:`` URL names, parsed strictly: no host, an absolute path, no ``..``.

    Args:
        url: ``file:///absolute/path`` (``file://localhost/absolute/path`` and ``file:/absolute/path`` too).

    Returns:
        The path it names.

    Raises:
        WeightsError: a host (``file://host/p``, ``file://../p``), a relative path, ``..``, a query or fragment.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        raise WeightsError(f"{url!r} is not a file: URL; write file:///absolute/path")
    fix = "write file:///absolute/path (three slashes) or give the path itself"
    if parsed.netloc not in ("", "localhost"):
        raise WeightsError(f"{url!r} names the host {parsed.netloc!r}, but file: URLs read this machine only; {fix}")
    if parsed.query or parsed.fragment or parsed.params:
        raise WeightsError(f"{url!r} has a query or fragment, which a file path cannot have; {fix}")
    path = urllib.request.url2pathname(parsed.path)
    if not os.path.isabs(path) or ".." in Path(path).parts:
        raise WeightsError(f"{url!r} does not name an absolute path without '..'; {fix}")
    return Path(path)


def _local_file(url: str, sha256: Optional[str], file_size: Optional[int]) -> Path:
    """The file a ``file:`` URL names, checked like a download (size, hash or a structural read), used in place."""
    path = local_path(url)
    if not path.is_file():
        raise WeightsError(f"{url}: no such file {path}")
    bad = _verify(path, url, sha256, file_size)
    if bad is None and not expected_hash(url, sha256):
        bad = _unreadable(path)
    if bad:
        raise WeightsError(f"{path}: {bad}")
    return path


@contextlib.contextmanager
def _cache_lock(cache: Path, dest: Path) -> Iterator[None]:
    """Hold ``dest``'s lock in ``cache``; a cache that is a file or not writable raises a one-line :class:`WeightsError`."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(dest) + ".lock")
        lock.acquire()
    except OSError as exc:
        raise WeightsError(
            f"cannot write to the weights cache {cache} ({type(exc).__name__}: {exc.strerror or exc}); set "
            "DENSENET_ZOO_CACHE to a writable folder, or fix the permissions"
        ) from None
    try:
        yield
    finally:
        lock.release()


#: A partial download untouched this long belongs to a process that died (writes touch it every 64 KiB).
STALE_PARTIAL_S = 3600.0


def _remove_partials(cache: Path, name: str) -> None:
    """Delete leftovers of killed downloads: this file's (its lock is held, so no live writer) and stale ones."""
    now = time.time()
    for p in cache.glob(".*.partial"):
        try:
            if p.name.startswith(f".{name}.") or now - p.stat().st_mtime > STALE_PARTIAL_S:
                p.unlink()
        except OSError:  # gone already, or another process's to clean
            pass


def hf_cache_dir() -> str:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME")
    if home and os.path.expanduser(home) != constants.HF_HOME:
        return os.path.join(os.path.expanduser(home), "hub")
    return constants.HF_HUB_CACHE


def hf_download(repo_id: str, filename: str = "model.safetensors", *, progress: bool = True) -> Path:
    """A file of a Hugging Face hub repository through ``huggingface_hub`` (its own cache and lock).

    Example::

        hf_download("timm/densenet121.ra_in1k")

    A file already in the hub cache (put there by timm, or by ``huggingface-cli download``) is used
    without any request; otherwise it is downloaded (``HF_ENDPOINT`` is honoured).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True, cache_dir=cache))
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # a damaged cache entry: let the online path replace it
        if is_offline():
            raise WeightsError(f"{repo_id}/{filename} in the Hugging Face cache {cache} cannot be used ({type(exc).__name__}); "
                               "delete that entry and download it again") from None
    if is_offline():
        raise WeightsError(
            f"offline mode and {repo_id}/{filename} is not in the Hugging Face cache ({cache}): "
            f"run `huggingface-cli download {repo_id} {filename}` on a connected machine and copy its cache folder "
            f"models--{repo_id.replace('/', '--')} there, or pass the .safetensors path as weights="
        )
    try:
        # HF_ENDPOINT is read again here: huggingface_hub reads it only once, when first imported.
        endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
        return Path(hf_hub_download(repo_id, filename, endpoint=endpoint, cache_dir=cache))
    except LocalEntryNotFoundError:
        raise WeightsError(f"could not download {repo_id}/{filename} from the Hugging Face hub (no connection?); retry, or set HF_ENDPOINT to a mirror") from None
    except Exception as exc:  # huggingface_hub raises many HTTP error types
        raise WeightsError(f"could not get {repo_id}/{filename} from the Hugging Face hub: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
