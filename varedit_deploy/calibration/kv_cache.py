"""An 8-bit KV cache: graphs read and write int8 cache tensors with per-channel scales.

The cache layout ([L, 2, H, c] per layer) and the in-place slot writes stay as they are; only
the element type changes. Every graph input that is a cache view gets a DequantizeLinear
(int8 -> float) in front of its readers, every output that is written into the cache a
QuantizeLinear at the end, both per channel (H x c, symmetric, zero point 0), with scales
calibrated from the caches the fp32 run filled (max |x| / 127 per channel). A scale's own new
K/V are used in float inside the step; later scales read them back from the 8-bit cache.
Which tensors are cache views follows the step's I/O names in the manifest (graph_io.StepIO)
and the SAR pooling's (layer 0's source rows in, the SAR cache out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..export.opsets import raise_opset
from ..graph_io import StepIO

QMAX = 127.0
DTYPE = "int8"


@dataclass(frozen=True)
class CacheViews:
    """Which graph inputs and outputs are views of which cache ('k.3', 'v.0', 'sar_k')."""

    inputs: dict[str, str]
    outputs: dict[str, str]

    @classmethod
    def of(cls, io: StepIO, depth: int) -> "CacheViews":
        inputs = {"source_k": "k.0", "source_v": "v.0", io.sar_k: "sar_k", io.sar_v: "sar_v"}
        outputs = {io.sar_k: "sar_k", io.sar_v: "sar_v"}  # the step reads what sar_pool writes
        for layer in range(depth):
            for names, views in ((io.past(layer), inputs), (io.new(layer), outputs)):
                views.update(zip(names, (f"k.{layer}", f"v.{layer}")))
        return cls(inputs, outputs)

    def cache_of(self, name: str, output: bool) -> str | None:
        """The cache a graph input (or output) named `name` is a view of, or None."""
        return (self.outputs if output else self.inputs).get(name)


def calibrate_scales(samples: dict[str, list[dict[str, np.ndarray]]], views: CacheViews) -> dict[str, np.ndarray]:
    """Per-channel scales [H * c] of every cache, from the recorded graph inputs that read it."""
    amax: dict[str, np.ndarray] = {}
    for graph_samples in samples.values():
        for sample in graph_samples:
            for name, value in sample.items():
                cache = views.cache_of(name, output=False)
                if cache is None or value.shape[0] == 0:
                    continue
                m = np.abs(value.reshape(-1, value.shape[-2] * value.shape[-1])).max(axis=0)
                amax[cache] = np.maximum(amax[cache], m) if cache in amax else m
    return {k: (np.maximum(v, 1e-8) / QMAX).astype(np.float32) for k, v in amax.items()}


def rewrite(model, scales: dict[str, np.ndarray], views: CacheViews, check: bool = True) -> list[str]:
    """Make `model`'s cache inputs and outputs int8, in place; return the names changed. `check`: run the
    ONNX checker after (not on graphs whose weights are stubs still to be written)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    views_io = [v for v in model.graph.input if views.cache_of(v.name, output=False) is not None] + [
        v for v in model.graph.output if views.cache_of(v.name, output=True) is not None]
    if any(v.type.tensor_type.elem_type != TensorProto.FLOAT for v in views_io):
        raise_opset(model, 19, model.graph.name)  # 16-bit scales: DequantizeLinear/QuantizeLinear from opset 19
    graph = model.graph
    front, back, changed = [], [], []
    constants: dict[str, np.ndarray] = {}

    def convert(value, op: str, source: str, target: str) -> list:
        """Reshape [L, 2, H, c] -> [L, 2, H*c], (de)quantise per channel along axis 2, reshape back."""
        cache = views.cache_of(value.name, output=op == "QuantizeLinear")
        if cache not in scales:
            raise AssertionError(f"no calibrated scale for cache {cache} ({value.name})")
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        float_type = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        scale, zero, flat, shape = (f"kv_scale.{cache}", f"kv_zero.{cache}", f"kv_flat.{value.name}",
                                    f"kv_shape.{value.name}")
        constants.update({scale: scales[cache].astype(float_type), zero: np.zeros(scales[cache].shape, np.int8),
                          flat: np.array([0, dims[1], dims[2] * dims[3]], np.int64),
                          shape: np.array([0, *dims[1:]], np.int64)})
        value.type.tensor_type.elem_type = TensorProto.INT8
        changed.append(value.name)
        name = value.name
        return [helper.make_node("Reshape", [source, flat], [f"{name}.flat"], name=f"kv/{name}/flatten"),
                helper.make_node(op, [f"{name}.flat", scale, zero], [f"{name}.{op}"], axis=2, name=f"kv/{name}/{op}"),
                helper.make_node("Reshape", [f"{name}.{op}", shape], [target], name=f"kv/{name}/unflatten")]

    for value in graph.input:
        if views.cache_of(value.name, output=False) is not None:
            name = value.name
            for node in graph.node:
                node.input[:] = [f"{name}.dequantized" if i == name else i for i in node.input]
            front += convert(value, "DequantizeLinear", name, f"{name}.dequantized")
    for value in graph.output:
        if views.cache_of(value.name, output=True) is not None:
            name = value.name
            for node in graph.node:
                node.output[:] = [f"{name}.float" if o == name else o for o in node.output]
                node.input[:] = [f"{name}.float" if i == name else i for i in node.input]
            back += convert(value, "QuantizeLinear", f"{name}.float", name)
    nodes = front + list(graph.node) + back
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    if check:
        onnx.checker.check_model(model)
    return changed
