"""Trace one GraphSpec to ONNX, check it, and compare it with its PyTorch module in ONNX Runtime.

Every graph must pass `onnx.checker` with full shape inference; its operator inventory is
checked against the ONNX operators TensorRT's parser supports, so a graph that would not
build is known at export time.
"""

from __future__ import annotations

import collections
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VareditError, require
from .graphs import GraphSpec

OPSET = 17
EXTERNAL_DATA_BYTES = 512 * 2**20  # larger graphs keep their weights in `<graph>.onnx.data`

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

_ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16", 6: "int32", 9: "bool"}


def _torch_onnx():
    return require("onnx", "export")


def export_graph(spec: GraphSpec, folder: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict[str, Any]:
    """Write `folder/<name>.onnx` (+ `.onnx.data` when large); return its manifest entry (sans hashes)."""
    onnx = _torch_onnx()
    path = folder / f"{spec.name}.onnx"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(spec.module, spec.example, str(raw), input_names=spec.inputs,
                              output_names=spec.outputs, dynamic_axes=spec.dynamic_axes,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        model = onnx.load(str(raw))
        _pin_static_output_dims(model, spec)
        weight_bytes = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
        files = [path]
        if weight_bytes > external_data_bytes:
            data = path.with_name(path.name + ".data")
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            files.append(data)
        else:
            onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise VareditError(f"exported graph {spec.name} fails the ONNX checker: {e}") from None
    ops = collections.Counter(n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx"))
    return {
        "files": [p.name for p in files],
        "inputs": _io(model.graph.input, spec.inputs),
        "outputs": _io(model.graph.output, spec.outputs),
        "opset": OPSET,
        "ops": dict(sorted(ops.items())),
        "tensorrt_unsupported_ops": sorted(set(ops) - TENSORRT_OPS),
    }


def convert_graph(path: Path, precision: str, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
    """Rewrite an exported fp32 graph in fp16/bf16 in place (same file names)."""
    onnx = _torch_onnx()
    from ..build.precision import to_half

    half = to_half(onnx.load(str(path)), precision)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
        onnx.save_model(half, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(half, str(path))


def _pin_static_output_dims(model, spec: GraphSpec) -> None:
    """The tracer leaves some static output dims symbolic ('Addlogits_dim_0'); pin them to their sizes."""
    with torch.inference_mode():
        ref = spec.module(*spec.example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for out, tensor in zip(model.graph.output, ref):
        dynamic = spec.dynamic_axes.get(out.name, {})
        for axis, dim in enumerate(out.type.tensor_type.shape.dim):
            if axis not in dynamic:
                dim.Clear()
                dim.dim_value = tensor.shape[axis]


def _io(values, names: list[str]) -> list[dict[str, Any]]:
    by_name = {v.name: v for v in values}
    out = []
    for name in names:
        t = by_name[name].type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
    return out


def compare_with_module(spec: GraphSpec, path: Path) -> dict[str, float]:
    """Max |ONNX Runtime - PyTorch| per output on the spec's example inputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: v.numpy() for n, v in zip(spec.inputs, spec.example)})
    with torch.inference_mode():
        ref = spec.module(*spec.example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    return {
        name: float(np.max(np.abs(g.astype(np.float64) - r.numpy().astype(np.float64)))) if g.size else 0.0
        for name, g, r in zip(spec.outputs, got, ref)
    }
