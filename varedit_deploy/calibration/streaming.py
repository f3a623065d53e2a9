"""Quantise graphs too large to load whole: Q/DQ written into the graph, each weight quantised as it is written.

ModelOpt (ptq.py) loads each graph into one protobuf (under 2 GiB) and calibrates on recorded
inputs; release-size graphs fit neither. Here a graph's proto is read without its weights, the
weight products chosen get the nodes ModelOpt writes, in its formats (INT4: a block-wise
weight-only DequantizeLinear, axis 0, blocks of 128 along K, no zero point; INT8 and FP8 E4M3: a
per-channel DequantizeLinear of the weight, axis 1, with zero points, and a per-tensor
QuantizeLinear/DequantizeLinear pair on the activation), and the new file is written tensor by
tensor from the source's (`export.external_data.write_graph`): one weight in memory at a time.

The numbers: INT4 round-to-nearest on scales `max|w| / 7` per block (ModelOpt's `rtn_dq`), INT8
weights `max|w| / 127` per output channel and activations `max|x| / 127` per tensor (its `max`
calibration), FP8 `max / 448` (the E4M3 range; ModelOpt derives FP8 scales from its INT8 ones as
`max * 448 / 127^2`). Activation maxima come from `statistics.py`, recorded inside the graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError
from ..export.external_data import write_graph
from ..export.opsets import raise_opset

INT4_BLOCK = 128
QMAX = {"int8": 127.0, "fp8": 448.0}  # the largest magnitude of the stored type
INT4_MAX, INT4_MIN, SCALE_MIN = 7, -8, 1e-5  # ModelOpt's rtn_dq: scales clipped at 1e-5


@dataclass(frozen=True)
class _Stored:
    """Where an initializer's values are: a range of an external file, or the proto itself."""

    dims: tuple[int, ...]
    data_type: int
    location: Path | None = None
    offset: int = 0
    length: int = 0
    inline: Any = None  # the TensorProto, for inline initializers


class GraphWeights:
    """The initializers of an ONNX file, read one at a time as float32 (external data from the file,
    inline ones from the proto), whatever they are stored in (fp32, fp16, bf16)."""

    def __init__(self, path: Path, model):
        import onnx

        self.path, self.stored = path, {}
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                self.stored[t.name] = _Stored(tuple(t.dims), t.data_type, path.parent / info["location"],
                                              int(info.get("offset", 0)), int(info["length"]))
            else:
                copy = onnx.TensorProto()
                copy.CopyFrom(t)
                self.stored[t.name] = _Stored(tuple(t.dims), t.data_type, inline=copy)

    def __contains__(self, name: str) -> bool:
        return name in self.stored

    def float32(self, name: str) -> np.ndarray:
        import onnx

        s = self.stored[name]
        if s.inline is not None:
            return onnx.numpy_helper.to_array(s.inline).astype(np.float32)
        dtype = np.uint16 if s.data_type == onnx.TensorProto.BFLOAT16 else onnx.helper.tensor_dtype_to_np_dtype(s.data_type)
        with open(s.location, "rb") as f:
            f.seek(s.offset)
            raw = f.read(s.length)
        if len(raw) != s.length:
            raise ArtifactError(f"{s.location} ends before weight {name} of {self.path.name} (wanted {s.length} bytes "
                                f"at offset {s.offset}, found {len(raw)}); export the artifact again")
        values = np.frombuffer(raw, dtype).reshape(s.dims)
        if s.data_type == onnx.TensorProto.BFLOAT16:
            return (values.astype(np.uint32) << 16).view(np.float32)
        return values.astype(np.float32)


def as_stubs(model) -> None:
    """Every external initializer of `model` (a proto read without its external data) made a stub: its
    values come back only when the new file is written, from the source. Inline ones stay as they are."""
    import onnx

    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            del t.external_data[:]


def int4_rtn(weight: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] -> (int4 values in int8 [K, N], scales [ceil(K / block), N]): ModelOpt's `rtn_dq`."""
    k, n = weight.shape
    padded = np.zeros((-(-k // block) * block, n), np.float32)
    padded[:k] = weight
    blocks = padded.reshape(-1, block, n)
    scale = np.maximum(np.abs(blocks).max(axis=1) / INT4_MAX, SCALE_MIN).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), INT4_MIN, INT4_MAX).astype(np.int8)
    return q.reshape(-1, n)[:k], scale


def channel_scales(weight: np.ndarray, mode: str) -> np.ndarray:
    """Per output channel (axis 1 of [K, N]) `max|w| / QMAX[mode]`."""
    return (np.abs(weight).max(axis=0) / QMAX[mode]).astype(np.float32)


def quantize_values(values: np.ndarray, scale: np.ndarray, mode: str) -> np.ndarray:
    """Weights divided by their scales, stored as int8 (rounded, clipped to +-127) or as E4M3 values."""
    scaled = values / np.where(scale == 0, 1.0, scale)
    if mode == "int8":
        return np.clip(np.rint(scaled), -QMAX["int8"], QMAX["int8"]).astype(np.int8)
    return np.clip(scaled, -QMAX["fp8"], QMAX["fp8"]).astype(np.float32)  # rounded to E4M3 when stored


@dataclass
class QDQPlan:
    """What `insert_qdq` put into a graph: how each new initializer is made from the source's."""

    makers: dict[str, Callable[[GraphWeights], np.ndarray]]
    quantized_nodes: list[str]


def insert_qdq(model, nodes: Collection[str], mode: str, activation_amax: Mapping[str, float],
               weights: GraphWeights) -> QDQPlan:
    """Quantise the MatMuls `nodes` of `model` (stubs for weights, `as_stubs`) in place: their weights
    through DequantizeLinear, and for int8/fp8 their activations through a per-tensor Q/DQ pair with
    the scale of `activation_amax[node]`. Scales take the type the node computes in (its weight's:
    fp16 in an fp16 graph, fp32 where the graph keeps the node fp32). Int4 needs opset 21, int8/fp8
    opset 19: an older graph is converted first (`weights` stay where they are)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if nodes:
        raise_opset(model, 21 if mode == "int4" else 19, model.graph.name)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    stored = {"int4": TensorProto.INT4, "int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}[mode]
    makers: dict[str, Callable[[GraphWeights], np.ndarray]] = {}
    new_nodes, new_initializers, activations, done = [], [], {}, []

    def stub(name: str, data_type: int, dims) -> None:
        new_initializers.append(onnx.TensorProto(name=name, data_type=data_type, dims=list(dims),
                                                 data_location=TensorProto.EXTERNAL))

    by_name = {n.name: n for n in graph.node}
    for name in nodes:
        node = by_name.get(name)
        if node is None or node.op_type != "MatMul" or node.input[1] not in initializers:
            raise ArtifactError(f"{name} is not a MatMul of an activation by a stored weight; the streamed quantiser "
                                "handles those alone")
        w = node.input[1]
        k, n = initializers[w].dims
        scale_type = initializers[w].data_type
        float_dtype = onnx.helper.tensor_dtype_to_np_dtype(scale_type)
        qw, scale = f"{w}_{mode}", f"{w}_scale"
        if mode == "int4":
            stub(qw, stored, (k, n))
            stub(scale, scale_type, (-(-k // INT4_BLOCK), n))
            makers[qw] = lambda src, w=w: int4_rtn(src.float32(w))[0]
            makers[scale] = lambda src, w=w: int4_rtn(src.float32(w))[1]
            dq = helper.make_node("DequantizeLinear", [qw, scale], [f"{w}_dequantized"], axis=0, block_size=INT4_BLOCK,
                                  name=f"{w}_DequantizeLinear")
        else:
            zero = f"{w}_zero_point"
            stub(qw, stored, (k, n))
            stub(scale, scale_type, (n,))
            new_initializers.append(numpy_helper.from_array(np.zeros(n, np.int8), zero) if mode == "int8" else
                                    helper.make_tensor(zero, stored, [n], np.zeros(n, np.float32).tolist()))
            makers[qw] = lambda src, w=w: quantize_values(src.float32(w), channel_scales(src.float32(w), mode), mode)
            makers[scale] = lambda src, w=w: channel_scales(src.float32(w), mode)
            dq = helper.make_node("DequantizeLinear", [qw, scale, zero], [f"{w}_dequantized"], axis=1,
                                  name=f"{w}_DequantizeLinear")
            x = node.input[0]
            if x not in activations:
                amax = activation_amax.get(name)
                if amax is None:
                    raise ArtifactError(f"no calibration maximum for {x}, the activation of {name}")
                s, z = f"{x}_scale", f"{x}_zero_point"
                new_initializers.append(numpy_helper.from_array(np.array(max(amax, 1e-12) / QMAX[mode], float_dtype), s))
                new_initializers.append(numpy_helper.from_array(np.array(0, np.int8), z) if mode == "int8" else
                                        helper.make_tensor(z, stored, [], [0.0]))
                new_nodes += [helper.make_node("QuantizeLinear", [x, s, z], [f"{x}_quantized"], name=f"{x}_QuantizeLinear"),
                              helper.make_node("DequantizeLinear", [f"{x}_quantized", s, z], [f"{x}_dequantized"],
                                               name=f"{x}_DequantizeLinear")]
                activations[x] = f"{x}_dequantized"
            node.input[0] = activations[x]
        new_nodes.append(dq)
        node.input[1] = f"{w}_dequantized"
        readers[w] -= 1
        if readers[w] == 0:
            graph.initializer.remove(initializers[w])
        done.append(name)
    graph.initializer.extend(new_initializers)
    graph.node.extend(new_nodes)
    return QDQPlan(makers, done)


def write_quantized(model, plan: QDQPlan, source: GraphWeights, out: Path,
                    progress: Callable[[int, int, str], None] = lambda done, total, name: None) -> list[dict[str, Any]]:
    """Write `model` to `out` (+ `.data`), every stub filled as it is written: a quantised weight or scale
    from its source weight, any other from the source's same initializer."""
    from ..export.precision import _sort_nodes

    _sort_nodes(model.graph)

    def values(name: str) -> np.ndarray:
        maker = plan.makers.get(name)
        return maker(source) if maker is not None else source.float32(name)

    return write_graph(model, out, values, external=True, progress=progress)
