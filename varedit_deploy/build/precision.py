"""Lower-precision copies of the fp32 graphs for strongly typed engines (FP16/BF16).

Strongly typed networks take their precision from the ONNX types, so the build converts each
fp32 graph: matrix work in half precision; normalisations, softmax, exponentials, reductions
and every graph input/output stay in fp32 (DESIGN.md: norms, softmax accumulation and logits
in fp32). A normalisation written out in primitive ops (the VAE's GroupNorm, T5's RMSNorm) stays
fp32 as a whole: every node of a module scope that takes a ReduceMean. BF16 reuses the FP16
placement and re-rounds every converted initializer from its fp32 original, so no value is
rounded twice.
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


def normalisation_nodes(model) -> list[str]:
    """Names of the nodes in every module scope that holds a ReduceMean (the TorchScript exporter
    names nodes by module path, `/mid/block_1/norm1/ReduceMean`): the statistics, centring,
    scaling and affine of that normalisation all stay fp32."""
    scopes = {n.name.rsplit("/", 1)[0] + "/" for n in model.graph.node if n.op_type == "ReduceMean"}
    scopes.discard("/")  # a graph-level reduction is not a normalisation scope
    return [n.name for n in model.graph.node if n.name.startswith(tuple(scopes))]


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
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=KEEP_FP32_OPS,
                                    node_block_list=normalisation_nodes(model))
    _skip_half_round_trips(half)
    if precision == "bf16":
        _relabel_bf16(half, originals)
    return half


def _skip_half_round_trips(model) -> None:
    """Let fp32 consumers read fp32 values directly.

    The converter casts every output of an fp32 node to fp16 and casts it back before the next
    fp32 node, so a value passing between two fp32 nodes (a chain like GroupNorm's centring,
    square, mean and square root, or a graph input read in fp32) is rounded to fp16 on the way,
    and can overflow there. Each Cast(fp16 -> fp32) of a Cast(fp32 -> fp16) now reads the fp32
    value (a graph output keeps its Cast, as an fp32 copy); casts left without readers go.
    """
    import onnx

    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    graph = model.graph

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input)}
    cast_of = {n.output[0]: n.input[0] for n in graph.node if cast_to(n) in (float32, float16)}

    def unrounded(name: str) -> str | None:
        """The earliest fp32 value of a chain of float casts that ends in `name`."""
        found = None
        while name in cast_of and types.get(cast_of[name]) in (float32, float16):
            name = cast_of[name]
            found = name if types[name] == float32 else found
        return found

    outputs = {o.name for o in graph.output}
    original = {}
    for node in graph.node:
        if cast_to(node) == float32 and (source := unrounded(node.output[0])) is not None:
            if node.output[0] in outputs:
                node.input[0] = source  # the graph output keeps its name: an fp32 copy
            else:
                original[node.output[0]] = source
    for node in graph.node:
        node.input[:] = [original.get(name, name) for name in node.input]
    while True:
        read = {name for n in graph.node for name in n.input} | outputs
        unused = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in read]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)
    produced = {name for n in graph.node for name in n.output}
    kept = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept)


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
