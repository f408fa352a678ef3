"""Published weights as data: the registry (``weights/manifest.json`` + user manifests) and a
verified download cache.

Environment:
``DENSENET_ZOO_CACHE``     cache folder (default ``$TORCH_HOME/densenet_zoo``, ``~/.cache/torch/densenet_zoo``);
``DENSENET_ZOO_MIRROR``    base URL that replaces ``https://download.pytorch.org/models`` for every URL entry;
``DENSENET_ZOO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touch the network, use the cache only;
``DENSENET_ZOO_MANIFEST``  extra manifest file(s), ``os.pathsep``-separated, whose entries add to or override ours.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from filelock import FileLock


class WeightsError(RuntimeError):
    """Weights could not be found, downloaded or verified."""


_DATA_DIRS = (Path(__file__).resolve().parent / "_data", Path(__file__).resolve().parent.parent / "weights")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")  # torchvision's convention: densenet121-a639ec97.pth
_INTERP = ("nearest", "bilinear", "bicubic")


def data_dir() -> Path:
    """The folder holding ``manifest.json`` (inside the installed package, or ``weights/`` in a checkout)."""
    for d in _DATA_DIRS:
        if (d / "manifest.json").is_file():
            return d
    raise WeightsError(f"the weights manifest is missing (looked in {', '.join(map(str, _DATA_DIRS))}); reinstall densenet_zoo")


@dataclass(frozen=True)
class WeightsEntry:
    """One set of published weights: where to get it, how to check it, how it was evaluated.

    >>> entry = get_weights("densenet121")           # the default: torchvision's IMAGENET1K_V1
    >>> entry.url, entry.sha256, entry.metrics["acc@1"]
    >>> preprocess = entry.transforms()
    """

    name: str
    arch: str
    url: Optional[str] = None
    hf_hub_id: Optional[str] = None
    hf_filename: str = "model.safetensors"
    sha256: Optional[str] = None  # a prefix (torchvision file names) or the full hex digest
    file_size: Optional[int] = None  # exact bytes, checked when given
    file_size_mib: Optional[float] = None  # as published, informative
    num_params: Optional[int] = None
    num_classes: int = 1000
    metrics: Optional[Dict[str, Any]] = None
    gflops: Optional[float] = None
    preprocessing: Dict[str, Any] = field(default_factory=dict)
    categories_ref: Optional[str] = None  # name of a class-name list in the data folder ("imagenet1k")
    key_format: str = "torchvision"
    license: Optional[str] = None
    source: Optional[str] = None
    default: bool = False
    aliases: Tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1] if "." in self.name else self.name

    @property
    def categories(self) -> Optional[List[str]]:
        """Class names, index = output unit (``None`` when unknown)."""
        if not self.categories_ref:
            return None
        return list(_categories(self.categories_ref))

    @property
    def filename(self) -> str:
        """Name of the file in the cache."""
        if self.url:
            return Path(urllib.parse.urlparse(self.url).path).name or f"{self.name}.bin"
        return self.hf_filename

    def resolved_url(self) -> Optional[str]:
        """``url``, with its base replaced by ``DENSENET_ZOO_MIRROR`` when that is set."""
        mirror = os.environ.get("DENSENET_ZOO_MIRROR", "").strip()
        if self.url and mirror and not self.url.startswith("file:"):
            return mirror.rstrip("/") + "/" + self.filename
        return self.url

    def transforms(self) -> Callable[[Any], Any]:
        """Evaluation preprocessing for these weights: PIL image or uint8/float tensor -> normalised float tensor.

        >>> x = get_weights("densenet121").transforms()(Image.open("cat.jpg")).unsqueeze(0)
        """
        return ImageTransform(**{k: v for k, v in self.preprocessing.items() if k in ImageTransform.FIELDS})

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["categories"] = d.pop("categories_ref")
        d["aliases"] = list(self.aliases)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WeightsEntry":
        d = dict(d)
        if "categories" in d:
            d["categories_ref"] = d.pop("categories")
        d["aliases"] = tuple(d.get("aliases") or ())
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise WeightsError(f"weights entry {d.get('name')!r}: unknown field(s) {extra}; known fields: {sorted(known)}")
        if not d.get("name") or not d.get("arch"):
            raise WeightsError(f"weights entry {d!r} needs a 'name' and an 'arch'")
        if not d.get("url") and not d.get("hf_hub_id"):
            raise WeightsError(f"weights entry {d['name']!r} needs a 'url' or an 'hf_hub_id'")
        if d.get("sha256") and not re.fullmatch(r"[0-9a-fA-F]{6,64}", d["sha256"]):
            raise WeightsError(f"weights entry {d['name']!r}: sha256 {d['sha256']!r} is not a hex digest or prefix (>= 6 hex digits)")
        return cls(**d)


class ImageTransform:
    """Resize the short side, centre-crop, scale to [0, 1], normalise (torchvision's ImageClassification preset)."""

    FIELDS = ("resize_size", "crop_size", "interpolation", "mean", "std")

    def __init__(self, resize_size: int = 256, crop_size: int = 224, interpolation: str = "bilinear",
                 mean: Tuple[float, ...] = (0.485, 0.456, 0.406), std: Tuple[float, ...] = (0.229, 0.224, 0.225)) -> None:
        if interpolation not in _INTERP:
            raise WeightsError(f"interpolation must be one of {_INTERP}, got {interpolation!r}")
        self.resize_size, self.crop_size, self.interpolation = int(resize_size), int(crop_size), interpolation
        self.mean, self.std = list(mean), list(std)

    def __call__(self, img: Any) -> Any:
        import torch
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        img = TF.resize(img, [self.resize_size], interpolation=InterpolationMode(self.interpolation), antialias=True)
        img = TF.center_crop(img, [self.crop_size])
        if not isinstance(img, torch.Tensor):
            img = TF.pil_to_tensor(img)
        img = TF.convert_image_dtype(img, torch.float)
        return TF.normalize(img, mean=self.mean, std=self.std)

    def __repr__(self) -> str:
        return (f"ImageTransform(resize_size={self.resize_size}, crop_size={self.crop_size}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")


_CATEGORIES: Dict[str, Tuple[str, ...]] = {}


def _categories(ref: str) -> Tuple[str, ...]:
    if ref not in _CATEGORIES:
        path = data_dir() / f"{ref}_classes.json"
        if not path.is_file():
            raise WeightsError(f"class-name list {ref!r} not found at {path}")
        _CATEGORIES[ref] = tuple(json.loads(path.read_text()))
    return _CATEGORIES[ref]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: Dict[str, WeightsEntry] = {}
_LOADED_MANIFESTS: List[str] = []


def read_manifest(path: Union[str, os.PathLike]) -> List[WeightsEntry]:
    """Entries of a manifest file (``{"entries": [...]}`` or a bare list).

    >>> read_manifest("my_weights.json")
    """
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"weights manifest {str(path)!r} does not exist; check DENSENET_ZOO_MANIFEST or the path") from None
    except json.JSONDecodeError as exc:
        raise WeightsError(f"weights manifest {str(path)!r} is not valid JSON: {exc}") from None
    items = doc.get("entries") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise WeightsError(f"weights manifest {str(path)!r}: expected a list of entries or {{\"entries\": [...]}}")
    return [WeightsEntry.from_dict(e) for e in items]


def _registry() -> Dict[str, WeightsEntry]:
    if not _LOADED_MANIFESTS:
        for e in read_manifest(data_dir() / "manifest.json"):
            _add(e, overwrite=False, keep_existing=True)  # entries registered before the first look-up win
        _LOADED_MANIFESTS.append("<package>")
    for p in [p for p in os.environ.get("DENSENET_ZOO_MANIFEST", "").split(os.pathsep) if p]:
        if p not in _LOADED_MANIFESTS:
            for e in read_manifest(p):
                _add(e, overwrite=True)
            _LOADED_MANIFESTS.append(p)
    return _REGISTRY


def _add(entry: WeightsEntry, *, overwrite: bool, keep_existing: bool = False) -> WeightsEntry:
    if entry.name in _REGISTRY:
        if keep_existing:
            return _REGISTRY[entry.name]
        if not overwrite:
            raise WeightsError(f"weights {entry.name!r} are already registered; pass overwrite=True to replace them")
    if entry.default:
        for name, other in list(_REGISTRY.items()):
            if other.arch == entry.arch and other.default and name != entry.name:
                _REGISTRY[name] = dataclasses.replace(other, default=False)
    _REGISTRY[entry.name] = entry
    return entry


def register_weights(entry: Union[WeightsEntry, Mapping[str, Any]], *, overwrite: bool = False) -> WeightsEntry:
    """Add (or, with ``overwrite=True``, replace) an entry.

    >>> register_weights({"name": "densenet121.mine", "arch": "densenet121",
    ...                   "url": "https://example.org/densenet121-0123abcd.pth", "num_classes": 10})

    An entry with ``default=True`` becomes the default of its architecture.
    """
    if not isinstance(entry, WeightsEntry):
        entry = WeightsEntry.from_dict(entry)
    _registry()
    return _add(entry, overwrite=overwrite)


def list_weights(pattern: str = "*") -> List[str]:
    """Registered weight names matching a glob: ``list_weights("densenet121*")``."""
    return sorted(n for n in _registry() if fnmatch.fnmatchcase(n, pattern))


def get_weights(name: Any, arch: Optional[str] = None) -> WeightsEntry:
    """The entry for ``name``: ``"densenet121"`` (its default), ``"densenet121.tv_in1k"``,
    ``"timm/densenet121.ra_in1k"``, ``"IMAGENET1K_V1"``/``"DEFAULT"`` with ``arch``, or a
    torchvision ``DenseNet121_Weights`` member.

    >>> get_weights("densenet121").url
    'https://download.pytorch.org/models/densenet121-a639ec97.pth'
    """
    reg = _registry()
    if isinstance(name, WeightsEntry):
        return name
    if hasattr(name, "url") and hasattr(name, "meta") and type(name).__name__.endswith("_Weights"):
        tv_arch = type(name).__name__[: -len("_Weights")].lower()
        if arch is not None and tv_arch != arch:
            raise WeightsError(f"{type(name).__name__}.{name.name} are weights for {tv_arch}, not {arch}")
        arch, name = tv_arch, name.name
    if not isinstance(name, str) or not name:
        raise WeightsError(f"weights must be a name, a path, a URL or a torchvision Weights member, got {type(name).__name__}")
    key = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
    if key in reg:
        return reg[key]
    if "/" in key:
        found = [e for e in reg.values() if e.hf_hub_id == key]
        if found:
            return found[0]
        return WeightsEntry(name=key.split("/", 1)[1], arch=key.split("/", 1)[1].split(".")[0], hf_hub_id=key, key_format="timm",
                            source=f"Hugging Face hub {key}")
    if key in {e.arch for e in reg.values()} or (arch and key.upper() == "DEFAULT"):
        a = key if key.upper() != "DEFAULT" else arch
        defaults = [e for e in reg.values() if e.arch == a and e.default]
        if defaults:
            return defaults[0]
        raise WeightsError(f"no default weights registered for {a!r}; see densenet_zoo.list_weights()")
    if arch is not None:
        for cand in (f"{arch}.{key}",):
            if cand in reg:
                return reg[cand]
        aliased = [e for e in reg.values() if e.arch == arch and key in e.aliases]
        if aliased:
            return aliased[0]
    import difflib

    close = difflib.get_close_matches(key if arch is None or "." in key else f"{arch}.{key}", list(reg), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise WeightsError(f"unknown weights {name!r}{hint} (see densenet_zoo.list_weights() or `densenet-zoo weights list`)")


# ---------------------------------------------------------------------------------------------
# Cache and download
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``DENSENET_ZOO_CACHE``, else ``$TORCH_HOME/densenet_zoo``, else ``~/.cache/torch/densenet_zoo``."""
    if os.environ.get("DENSENET_ZOO_CACHE"):
        return Path(os.environ["DENSENET_ZOO_CACHE"]).expanduser()
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(torch_home).expanduser() / "densenet_zoo"


def is_offline() -> bool:
    """True when ``DENSENET_ZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("DENSENET_ZOO_OFFLINE", "HF_HUB_OFFLINE"))


def expected_hash(url: str, sha256: Optional[str] = None) -> Optional[str]:
    """The hash to check: the given one, else the prefix in a torchvision-style file name."""
    if sha256:
        return sha256.lower()
    m = _HASH_IN_NAME.search(Path(urllib.parse.urlparse(url).path).name)
    return m.group(1) if m else None


def sha256_file(path: Union[str, os.PathLike]) -> str:
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
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
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


def fetch(entry: WeightsEntry, *, progress: bool = True) -> Path:
    """The local file of ``entry``, from the cache or downloaded and verified.

    >>> fetch(get_weights("densenet121"))
    """
    if entry.hf_hub_id and not entry.url:
        return hf_download(entry.hf_hub_id, entry.hf_filename, progress=progress)
    url = entry.resolved_url()
    assert url is not None
    return download(url, entry.filename, sha256=entry.sha256, file_size=entry.file_size, progress=progress)
