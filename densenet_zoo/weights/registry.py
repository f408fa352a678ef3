"""Published weights as data: the registry (``weights/manifest.json`` + user manifests).

Environment (the cache reads its own: :mod:`densenet_zoo.weights.cache`):
``DENSENET_ZOO_MIRROR``    base URL that replaces ``https://download.pytorch.org/models`` for every URL entry;
``DENSENET_ZOO_MANIFEST``  extra manifest file(s), ``os.pathsep``-separated, whose entries add to or override ours.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from .._utils import IMAGENET_MEAN, IMAGENET_STD, WeightsError
from .cache import download, hf_download
from .checkpoint import read_safetensors

__all__ = ["WeightsEntry", "fetch", "get_weights", "list_weights", "read_manifest", "register_weights", "weights_preprocessing"]


# Installed: the package data folder densenet_zoo/_data; in a source checkout: the top-level weights/ folder.
_DATA_DIRS = (Path(__file__).resolve().parents[1] / "_data", Path(__file__).resolve().parents[2] / "weights")
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

    The fields are those of ``weights/manifest.json``.

    Attributes:
        name: ``arch.tag``, e.g. ``"densenet121.tv_in1k"``.
        arch: the architecture the weights fit (a name of :func:`list_models`).
        url: direct download URL (``file:`` URLs are relative to the weights folder).
        hf_hub_id: Hugging Face hub repository, instead of ``url``.
        hf_filename: the file in that repository.
        sha256: the full hex digest, or the prefix torchvision puts in its file names.
        file_size: exact size in bytes, checked when given.
        file_size_mib: size as published, informative.
        num_params: parameter count.
        num_classes: outputs of the classifier.
        metrics: evaluation as published (``{"acc@1": ..., "acc@5": ..., "dataset": ...}``).
        gflops: operations per image, as published.
        preprocessing: resize, crop, interpolation, mean, std, crop_pct.
        categories_ref: name of a class-name list in the weights folder (``"imagenet1k"``).
        key_format: whose key names the file uses (``"torchvision"``, ``"torchvision_legacy"``, ``"timm"``).
        license: the weights' license.
        source: who published them, in words.
        default: whether these are the architecture's default weights.
        aliases: other names (``"IMAGENET1K_V1"``).

    Example:
        entry = get_weights("densenet121")           # the default: torchvision's IMAGENET1K_V1
        entry.url, entry.sha256, entry.metrics["acc@1"]
        preprocess = entry.transforms()
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
        return list(class_names(self.categories_ref))

    @property
    def filename(self) -> str:
        """File name of the download (the cache adds a URL digest to a name without a hash: see :func:`densenet_zoo.weights.cache.cache_name`)."""
        if self.url:
            return Path(urllib.parse.urlparse(self.url).path).name or f"{self.name}.bin"
        return self.hf_filename

    def resolved_url(self) -> Optional[str]:
        """``url``, with its base replaced by ``DENSENET_ZOO_MIRROR`` when that is set.

        A relative ``file:NAME`` names a file shipped in the package's data folder.
        """
        mirror = os.environ.get("DENSENET_ZOO_MIRROR", "").strip()
        if self.url and self.url.startswith("file:"):
            path = urllib.request.url2pathname(urllib.parse.urlparse(self.url).path)
            return self.url if os.path.isabs(path) else (data_dir() / path).as_uri()
        if self.url and mirror:
            return mirror.rstrip("/") + "/" + self.filename
        return self.url

    def transforms(self) -> Callable[[Any], Any]:
        """Evaluation preprocessing for these weights: PIL image or uint8/float tensor -> normalised float tensor.

        Example::

            x = get_weights("densenet121").transforms()(Image.open("cat.jpg")).unsqueeze(0)
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
    """Resize the short side, centre-crop, scale to [0, 1], normalise (:func:`~densenet_zoo.data.transforms.eval_pipeline` with named fields)."""

    FIELDS = ("resize_size", "crop_size", "interpolation", "mean", "std")

    def __init__(self, resize_size: int = 256, crop_size: int = 224, interpolation: str = "bilinear",
                 mean: Tuple[float, ...] = IMAGENET_MEAN, std: Tuple[float, ...] = IMAGENET_STD) -> None:
        if interpolation not in _INTERP:
            raise WeightsError(f"interpolation must be one of {_INTERP}, got {interpolation!r}")
        self.resize_size, self.crop_size, self.interpolation = int(resize_size), int(crop_size), interpolation
        self.mean, self.std = list(mean), list(std)

        from ..data.transforms import eval_pipeline  # torchvision loads when a transform is built, not with the registry

        self._pipeline = eval_pipeline(self.resize_size, self.crop_size, interpolation, self.mean, self.std)

    def __call__(self, img: Any) -> Any:
        return self._pipeline(img)

    def __repr__(self) -> str:
        return (f"ImageTransform(resize_size={self.resize_size}, crop_size={self.crop_size}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")


_CATEGORIES: Dict[str, Tuple[str, ...]] = {}


def class_names(ref: str) -> Tuple[str, ...]:
    """A class-name list shipped in the weights folder (``weights/<ref>_classes.json``).

    >>> class_names("imagenet1k")[:2]
    ('tench', 'goldfish')
    """
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

    Example::

        read_manifest("my_weights.json")
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
    """Add (or, with ``overwrite=True``, replace) an entry; one with ``default=True`` becomes the
    default of its architecture.

    Args:
        entry: a :class:`WeightsEntry`, or a dict of its fields.
        overwrite: replace an entry of the same name.

    Returns:
        The registered entry.

    Raises:
        WeightsError: a name that is taken (without ``overwrite``) or a field that is not valid.

    Example:
        register_weights({"name": "densenet121.mine", "arch": "densenet121",
                          "url": "https://example.org/densenet121-0123abcd.pth", "num_classes": 10})
    """
    if not isinstance(entry, WeightsEntry):
        entry = WeightsEntry.from_dict(entry)
    _registry()
    return _add(entry, overwrite=overwrite)


def list_weights(pattern: str = "*") -> List[str]:
    """Registered weight names matching a glob.

    Args:
        pattern: a glob on the names (``arch.tag``).

    Returns:
        The matching names, sorted.

    Example:
        >>> list_weights("densenet121.*")
        ['densenet121.IMAGENET1K_V1', 'densenet121.ra_in1k', 'densenet121.tv_in1k']
    """
    return sorted(n for n in _registry() if fnmatch.fnmatchcase(n, pattern))


def get_weights(name: Any, arch: Optional[str] = None) -> WeightsEntry:
    """The registry entry a weights name stands for.

    Args:
        name: ``"densenet121"`` (its default), ``"densenet121.tv_in1k"``, ``"timm/densenet121.ra_in1k"``
            (any Hugging Face hub id), ``"IMAGENET1K_V1"``/``"DEFAULT"`` with ``arch``, a torchvision
            ``DenseNet121_Weights`` member, or an entry (returned as it is).
        arch: the architecture, for names that do not carry it.

    Returns:
        The :class:`WeightsEntry`.

    Raises:
        WeightsError: an unknown name, or weights of another architecture than ``arch``.

    Example:
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
    close = difflib.get_close_matches(key if arch is None or "." in key else f"{arch}.{key}", list(reg), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise WeightsError(f"unknown weights {name!r}{hint} (see densenet_zoo.list_weights() or `densenet-zoo weights list`)")


def fetch(entry: WeightsEntry, *, progress: bool = True) -> Path:
    """The local file of ``entry``, from the cache or downloaded and verified.

    Example::

        fetch(get_weights("densenet121"))
    """
    if entry.hf_hub_id and not entry.url:
        return hf_download(entry.hf_hub_id, entry.hf_filename, progress=progress)
    url = entry.resolved_url()
    if url is None:  # from_dict refuses such entries; a WeightsEntry built by hand may still lack both
        raise WeightsError(f"weights {entry.name!r} have neither a url nor an hf_hub_id; give one of them")
    return download(url, entry.filename, sha256=entry.sha256, file_size=entry.file_size, progress=progress)


def weights_preprocessing(model: str, source: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Preprocessing of the weights a run starts from: the registry entry's, or the metadata of a
    safetensors file written by :func:`~densenet_zoo.save_model`; ``None`` when unknown.

    Example::

        weights_preprocessing("densenet121")["crop_size"]  # -> 224
    """
    if source and Path(source).is_file() and source.endswith(".safetensors"):
        pre = read_safetensors(source)[1].get("preprocessing")
        return dict(pre) if pre else None
    try:
        info = get_weights(source if source and "." in source else model)
    except (LookupError, ValueError, RuntimeError):  # e.g. a URL: no registry entry to read
        return None
    pre = getattr(info, "preprocessing", None)
    return dict(pre) if pre else None
