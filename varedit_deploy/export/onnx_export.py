"""Export one GraphSpec: trace it without weights, stream its weights to disk, check it, and
compare it with its PyTorch module in ONNX Runtime where that fits in memory.

Every graph must pass `onnx.checker` with full shape inference; its operator inventory is
checked against the ONNX operators TensorRT's parser supports, so a graph that would not
build is known at export time.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VareditError, require
from ..graph_io import PARAMETER_KEY, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_ONNX_DOMAIN, plugin_record
from ..runtime.onnxruntime_backend import disabled_optimizers
from .external_data import nbytes, stubs, write_graph
from .graphs import GraphSpec
from ..graph_io import StepIO
from .precision import graph_precision, lower, mixed_precision
from .source import ExportSource
from .opsets import graph_opset
from .weightless import parameters_replaced, trace

# Larger graphs keep their weights in `<graph>.onnx.data`, which ONNX Runtime memory-maps; inline
# weights are parsed with the proto and copied again into the session (about 2x while loading).
EXTERNAL_DATA_BYTES = 64 * 2**20
# Graphs whose float32 weights exceed this are not re-run in PyTorch for the comparison (it would
# hold the weights twice more: in torch and in ONNX Runtime); the manifest says so.
VALIDATE_BYTES = 2 * 2**30

# ONNX operators (default domain) that TensorRT's ONNX parser implements (onnx-tensorrt
# docs/operators.md, TensorRT 10.x, the oldest version we target: JetPack 6 ships 10.3).
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid HardSwish
Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LpNormalization MatMul Max MaxPool Mean Min Mod Mul Neg NonZero Not OneHot Or Pad Pow PRelu
QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements ScatterND Selu
Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum
Tan Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())
# Newer operators our graphs may use, with the TensorRT release whose parser added them.
NEWER_TENSORRT_OPS = {"Attention": "10.14"}


def tensorrt_support(ops) -> dict[str, Any]:
    """Manifest fields: the operators no TensorRT parses, and those that need a newer one than 10.3."""
    ops = set(ops)
    return {"tensorrt_unsupported_ops": sorted(ops - TENSORRT_OPS - set(NEWER_TENSORRT_OPS)),
            "tensorrt_needs": {op: NEWER_TENSORRT_OPS[op] for op in sorted(ops & set(NEWER_TENSORRT_OPS))}}

_ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16", 6: "int32", 9: "bool"}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def export_graph(spec: GraphSpec, folder: Path, source: ExportSource, precision: str = "fp32",
                 external_data_bytes: int = EXTERNAL_DATA_BYTES, validate_bytes: int | None = VALIDATE_BYTES,
                 progress: Callable[[int, int, str], None] = lambda done, total, name: None) -> dict[str, Any]:
    """Write `folder/<name>.onnx` (+ `.onnx.data` when large) as an artifact of `precision` holds it
    (precision.lower: its matrix work, and the inputs and outputs that bind the caches); return its
    manifest entry."""
    onnx = require("onnx", "export")
    traced = trace(spec)
    model = traced.model
    _pin_static_output_dims(model, spec, traced.output_shapes)
    model = lower(model, spec.name, precision, StepIO())
    owners = source.owners()
    params = {name: owners[id(p)] for name, p in spec.module.named_parameters()}
    recipes = traced.recipes
    _record_parameters(model, {t: params[r.params[0]][1] for t, r in recipes.items() if len(r.params) == 1})

    def values(initializer: str) -> np.ndarray:
        value = recipes[initializer].evaluate(lambda param: source.tensor(*params[param]))
        return torch.from_numpy(value).contiguous().numpy()  # transposed weights: torch copies 3x faster

    by_module: dict[str, int] = collections.Counter()
    for t in stubs(model):
        by_module[params[recipes[t.name].params[0]][0]] += nbytes(t)
    weight_bytes = sum(by_module.values())
    path = folder / f"{spec.name}.onnx"
    files = write_graph(model, path, values, external=weight_bytes > external_data_bytes, progress=progress)
    try:  # opset 17 types no bf16 Conv (TensorRT parses it); bf16 artifacts get the structural check only
        onnx.checker.check_model(str(path), full_check=precision != "bf16")
    except Exception as e:
        raise VareditError(f"exported graph {spec.name} fails the ONNX checker: {e}") from None
    ops = collections.Counter(n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx"))
    plugin_nodes = sum(n.domain == PLUGIN_ONNX_DOMAIN and n.op_type == PLUGIN_NAME for n in model.graph.node)
    used = {p for r in recipes.values() for p in r.params}  # the graph module's parameters it stores
    read = sorted(params[p] for p in used)
    entry: dict[str, Any] = {
        "files": files,
        "precision": graph_precision(spec.name, precision),
        "mixed_precision": mixed_precision(spec.name, precision),
        "inputs": _io(model.graph.input, spec.inputs),
        "outputs": _io(model.graph.output, spec.outputs),
        "opset": graph_opset(model),
        "attention": spec.attention,
        "ops": dict(sorted(ops.items())),
        **tensorrt_support(ops),
        **({"plugin": {**plugin_record(), "nodes": plugin_nodes}} if plugin_nodes else {}),
        "weights": {"bytes": weight_bytes, "tensors": len(recipes), "by_module": dict(sorted(by_module.items())),
                    "parameters": {m: [n for k, n in read if k == m] for m in sorted({k for k, _ in read})}},
    }
    fp32_bytes = 4 * sum(p.numel() for name, p in spec.module.named_parameters() if name in used)
    if validate_bytes is None:
        entry["validation"] = "skipped: not asked for"
    elif plugin_nodes:
        entry["validation"] = f"skipped: ONNX Runtime cannot run the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} plugin's nodes"
    elif precision == "bf16":
        entry["validation"] = "skipped: ONNX Runtime's CPU provider has no bf16 kernels"
    elif fp32_bytes > validate_bytes:
        entry["validation"] = (f"skipped: {fp32_bytes / 2**30:.1f} GiB of float32 weights exceed the "
                               f"{validate_bytes / 2**30:.1f} GiB limit for a side-by-side run in PyTorch")
    else:
        entry["max_abs_error_vs_torch"] = compare_with_module(spec, path, source, used, set(ops))
    return entry


def _record_parameters(model, weights: dict[str, str]) -> None:
    """Note on every node that reads a weight the model parameter it comes from (`varedit.parameter`):
    quantisation finds its layer groups by it (calibration/groups.py), whatever scope the node was traced in."""
    for node in model.graph.node:
        found = next((weights[i] for i in node.input if i in weights), None)
        if found is not None:
            node.metadata_props.add(key=PARAMETER_KEY, value=found)


def _pin_static_output_dims(model, spec: GraphSpec, shapes: list[tuple[int, ...]]) -> None:
    """The tracer leaves some static output dims symbolic ('Addlogits_dim_0'); pin them to their sizes."""
    for out, shape in zip(model.graph.output, shapes):
        dynamic = spec.dynamic_axes.get(out.name, {})
        for axis, dim in enumerate(out.type.tensor_type.shape.dim):
            if axis not in dynamic:
                dim.Clear()
                dim.dim_value = shape[axis]


def _io(values, names: list[str]) -> list[dict[str, Any]]:
    by_name = {v.name: v for v in values}
    out = []
    for name in names:
        t = by_name[name].type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
    return out


def compare_with_module(spec: GraphSpec, path: Path, source: ExportSource, used: set[str],
                        ops: set[str]) -> dict[str, float]:
    """Max |ONNX Runtime - PyTorch| per output on the spec's example inputs. The module runs with
    the source's weights in float32, fetched for the parameters the graph uses (`used`) alone;
    `ops`, the graph's operators, choose ONNX Runtime's optimisers."""
    import onnxruntime as ort

    owners = source.owners()
    tensors = {name: torch.from_numpy(source.tensor(*owners[id(p)])) if name in used
               else torch.zeros((), dtype=p.dtype).expand(p.shape)  # read for its shape at most
               for name, p in spec.module.named_parameters()}
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False  # one run: its activations go back to the system, not to an arena
    options.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of the weights
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers(ops))
    types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in sess.get_inputs()}  # 16-bit cache inputs
    got = sess.run(None, {n: v.numpy().astype(types[n]) for n, v in zip(spec.inputs, spec.example)})
    del sess
    with torch.inference_mode(), parameters_replaced(spec.module, tensors):
        ref = spec.module(*spec.example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    return {
        name: float(np.max(np.abs(g.astype(np.float64) - r.numpy().astype(np.float64)))) if g.size else 0.0
        for name, g, r in zip(spec.outputs, got, ref)
    }
