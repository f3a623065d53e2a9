"""Lower-precision copies of the fp32 graphs for strongly typed engines (FP16/BF16).

Strongly typed networks take their precision from the ONNX types, so the build converts each
fp32 graph: matrix work in half precision; normalisations, softmax, exponentials, reductions
and every graph input/output stay in fp32 (DESIGN.md: norms, softmax accumulation and logits
in fp32). BF16 reuses the FP16 placement and re-rounds every converted initializer from its
fp32 original, so no value is rounded twice.
"""

from __future__ import annotations

import numpy as np

# Graphs whose weights and matrix work are lowered; the small ones (text condition, sampler,
# next-scale inputs with the running code sum) stay fp32 in every engine set.
HALF_GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder", "source_pass", "step")
KEEP_FP32_OPS = ["LayerNormalization", "InstanceNormalization", "Softmax", "ReduceL2", "ReduceMean", "Pow",
                 "Sqrt", "Exp", "Range", "Shape", "Resize"]


def graph_precision(graph: str, precision: str) -> str:
    return precision if graph in HALF_GRAPHS else "fp32"


def to_half(model, precision: str):
    """fp32 ModelProto -> fp16 or bf16 ModelProto with fp32 I/O."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if precision == "fp32":
        return model
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r}")
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT}
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=KEEP_FP32_OPS)
    if precision == "bf16":
        _relabel_bf16(half, originals)
    _sort_nodes(half.graph)
    return half


def _sort_nodes(graph) -> None:
    """Restore topological node order (ONNX requires it; the fp16 converter appends its input casts
    after their readers), keeping the original order wherever it is already valid."""
    import heapq

    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in set(n.input) - available:
            waiting[k] += 1
            readers.setdefault(producer[i], []).append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers.get(k, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise AssertionError(f"graph {graph.name} has a cycle")
    graph.ClearField("node")
    graph.node.extend(nodes[k] for k in order)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _relabel_bf16(model, originals: dict[str, np.ndarray]) -> None:
    import onnx

    f16, bf16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
    for t in model.graph.initializer:
        if t.data_type == f16:
            source = originals.get(t.name)
            values = source if source is not None else onnx.numpy_helper.to_array(t).astype(np.float32)
            t.ClearField("int32_data")
            t.data_type = bf16
            t.raw_data = _bf16_bits(values).tobytes()
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == f16:
                attr.i = bf16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == f16:
                values = onnx.numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.data_type = bf16
                attr.t.raw_data = _bf16_bits(values).tobytes()
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type == f16:
            vi.type.tensor_type.elem_type = bf16
