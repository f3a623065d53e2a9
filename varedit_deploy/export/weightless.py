"""Trace a graph without its weights; keep each initializer as a recipe over the parameters.

An ordinary `torch.onnx.export` holds every weight twice more (folded transposes of each weight
matrix, then the ONNX proto) before anything reaches the disk. Here the graph module runs with
its parameters as explicit graph inputs fed stride-0 placeholders, so tracing never touches a
weight, and torch still folds every constant that does not depend on one. The weight-dependent
nodes that torch's folder would have folded (transposes, concatenations, reshapes, gathers) are
then cut out of the graph into `WeightRecipe`s and evaluated one at a time when the weights are
written: the same graph as an ordinary export, with no weight in memory.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .attention_nodes import FUSED_OPSET, traced_attention
from .graphs import GraphSpec

OPSET = 17  # every graph but a step with fused attention
FUSED_TRACE_OPSET = 20  # the newest the TorchScript exporter writes; the graph then declares FUSED_OPSET
# The single-output ops torch.onnx's (TorchScript) constant folder evaluates
# (torch/csrc/jit/passes/onnx/constant_fold.cpp), less its reductions and Softmax, which no
# VAREdit graph applies to a weight (numpy's results there need not be torch's to the bit).
# Anything else that reads a weight (e.g. Clip/Exp of the attention temperature) stays in the
# graph, exactly as in an ordinary export.
FOLDED_OPS = frozenset({"Slice", "Concat", "Sqrt", "Div", "Mul", "Sub", "Add", "Unsqueeze", "Squeeze", "Transpose",
                        "Cast", "Reshape", "Shape", "Gather", "Range", "Where", "Equal", "Greater", "Less", "Neg",
                        "Not", "Size"})


@dataclass
class WeightRecipe:
    """How one initializer is made: from graph-module parameters through cut-out nodes (none:
    the parameter itself), with the small constants those nodes read."""

    name: str
    params: list[str]
    nodes: list = field(default_factory=list)  # onnx.NodeProto, in evaluation order
    constants: list = field(default_factory=list)  # onnx.TensorProto
    opset: int = OPSET  # of the graph the nodes were cut from

    def evaluate(self, fetch: Callable[[str], np.ndarray]) -> np.ndarray:
        """The initializer's float32 value; `fetch(param)` gives one parameter's value."""
        if not self.nodes:
            return fetch(self.params[0])
        import onnx
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        inputs = [helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, None) for p in self.params]
        output = helper.make_tensor_value_info(self.name, onnx.TensorProto.UNDEFINED, None)
        graph = helper.make_graph(self.nodes, "recipe", inputs, [output], initializer=self.constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        return ReferenceEvaluator(model).run(None, {p: fetch(p) for p in self.params})[0]


@dataclass
class WeightlessGraph:
    """A traced graph whose weight initializers are stubs (name, dims, dtype, no data)."""

    model: object  # onnx.ModelProto
    recipes: dict[str, WeightRecipe]  # stub initializer name -> recipe
    output_shapes: list[tuple[int, ...]]


@contextlib.contextmanager
def parameters_replaced(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run `module` with `tensors` in place of the named parameters, tied copies included
    (torch.func.functional_call refuses to run under the tracer; this is the same swap, undone on exit)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for leaf, param in sub._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((sub, leaf))
    saved = []
    try:
        for name, tensor in tensors.items():
            param = module.get_parameter(name)
            for sub, leaf in holders[id(param)]:
                saved.append((sub, leaf, param))
                sub._parameters[leaf] = tensor
        yield
    finally:
        for sub, leaf, param in reversed(saved):
            sub._parameters[leaf] = param


class _WithExplicitParameters(nn.Module):
    """Runs `module` with the given tensors as its parameters (graph inputs, not constants)."""

    def __init__(self, module: nn.Module, names: list[str], n_inputs: int):
        super().__init__()
        self.wrapped = module  # a submodule, so that nodes are named by module scope (/blocks.0/ffn/...)
        self.names, self.n_inputs = names, n_inputs
        self.output_shapes: list[tuple[int, ...]] = []

    def state_dict(self, *args, **kwargs):
        """Empty: the exporter would trace the wrapped module's parameters as constants."""
        return {}

    def forward(self, *args):
        with parameters_replaced(self.wrapped, dict(zip(self.names, args[self.n_inputs :]))):
            out = self.wrapped(*args[: self.n_inputs])
        self.output_shapes = [tuple(o.shape) for o in (out if isinstance(out, tuple) else (out,))]
        return out


def trace(spec: GraphSpec) -> WeightlessGraph:
    import onnx

    names, placeholders = [], []
    for name, p in spec.module.named_parameters():
        names.append(name)
        placeholders.append(torch.zeros((), dtype=p.dtype).expand(p.shape))  # 4 bytes, whatever the shape
    wrapper = _WithExplicitParameters(spec.module, names, len(spec.example))
    buf = io.BytesIO()
    opset = trace_opset(spec.attention)
    with warnings.catch_warnings(), torch.inference_mode(), traced_attention(spec.module, spec.attention):
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (*spec.example, *placeholders), buf, input_names=[*spec.inputs, *names],
                          output_names=spec.outputs, dynamic_axes=spec.dynamic_axes, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    _drop_wrapper_scope(model)
    recipes = _cut_weight_nodes(model, set(names) & {i.name for i in model.graph.input}, opset)
    if opset == FUSED_TRACE_OPSET:
        declare_fused_opset(model)
    return WeightlessGraph(model, recipes, wrapper.output_shapes)


def trace_opset(attention: str) -> int:
    """The opset a graph with attentions in form `attention` is traced at ("plugin" is fused, its
    self-attentions in their own domain)."""
    return OPSET if attention == "decomposed" else FUSED_TRACE_OPSET


def declare_fused_opset(model) -> None:
    """Declare FUSED_OPSET: no operator the graph uses changed between opsets 20 and 23 but the new
    `Attention`."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = FUSED_OPSET


def _drop_wrapper_scope(model, prefix: str = "/wrapped/") -> None:
    """Name nodes and values as an export of the module itself would (/blocks.0/ffn/fc2/MatMul):
    calibration's layer groups and the half-precision placement read module scopes from them."""
    def strip(name: str) -> str:
        return "/" + name[len(prefix):] if name.startswith(prefix) else name

    graph = model.graph
    for node in graph.node:
        node.name = strip(node.name)
        node.input[:] = [strip(i) for i in node.input]
        node.output[:] = [strip(o) for o in node.output]
    for value in [*graph.initializer, *graph.value_info, *graph.input, *graph.output]:
        value.name = strip(value.name)


def _cut_weight_nodes(model, params: set[str], opset: int) -> dict[str, WeightRecipe]:
    """Move the foldable nodes that depend on parameters into recipes; parameters and the
    values those nodes make become stub initializers (external data, filled when written)."""
    import onnx

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    made_by: dict[str, onnx.NodeProto] = {}  # weight-derived value -> its node
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if (node.op_type in FOLDED_OPS and len(node.output) == 1 and any(i in params or i in made_by for i in inputs)
                and all(i in params or i in made_by or i in constants or i in constant_nodes for i in inputs)):
            made_by.update((o, node) for o in node.output)
    kept = [n for n in graph.node if n.output[0] not in made_by]
    first_use: dict[str, int] = {}
    for index, node in enumerate(kept):
        for i in node.input:
            first_use.setdefault(i, index)
    for o in graph.output:
        first_use.setdefault(o.name, len(kept))
    used = set(first_use)
    # in the order the graph reads them: block by block, which is how the writer reports progress
    needed = sorted((v for v in [*params, *made_by] if v in used), key=first_use.__getitem__)

    def recipe(value: str) -> WeightRecipe:
        r, seen = WeightRecipe(value, [], opset=opset), set()

        def visit(name: str) -> None:
            if name in seen or not name:
                return
            seen.add(name)
            if name in params:
                r.params.append(name)
            elif name in constants:
                r.constants.append(constants[name])
            elif name in constant_nodes:
                r.nodes.append(constant_nodes[name])
            else:
                node = made_by[name]
                for i in node.input:
                    visit(i)
                r.nodes.append(node)

        visit(value)
        return r

    recipes = {v: recipe(v) for v in needed}
    # Types of the weight values from a shape-inferred copy: the graph keeps only the value_info
    # torch wrote (more of it would let ONNX Runtime fuse differently from an ordinary export).
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type for vi in [*inferred.input, *inferred.value_info, *inferred.output]}
    stubs = []
    for v in needed:
        t = types[v]
        assert all(d.HasField("dim_value") for d in t.shape.dim), f"weight {v} has no static shape"
        stub = onnx.TensorProto(name=v, data_type=t.elem_type, dims=[d.dim_value for d in t.shape.dim],
                                data_location=onnx.TensorProto.EXTERNAL)  # data follows when written
        stubs.append(stub)
    gone = set(params) | set(made_by)
    kept_inputs = [i for i in graph.input if i.name not in gone]
    kept_constants = [t for t in graph.initializer if t.name in used]
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]
    del graph.input[:], graph.node[:], graph.initializer[:]
    graph.input.extend(kept_inputs)
    graph.node.extend(kept)
    graph.initializer.extend([*kept_constants, *stubs])
    return recipes
