"""The saved int8 model: one ONNX file (protobuf data, nothing executed on load) run by ONNX Runtime.

The file is the quantized graph with a ``densenet_zoo.int8`` metadata entry (input contract, class
names, preprocessing, what the fallback kept in float, a checksum of the graph). Loading parses it as
data and checks it before ONNX Runtime sees it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .._utils import CheckpointFileError, DataError, MissingFileError, OutputKind, PathLike, atomic_write

__all__ = ["QuantizedModel", "load_quantized"]

_META_KEY = "densenet_zoo.int8"
_FORMAT = 1
#: operator domains a saved file may use: the ONNX standard ones only (no custom kernels).
_DOMAINS = ("", "ai.onnx")


def _ort():
    try:
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise RuntimeError("int8 quantization needs onnxruntime: pip install 'densenet_zoo[export]'") from None
    return onnxruntime


class QuantizedModel(nn.Module):
    """An int8 DenseNet run by ONNX Runtime: float32 images ``(N, C, S, S)`` in, float32 logits out.

    ``meta`` holds ``in_chans``, ``image_size``, ``num_classes``, ``float_nodes`` (nodes left in
    float), the agreement and error measured on the calibration images, ``class_names`` and
    ``preprocessing`` when known.

    Args:
        onnx_bytes: the quantized ONNX graph, with this package's metadata.
        meta: what the metadata holds (above).
        threads: ONNX Runtime's intra-op threads; ``None`` for its own choice.

    Example:
        q = densenet_zoo.quantize(model, batches); logits = q(images); q.save("model.int8.onnx")
    """

    def __init__(self, onnx_bytes: bytes, meta: Dict[str, Any], *, threads: Optional[int] = None) -> None:
        super().__init__()
        ort = _ort()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._bytes, self.meta = onnx_bytes, dict(meta)
        self._session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.in_chans, self.image_size = int(meta["in_chans"]), int(meta["image_size"])
        self.num_classes = int(meta["num_classes"])

    @property
    def float_nodes(self) -> List[str]:
        """Names of the ONNX nodes kept in float by the fallback."""
        return list(self.meta.get("float_nodes", []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = (self.in_chans, self.image_size, self.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"the int8 model takes images of shape (N, {', '.join(map(str, want))}), got {got}; "
                            f"resize to {self.image_size} px (it was calibrated at that size)")
        out = self._session.run(None, {"input": x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the ONNX file (atomically) and return its path; an existing file is replaced only when it is an
        int8 model file, or with ``overwrite``."""
        return atomic_write(path, lambda f: f.write(self._bytes), kind=QUANTIZED_MODEL, overwrite=overwrite)


def _is_quantized_model(path: Path) -> bool:
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)
    return any(p.key == _META_KEY for p in proto.metadata_props)


#: What ``quantize`` writes: an ONNX file with this package's int8 metadata.
QUANTIZED_MODEL = OutputKind("an int8 model file", _is_quantized_model)


def _graph_digest(model: Any) -> str:
    """sha256 of the graph alone (metadata excluded): a damaged file fails it."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def _with_meta(data: bytes, meta: Dict[str, Any]) -> Tuple[bytes, Dict[str, Any]]:
    import onnx

    proto = onnx.load_from_string(data)
    meta = dict(meta, graph_sha256=_graph_digest(proto))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {_META_KEY: json.dumps(meta)})
    return proto.SerializeToString(), meta


def _refuse(path: PathLike, why: str) -> CheckpointFileError:
    return CheckpointFileError(f"{path}: not a usable int8 model file written by densenet_zoo.quantize ({why}); "
                           f"quantize the model again")


def _read_checked(path: Path) -> Tuple[Any, Dict[str, Any]]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_from_string(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"not an ONNX protobuf: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        meta = json.loads(props[_META_KEY])
        if meta.get("format") != _FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this version reads {_FORMAT}")
        for key in ("in_chans", "image_size", "num_classes"):
            if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 1:
                raise ValueError(f"{key} is {meta.get(key)!r}")
    except KeyError:
        raise _refuse(path, f"no {_META_KEY} metadata") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise _refuse(path, f"bad metadata: {exc}") from None
    if meta.get("graph_sha256") != _graph_digest(proto):
        raise _refuse(path, "the graph does not match its checksum: damaged or edited")
    return proto, meta


def _check_graph(path: Path, proto: Any, meta: Dict[str, Any]) -> None:
    """Standard operators only, no external data, and the input/output shapes the metadata states."""
    import onnx

    if len(proto.functions) or any(len(n.attribute) and any(a.g.node or a.graphs for a in n.attribute) for n in proto.graph.node):
        raise _refuse(path, "it holds functions or subgraphs; a quantized DenseNet has neither")
    for node in proto.graph.node:
        if node.domain not in _DOMAINS or not onnx.defs.has(node.op_type):
            raise _refuse(path, f"node {node.name!r} uses unknown operator {node.domain or 'ai.onnx'}:{node.op_type}")
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]
    if any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data for t in tensors):
        raise _refuse(path, "it refers to external data files; a saved int8 model is one self-contained file")
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != "input" or len(proto.graph.output) != 1:
        raise _refuse(path, "expected one input named 'input' and one output")
    want_in = [None, meta["in_chans"], meta["image_size"], meta["image_size"]]
    want_out = [None, meta["num_classes"]]
    for value, want in ((inputs[0], want_in), (proto.graph.output[0], want_out)):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if len(dims) != len(want) or any(w is not None and d != w for d, w in zip(dims, want)):
            raise _refuse(path, f"{value.name} has shape {dims}, the metadata says {want}")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise _refuse(path, f"invalid ONNX: {str(exc).splitlines()[0]}") from None


def load_quantized(path: PathLike, *, threads: Optional[int] = None) -> QuantizedModel:
    """The :class:`QuantizedModel` saved at ``path`` by :meth:`QuantizedModel.save`.

    The file is parsed as data (no code runs) and checked before ONNX Runtime sees it: our
    metadata, a checksum of the graph, standard operators only, no external data, and input and
    output shapes as stated.

    Args:
        path: the ``.onnx`` file written by :func:`densenet_zoo.quantize` (or ``densenet-zoo quantize``).
        threads: ONNX Runtime's intra-op threads; ``None`` for its own choice.

    Returns:
        The :class:`QuantizedModel`.

    Raises:
        CheckpointFileError: a file that fails any check, in one line.

    Example:
        q = densenet_zoo.load_quantized("densenet121.int8.onnx"); logits = q(images)
    """
    _ort()
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"int8 model {str(path)!r} does not exist; write one with densenet-zoo quantize")
    proto, meta = _read_checked(path)
    _check_graph(path, proto, meta)
    try:
        return QuantizedModel(proto.SerializeToString(), meta, threads=threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a graph it cannot run
        raise _refuse(path, f"onnxruntime cannot run it: {str(exc).splitlines()[0]}") from None
