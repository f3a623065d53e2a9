"""The graph-precision transform: fp32 ONNX graphs -> FP16/BF16 graphs (export, build, quantize).

Strongly typed networks take their precision from the ONNX types, so `export --precision` and
the engine build of an fp32 artifact convert each graph the same way: matrix work in half precision; normalisations, softmax, exponentials, reductions
and every graph input/output stay in fp32 (DESIGN.md: norms, softmax accumulation and logits
in fp32). A normalisation written out in primitive ops (the VAE's GroupNorm, T5's RMSNorm) stays
fp32 as a whole: every node of a module scope that takes a ReduceMean. BF16 reuses the FP16
placement and re-rounds every converted initializer from its fp32 original, so no value is
rounded twice.

Initializers whose data is not in the proto yet (the stubs of a streamed export) are only
retyped here; their values are converted by `cast_values` as they are written.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Collection, Iterable, Mapping

import numpy as np

from ..graph_io import StepIO

# Graphs whose weights and matrix work are lowered (text_cond holds every block's text K/V
# projection: an eighth of the transformer); the small ones (sampler, next-scale inputs with the
# running code sum, source embedding, SAR pooling) stay fp32 in every engine set.
HALF_GRAPHS = ("text_encoder", "text_cond", "vae_encoder", "vae_decoder", "step")
# Graphs a 16-bit artifact or engine set holds differently from an fp32 one: the half graphs, and
# the SAR pooling, which computes in fp32 but takes and gives the caches in 16 bits (`lower`).
LOWERED_GRAPHS = (*HALF_GRAPHS, "sar_pool")
KEEP_FP32_OPS = ["LayerNormalization", "InstanceNormalization", "Softmax", "ReduceL2", "ReduceMean", "Pow",
                 "Sqrt", "Exp", "Range", "Shape", "Resize"]


def graph_precision(graph: str, precision: str) -> str:
    """What `graph`'s weights and matrix work are in, in an artifact or engine set of `precision`."""
    return precision if graph in HALF_GRAPHS else "fp32"


def cache_io(graph: str, names: Iterable[str], io: StepIO) -> set[str]:
    """Those of `names` (a graph's inputs and outputs) that bind the KV caches, the SAR references or
    the per-layer text K/V: held in 16 bits by 16-bit artifacts and engines, as the official code
    holds them (bf16). The residual input, the modulation and the logits stay fp32."""
    if graph == "step":
        templates = [re.compile("^" + re.escape(t).replace(re.escape("{layer}"), r"\d+") + "$")
                     for t in (io.past_k, io.past_v, io.new_k, io.new_v)]
        fixed = {io.sar_k, io.sar_v, io.text_k, io.text_v}
        return {n for n in names if n in fixed or any(t.match(n) for t in templates)}
    if graph == "text_cond":
        return {n for n in names if n in ("text_k", "text_v")}
    if graph == "sar_pool":  # layer 0's source K/V in, the SAR references out: all of them cache rows
        return set(names)
    return set()


# fp16 nodes keep a quarter of fp16's range (its largest finite value is 65504) for inputs the range
# record never saw; a node that reads or writes a larger value stays fp32 (`out_of_range_nodes`).
FP16_SAFE_MAX = 2.0**14


def lower(model, graph: str, precision: str, io: StepIO, ranges: Mapping[str, float] | None = None):
    """`graph` (an fp32 ModelProto) as an artifact or engine set of `precision` holds it: the half
    graphs' matrix work in 16 bits (`to_half`) but for the nodes `mixed_fp32_nodes` keeps fp32, and in
    every graph the inputs and outputs that bind the caches (`cache_io`) in 16 bits, the rest of the
    I/O fp32. Other graphs stay as they are. `ranges`: the graph's range record (tensor -> largest
    absolute value in fp32), which fp16 honours."""
    if precision == "fp32":
        return model
    half_io = cache_io(graph, [v.name for v in (*model.graph.input, *model.graph.output)], io)
    if graph in HALF_GRAPHS:
        return to_half(model, precision, half_io, mixed_fp32_nodes(model, graph, precision, ranges))
    return cast_io(model, half_io, precision) if half_io else model


def mixed_fp32_nodes(model, graph: str, precision: str, ranges: Mapping[str, float] | None) -> list[str]:
    """The nodes an fp16 graph keeps fp32 beyond the normalisations and official fp32 scopes: T5's
    FFN output projections and residual stream (`t5_fp32_nodes`), and every node outside fp16's safe
    range in the record. bf16 has fp32's range and lowers them all."""
    if precision != "fp16":
        return []
    return (t5_fp32_nodes(model) if graph == "text_encoder" else []) + out_of_range_nodes(model, ranges)


_T5_NODE = re.compile(r"^/t5/encoder/block\.(\d+)/layer\.(\d+)/(Add|DenseReluDense/wo/.+)$")


def t5_fp32_nodes(model) -> list[str]:
    """Flan-T5 as the official fp16 load runs it (docs/spec/vae-text.md 4.2): transformers keeps `wo` in
    fp32, so each FFN output is fp32 and the residual stream is fp32 from block 0's FFN on (every
    residual Add but the first); attention and `wi` stay fp16."""
    names = []
    for node in model.graph.node:
        match = _T5_NODE.match(node.name)
        if match and not (match[3] == "Add" and match[1] == "0" and match[2] == "0"):
            names.append(node.name)
    return names


def out_of_range_nodes(model, ranges: Mapping[str, float] | None, limit: float = FP16_SAFE_MAX) -> list[str]:
    """Nodes that read or write a tensor whose recorded largest absolute value exceeds `limit`."""
    large = {tensor for tensor, value in (ranges or {}).items() if value > limit}
    return [node.name for node in model.graph.node if large.intersection(node.input) or large.intersection(node.output)]


def mixed_precision(graph: str, precision: str) -> str:
    """What an artifact's or engine's graph computes in, in words (its manifest entry says so)."""
    if precision == "fp32":
        return "fp32"
    if graph not in HALF_GRAPHS:
        return "fp32" + (f"; the caches it binds {precision}" if graph == "sar_pool" else "")
    kept = "normalisations, softmax and exponentials"
    if graph == "step":
        kept += ", the AdaLN condition and the head"
    if graph == "text_encoder" and precision == "fp16":
        kept += ", the FFN output projections (wo) and the residual stream, as the official fp16 T5 load"
    return f"{precision}; {kept} fp32"


def cast_io(model, names: Collection[str], precision: str):
    """`model` with its float32 inputs and outputs in `names` taken and given in `precision` through a
    Cast each; what it computes stays float32 (the SAR pooling pools in fp32 and rounds once)."""
    import onnx

    half = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    graph = model.graph

    def rename(old: str, new: str) -> None:
        for node in graph.node:
            node.input[:] = [new if i == old else i for i in node.input]
            node.output[:] = [new if o == old else o for o in node.output]

    casts_in, casts_out = [], []
    for value in graph.input:
        if value.name in names and value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            rename(value.name, value.name + "_fp32")
            casts_in.append(onnx.helper.make_node("Cast", [value.name], [value.name + "_fp32"],
                                                  name=f"/io/{value.name}_to_fp32", to=onnx.TensorProto.FLOAT))
            value.type.tensor_type.elem_type = half
    for value in graph.output:
        if value.name in names and value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            rename(value.name, value.name + "_fp32")
            casts_out.append(onnx.helper.make_node("Cast", [value.name + "_fp32"], [value.name],
                                                   name=f"/io/{value.name}_to_{precision}", to=half))
            value.type.tensor_type.elem_type = half
    nodes = [*casts_in, *graph.node, *casts_out]
    graph.ClearField("node")
    graph.node.extend(nodes)
    return model


# Module scopes the official code runs in fp32 even under autocast (docs/spec/transformer.md: the
# AdaLN condition `shared_ada_lin`, the head's `ada_lin`, and the logits `head`).
FP32_SCOPES = ("/shared_ada_lin/", "/ada_lin/", "/head/")


def fp32_nodes(model) -> list[str]:
    """Nodes that stay fp32 whole: written-out normalisations and the official fp32 scopes."""
    return normalisation_nodes(model) + [n.name for n in model.graph.node if n.name.startswith(FP32_SCOPES)]


def normalisation_nodes(model) -> list[str]:
    """Names of the nodes in every module scope that holds a ReduceMean (the TorchScript exporter
    names nodes by module path, `/mid/block_1/norm1/ReduceMean`): the statistics, centring,
    scaling and affine of that normalisation all stay fp32."""
    scopes = {n.name.rsplit("/", 1)[0] + "/" for n in model.graph.node if n.op_type == "ReduceMean"}
    scopes.discard("/")  # a graph-level reduction is not a normalisation scope
    return [n.name for n in model.graph.node if n.name.startswith(tuple(scopes))]


def to_half(model, precision: str, half_io: Collection[str] = (), keep_fp32: Collection[str] = ()):
    """fp32 ModelProto -> fp16 or bf16 ModelProto, its I/O fp32 except those named in `half_io`; the
    nodes named in `keep_fp32` stay fp32 with the normalisations and the official fp32 scopes."""
    from unittest import mock

    import onnx
    from onnxruntime.transformers import float16

    if precision == "fp32":
        return model
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r}")
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT and not _is_stub(t)}
    # Constant nodes' tensors too (RoPE tables, epsilons), by node and attribute: the converter rounds
    # them to fp16 first (clamping to its range), and bf16 must round the fp32 value once.
    names = collections.Counter(n.name for n in model.graph.node)
    originals.update({_constant_key(n.name, a.name): onnx.numpy_helper.to_array(a.t) for n in model.graph.node
                      if n.name and names[n.name] == 1 for a in n.attribute
                      if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == onnx.TensorProto.FLOAT})

    def value_info(tensor):  # the converter's own reads the tensor's data for its shape; stubs have none
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    with mock.patch.object(float16, "make_value_info_from_tensor", value_info):
        fp32_io = [v.name for v in (*model.graph.input, *model.graph.output) if v.name not in half_io]
        half = float16.convert_float_to_float16(model, keep_io_types=fp32_io, op_block_list=KEEP_FP32_OPS,
                                                node_block_list=fp32_nodes(model) + list(keep_fp32))
    _skip_half_round_trips(half)
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


def _is_stub(tensor) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.external_data


def cast_values(values: np.ndarray, data_type: int) -> np.ndarray:
    """Float32 values as stored in an initializer of ONNX type `data_type` (what `to_half` does
    to an initializer it holds: fp16 clamped as ONNX Runtime's converter does, bf16 rounded)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_np_to_float16

    if data_type == onnx.TensorProto.FLOAT16:
        return convert_np_to_float16(np.asarray(values, np.float32))
    if data_type == onnx.TensorProto.BFLOAT16:
        return _bf16_bits(values)
    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):  # integers in [-8, 7] / [0, 15]: packed later
        return np.ascontiguousarray(values, np.int8 if data_type == onnx.TensorProto.INT4 else np.uint8)
    if data_type == onnx.TensorProto.FLOAT8E4M3FN:  # rounded to nearest even (ml_dtypes), stored as its bytes
        import ml_dtypes

        return np.ascontiguousarray(np.asarray(values, np.float32).astype(ml_dtypes.float8_e4m3fn)).view(np.uint8)
    return np.ascontiguousarray(values, onnx.helper.tensor_dtype_to_np_dtype(data_type))


def _skip_half_round_trips(model) -> None:
    """Let fp32 consumers read fp32 values directly.

    The converter casts every output of an fp32 node to fp16 and casts it back before the next
    fp32 node, so a value passing between two fp32 nodes (a chain like GroupNorm's centring,
    square, mean and square root, or a graph input read in fp32) is rounded to fp16 on the way,
    and can overflow there. Each Cast(fp16 -> fp32) of a Cast(fp32 -> fp16) now reads the fp32
    value (a graph output keeps its Cast, as an fp32 copy); identity casts and casts left without
    readers go.
    """
    import onnx

    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    graph = model.graph

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    # Every value's type from inference: a streamed export keeps only the value_info torch wrote.
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input)}
    types.update((t.name, t.data_type) for t in graph.initializer)
    cast_of = {n.output[0]: n.input[0] for n in graph.node if cast_to(n) in (float32, float16)}

    def unrounded(name: str) -> str | None:
        """The earliest fp32 value of a chain of float casts that ends in `name`."""
        found = None
        while name in cast_of and types.get(cast_of[name]) in (float32, float16):
            name = cast_of[name]
            found = name if types[name] == float32 else found
        return found

    outputs = {o.name for o in graph.output}
    # A cast to the type its input already has (an fp32 cast the converter retyped to fp16) is no cast.
    original = {n.output[0]: n.input[0] for n in graph.node
                if cast_to(n) is not None and cast_to(n) == types.get(n.input[0]) and n.output[0] not in outputs}
    for node in graph.node:
        if cast_to(node) == float32 and (source := unrounded(node.output[0])) is not None:
            if node.output[0] in outputs:
                node.input[0] = source  # the graph output keeps its name: an fp32 copy
            else:
                original[node.output[0]] = source

    def resolve(name: str) -> str:
        while name in original:
            name = original[name]
        return name

    for node in graph.node:
        node.input[:] = [resolve(name) for name in node.input]
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
    """float32 -> bfloat16 bit patterns, round to nearest even (uint32 wrap-around keeps bits 16-31 right)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _constant_key(node: str, attr: str) -> str:
    return f"{node}\0{attr}"  # not a tensor name: initializers and node attributes share `originals`


def _relabel_bf16(model, originals: dict[str, np.ndarray]) -> None:
    import onnx

    f16, bf16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
    for t in model.graph.initializer:
        if t.data_type != f16:
            continue
        if not _is_stub(t):  # a stub's values are rounded when it is written (cast_values)
            source = originals.get(t.name)
            values = source if source is not None else onnx.numpy_helper.to_array(t).astype(np.float32)
            t.ClearField("int32_data")
            t.raw_data = _bf16_bits(values).tobytes()
        t.data_type = bf16
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == f16:
                attr.i = bf16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == f16:
                source = originals.get(_constant_key(node.name, attr.name))
                values = source if source is not None else onnx.numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.data_type = bf16
                attr.t.raw_data = _bf16_bits(values).tobytes()
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type == f16:
            vi.type.tensor_type.elem_type = bf16
