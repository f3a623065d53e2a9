"""An 8-bit KV cache: graphs read and write int8 cache tensors with per-channel scales.

The cache layout ([L, 2, H, c] per layer) and the in-place slot writes stay as they are; only
the element type changes. Every graph input that is a cache view gets a DequantizeLinear
(int8 -> float) in front of its readers, every output that is written into the cache a
QuantizeLinear at the end, both per channel (H x c, symmetric, zero point 0), with scales
calibrated from the caches the fp32 run filled (max |x| / 127 per channel). A scale's own new
K/V are used in float inside the step; later scales read them back from the 8-bit cache.
Which tensors are cache views is read from their names (the contract with runtime/loop.py).
"""

from __future__ import annotations

import re

import numpy as np

# Cache-bound graph I/O: past_k_3 / new_k_3 are views of layer 3's K cache; source_k (sar_pool's
# input) is layer 0's source rows; sar_k is the SAR cache.
CACHE_INPUTS = re.compile(r"(past|source|sar)_([kv])(?:_(\d+))?")
CACHE_OUTPUTS = re.compile(r"(new|sar)_([kv])(?:_(\d+))?")
QMAX = 127.0
DTYPE = "int8"


def cache_of(name: str, output: bool) -> str | None:
    """The cache a graph input/output is a view of ('k.3', 'v.0', 'sar_k'), or None."""
    m = (CACHE_OUTPUTS if output else CACHE_INPUTS).fullmatch(name)
    if m is None:
        return None
    kind, kv, layer = m.groups()
    if kind in ("sar", "source"):
        return None if layer is not None else f"sar_{kv}" if kind == "sar" else f"{kv}.0"
    return None if layer is None else f"{kv}.{layer}"


def calibrate_scales(samples: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Per-channel scales [H * c] of every cache, from the recorded graph inputs that read it."""
    amax: dict[str, np.ndarray] = {}
    for graph_samples in samples.values():
        for sample in graph_samples:
            for name, value in sample.items():
                cache = cache_of(name, output=False)
                if cache is None or value.shape[0] == 0:
                    continue
                m = np.abs(value.reshape(-1, value.shape[-2] * value.shape[-1])).max(axis=0)
                amax[cache] = np.maximum(amax[cache], m) if cache in amax else m
    return {k: (np.maximum(v, 1e-8) / QMAX).astype(np.float32) for k, v in amax.items()}


def rewrite(model, scales: dict[str, np.ndarray]) -> list[str]:
    """Make `model`'s cache inputs and outputs int8, in place; return the names changed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    front, back, changed = [], [], []
    constants: dict[str, np.ndarray] = {}

    def convert(value, op: str, source: str, target: str) -> list:
        """Reshape [L, 2, H, c] -> [L, 2, H*c], (de)quantise per channel along axis 2, reshape back."""
        cache = cache_of(value.name, output=op == "QuantizeLinear")
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
        if cache_of(value.name, output=False) is not None:
            name = value.name
            for node in graph.node:
                node.input[:] = [f"{name}.dequantized" if i == name else i for i in node.input]
            front += convert(value, "DequantizeLinear", name, f"{name}.dequantized")
    for value in graph.output:
        if cache_of(value.name, output=True) is not None:
            name = value.name
            for node in graph.node:
                node.output[:] = [f"{name}.float" if o == name else o for o in node.output]
                node.input[:] = [f"{name}.float" if i == name else i for i in node.input]
            back += convert(value, "QuantizeLinear", f"{name}.float", name)
    nodes = front + list(graph.node) + back
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    onnx.checker.check_model(model)
    return changed
