"""Q/DQ post-training quantisation of one graph with NVIDIA Model Optimizer's ONNX PTQ, on the CPU.

ModelOpt calibrates through ONNX Runtime (`calibration_eps=["cpu"]`) on the inputs recorded
from the fp32 graphs. Weights are stored in the low precision (`dq_only`: a DequantizeLinear
on an int8/fp8/int4 initializer) and activations of int8/fp8 get a calibrated per-tensor
QuantizeLinear/DequantizeLinear pair; the rest stays fp32 here and is lowered afterwards by
`build.precision.to_half`, so a quantised graph keeps the same fp32 islands (norms, softmax,
reductions) as every fp16 graph (ModelOpt's own fp16 pass takes 30x longer for the same job).

`keep_quantized` turns a fully quantised graph into one where only some nodes stay quantised,
with the same scales: calibration runs on the fp32 graph, so this equals quantising only those
nodes, and the sensitivity search needs one calibration instead of one per layer group.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import VareditError, require
from ..export.opsets import graph_opset, raise_opset

MODES = ("int8", "fp8", "int4")
METHODS = {"int8": ("entropy", "max"), "fp8": ("max",), "int4": ("awq_clip", "awq_lite", "rtn_dq")}
DEFAULT_METHOD = {"int8": "entropy", "fp8": "max", "int4": "awq_clip"}
MIN_OPSET = {"int8": 19, "fp8": 19, "int4": 21}
HIGH_PRECISIONS = ("fp16", "fp32")  # bf16 has no ONNX Runtime CPU kernels: its report could not be measured
INT4_BLOCK = 128
OPSET_CHECK_TOL = 1e-5  # relative: a version-converted graph computes what the original did

Sample = dict[str, np.ndarray]


def modelopt():
    """ModelOpt's ONNX quantiser, or an error saying how to install it."""
    mq = require("modelopt.onnx.quantization", "quant", "nvidia-modelopt")
    return mq


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"nvidia-modelopt": version("nvidia-modelopt"), "onnxruntime": version("onnxruntime"),
            "onnx": version("onnx")}


def check_mode(mode: str, method: str | None, high_precision: str) -> str:
    """Validate the options; return the calibration method (the mode's default when None)."""
    if mode not in MODES:
        raise VareditError(f"unknown quantisation mode {mode!r}; choose one of {', '.join(MODES)}")
    method = method or DEFAULT_METHOD[mode]
    if method not in METHODS[mode]:
        why = " (ModelOpt derives FP8 scales from a max-calibrated pass)" if mode == "fp8" else ""
        raise VareditError(f"--mode {mode} calibrates with {', '.join(METHODS[mode])}, not {method!r}{why}")
    if high_precision not in HIGH_PRECISIONS:
        raise VareditError(f"--high-precision {high_precision!r} is not available: choose {', '.join(HIGH_PRECISIONS)} "
                           "(the accuracy report runs on ONNX Runtime's CPU provider, which has no bf16 kernels)")
    return method


class _Reader:
    """An ONNX Runtime CalibrationDataReader over recorded samples (shapes may differ per sample)."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)
        self._it = iter(self.samples)

    def get_next(self) -> Sample | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.samples)

    def get_first(self) -> Sample:
        return self.samples[0]

    def __iter__(self):
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def checked_opset(model, opset: int, sample: Sample, name: str):
    """`model` converted to `opset` (only if lower), checked to compute what it did before."""
    import onnx
    import onnxruntime as ort

    current = graph_opset(model)
    if current >= opset:
        return model
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    raise_opset(converted, opset, name)
    try:
        onnx.checker.check_model(converted)
    except Exception as e:
        raise VareditError(f"graph {name}: its opset {current} -> {opset} conversion fails the checker ({e})") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    runs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, sample)
            for m in (model, converted)]
    for before, after in zip(*runs):
        scale = max(float(np.max(np.abs(before))), 1e-30) if before.size else 1.0
        if before.size and float(np.max(np.abs(after - before))) / scale > OPSET_CHECK_TOL:
            raise AssertionError(f"graph {name}: opset {current} -> {opset} conversion changed its outputs")
    return converted


def quantize_graph(source, mode: str, method: str, samples: Sequence[Sample], nodes: Sequence[str], name: str):
    """Quantise the weight products `nodes` of the fp32 graph `source` (ModelProto); return the
    quantised ModelProto, fp32 everywhere else."""
    import onnx

    mq = modelopt()
    if not samples:
        raise VareditError(f"graph {name}: no calibration inputs were recorded (the calibration edits never ran it)")
    model = checked_opset(source, MIN_OPSET[mode], samples[0], name)
    if mode == "int4" and method != "rtn_dq":
        # ModelOpt 0.47's AWQ concatenates every sample's activations along axis 0, so they must share
        # one shape: calibrate AWQ on the samples of the most tokens (the step's finest scale).
        largest = max(samples, key=lambda s: sum(a.size for a in s.values()))
        shape = {k: v.shape for k, v in largest.items()}
        samples = [s for s in samples if {k: v.shape for k, v in s.items()} == shape]
    # ModelOpt matches these patterns with re.match (anchored at the start only): anchor both ends.
    exact = [f"{re.escape(n)}$" for n in nodes]
    everything = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    others = [f"{re.escape(n)}$" for n in everything if n not in set(nodes)]
    if model is source:  # saving with external data rewrites the proto in place: keep the caller's intact
        model = onnx.ModelProto()
        model.CopyFrom(source)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.{mode}.onnx"
        onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=src.name + ".data", size_threshold=1024)
        options = dict(quantize_mode=mode, calibration_method=method, calibration_data_reader=_Reader(samples),
                       calibration_eps=["cpu"], nodes_to_exclude=others or None, use_external_data_format=True,
                       output_path=str(dst), log_level="ERROR")
        if mode == "int4":
            options["block_size"] = INT4_BLOCK
        else:
            options.update(nodes_to_quantize=exact, dq_only=True, high_precision_dtype="fp32")
        captured = io.StringIO()
        os.environ.setdefault("TQDM_DISABLE", "1")
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                mq.quantize(str(src), **options)
        except Exception as e:
            tail = captured.getvalue().strip().splitlines()[-3:]
            raise VareditError(f"ModelOpt failed to quantise graph {name} to {mode} ({type(e).__name__}: {e})"
                               + (f"; its log ends: {' | '.join(tail)}" if tail else "")) from None
        quantized = onnx.load(str(dst))
    prune(quantized)
    onnx.checker.check_model(quantized)
    return quantized


def prune(model) -> None:
    """Drop nodes whose outputs nothing reads and initializers nothing uses (ModelOpt leaves some)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def keep_quantized(quantized, original, keep: set[str]):
    """A copy of `quantized` in which only the nodes named in `keep` read quantised inputs: every
    other node reads what it read in `original`, its activations (before any QuantizeLinear or
    AWQ pre-quant scale) and its fp32 weights."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    originals = {n.name: n for n in original.graph.node}
    weights = {t.name: t for t in original.graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    available = set(producers) | {i.name for i in graph.input}
    added: set[str] = set()
    for node in graph.node:
        if node.name in keep or node.name not in originals:
            continue
        for i, source in enumerate(originals[node.name].input):
            if i >= len(node.input) or node.input[i] == source:
                continue
            if source in weights:  # a quantised weight: its fp32 original
                restored = f"{source}.fp32"
                if restored not in added:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(weights[source])
                    copy.name = restored
                    graph.initializer.append(copy)
                    added.add(restored)
                node.input[i] = restored
            elif source in available:  # an activation behind Q/DQ or AWQ's pre-quant scale (a Mul): as read in fp32
                node.input[i] = source
            else:  # ModelOpt folded the tensor's producer away: read the activation before the QuantizeLinear
                dq = producers.get(node.input[i])
                q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
                if q is not None and q.op_type == "QuantizeLinear":
                    node.input[i] = q.input[0]
    prune(model)
    return model


def stored_bytes(model) -> dict[str, int]:
    """Bytes a graph stores, at their stored types (int4 packs two per byte): `weights` (initializers,
    the learned matrices) and `tables` (Constant nodes: RoPE tables, pooling matrices)."""
    import onnx

    packed = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)

    def size(t) -> int:
        n = int(np.prod(t.dims)) if t.dims else 1
        return (n + 1) // 2 if t.data_type in packed else n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    tables = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
              if a.type == onnx.AttributeProto.TENSOR]
    return {"weights": sum(size(t) for t in model.graph.initializer), "tables": sum(size(t) for t in tables)}
