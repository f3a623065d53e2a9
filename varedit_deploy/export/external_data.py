"""Write a graph and its weights tensor by tensor, hashing the files as they are written.

Weights go into `<graph>.onnx.data` (or inline, for small graphs) one initializer at a time,
each converted to its initializer's dtype on the way, so an export holds one tensor in memory
however large the model. Tensors of 1 MiB and more start on 64 KiB boundaries, where ONNX
Runtime memory-maps external data instead of copying it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..graph_io import StepIO
from .precision import cast_values, lower

ALIGN, ALIGN_FROM = 64 * 2**10, 2**20
# float, fp16, bf16, double, int64, int32, bool, int8, uint8, float8 e4m3fn
_ITEMSIZE = {1: 4, 10: 2, 16: 2, 11: 8, 7: 8, 6: 4, 9: 1, 3: 1, 2: 1, 17: 1}
_PACKED_4BIT = (21, 22)  # uint4, int4: two per byte, the first in the low nibble


def stubs(model) -> list:
    """The weight initializers still to be written (their dtypes are final)."""
    import onnx

    return [t for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL and not t.external_data]


def nbytes(t) -> int:
    count = int(np.prod(t.dims, dtype=np.int64))
    return (count + 1) // 2 if t.data_type in _PACKED_4BIT else count * _ITEMSIZE[t.data_type]


def pack_4bit(values: np.ndarray) -> np.ndarray:
    """4-bit integers (in int8/uint8) packed as ONNX stores them: two per byte, the first in the low nibble."""
    flat = np.ascontiguousarray(values).reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


class _HashingFile:
    def __init__(self, path: Path):
        self.f, self.sha, self.size = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)

    def pad_to(self, multiple: int) -> None:
        if self.size % multiple:
            self.write(bytes(multiple - self.size % multiple))

    def close(self) -> dict[str, Any]:
        self.f.close()
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def write_graph(model, path: Path, values: Callable[[str], np.ndarray], external: bool,
                progress: Callable[[int, int, str], None] = lambda done, total, name: None) -> list[dict[str, Any]]:
    """Fill every stub of `model` from `values(name)` (float32, or the integers of an integer type) and
    write `path` (+ `.data`).

    Returns a record (file name, bytes, sha256) per file written."""
    import onnx

    pending = stubs(model)
    total, done = sum(nbytes(t) for t in pending), 0
    data_path = path.with_name(path.name + ".data")
    data = _HashingFile(data_path) if external else None
    try:
        for t in pending:
            value = cast_values(values(t.name), t.data_type)
            if tuple(value.shape) != tuple(t.dims):
                raise AssertionError(f"weight {t.name}: made {value.shape}, the graph wants {tuple(t.dims)}")
            raw = memoryview(pack_4bit(value) if t.data_type in _PACKED_4BIT else np.ascontiguousarray(value)).cast("B")
            if data is None:
                t.data_location = onnx.TensorProto.DEFAULT
                t.raw_data = raw.tobytes()
            else:
                data.pad_to(ALIGN if len(raw) >= ALIGN_FROM else 64)
                for key, value in (("location", data_path.name), ("offset", data.size), ("length", len(raw))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, str(value)
                data.write(raw)
            done += len(raw)
            progress(done, total, t.name)
    finally:
        written = data.close() if data is not None else None
    proto = model.SerializeToString()
    path.write_bytes(proto)
    records = [{"path": path.name, "bytes": len(proto), "sha256": hashlib.sha256(proto).hexdigest()}]
    if written is not None:
        records.append({"path": data_path.name, **written})
    return records


def lower_graph(path, graph: str, precision: str, io: StepIO, out, ranges: Mapping[str, float] | None = None) -> None:
    """Write the fp32 graph `path` (graph `graph` of an artifact) as an engine set of `precision` holds it
    (`precision.lower`) to `out` (+ `.data`), one external tensor at a time (an engine build never holds
    the fp32 weights and their copy together)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    external = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            external[t.name] = ({e.key: e.value for e in t.external_data}, tuple(t.dims),
                                onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
            del t.external_data[:]  # a stub again: its values are read back as it is written

    def values(name: str) -> np.ndarray:
        info, dims, dtype = external[name]
        with open(path.parent / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return np.frombuffer(f.read(int(info["length"])), dtype).reshape(dims)

    write_graph(lower(model, graph, precision, io, ranges), out, values, external=bool(external))
