"""Statistics of a graph's tensors over real edits, recorded inside the graph: bounded memory at any size.

Each tensor asked for gets its largest finite |x| appended to a copy of its graph (Abs; non-finite
values to 0, so that the infinities a graph makes on purpose, like T5's log of relative position 0,
count for nothing; a flattening Reshape that keeps the trailing axes asked for; a Concat with a row of
zeros, so that an empty tensor gives 0; ReduceMax over the rows; a Cast to fp32), beside a link to
its weights. The copies run in place of the graphs through the ordinary pipeline, and each call
folds its maxima into the running ones: nothing else is kept, however large the graph or the edit.
The range record (`ranges.py`, every tensor, scalars) and the calibration of release-size
quantisation (`streaming.py`: activations per tensor, the KV caches per channel) both read them.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from ..artifact import Manifest
from ..runtime.backend import GraphRunner
from ..runtime.onnxruntime_backend import OnnxRuntimeBackend, OrtGraph
from ..runtime.pipeline import EditPipeline
from ..sampling import NumpyNoise
from .backends import SwappedBackend
from .dataset import EditPair
from .evaluate import TextSource

SUFFIX = "::max_abs"


@dataclass(frozen=True)
class Statistic:
    """The largest finite |x| of `tensor` over every call: per channel of its last `keep` axes (their
    sizes static, e.g. 2 for a cache's heads x head dim), or one number (`keep` 0)."""

    tensor: str
    keep: int = 0


def measuring_backend(manifest: Manifest) -> OnnxRuntimeBackend:
    """ONNX Runtime for measuring runs at release size: weights memory-mapped (prepacking would copy
    every one), no arena, and nodes in about the order listed, so that each measurement runs right after
    what it measures (in the default order the 2B-512 range record passed 23 GB; its VAE encoder alone
    went from 1.1 to 9.5 GB peak with its tensors measured, 2.1 GB in this order)."""
    return OnnxRuntimeBackend(manifest, session_config={"session.disable_prepacking": "1"}, memory_arena=False,
                              priority_order=True)


def tensor_types(model) -> dict[str, object]:
    """Every value's tensor type (element type and shape), from shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: v.type.tensor_type for v in (*inferred.input, *inferred.value_info, *inferred.output)}


def float_tensors(path: Path) -> list[Statistic]:
    """A scalar statistic of every fp32 and fp16 tensor of the graph at `path` (graph inputs and node
    outputs). bf16 tensors (the official code's roundings, a Cast of an fp32 tensor that is measured)
    are left out: ONNX Runtime's CPU provider has no bf16 Abs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    types = tensor_types(model)
    floats = {name for name, t in types.items() if t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    produced = [o for n in model.graph.node for o in n.output]
    return [Statistic(t) for t in [*(i.name for i in model.graph.input), *produced] if t in floats]


def instrumented(path: Path, folder: Path, stats: Sequence[Statistic]) -> Path:
    """A copy of the graph at `path` in `folder` that also outputs `<tensor>::max_abs` (fp32, one value per
    channel kept) for every statistic; its external weights stay where they are (the session reads them
    from the artifact: SwappedBackend's `artifact_weights`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    types = tensor_types(model)
    axes_as_input = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    constants: dict[str, object] = {}

    def constant(name: str, array: np.ndarray) -> str:
        if name not in constants:
            constants[name] = numpy_helper.from_array(array, name)
        return name

    rows_axis = constant("max_abs::axis0", np.array([0], np.int64))
    measuring: dict[str, list] = {}  # per tensor, the nodes that measure it
    for i, stat in enumerate(stats):
        t = types[stat.tensor]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        width = prod(d.dim_value for d in t.shape.dim[len(t.shape.dim) - stat.keep:]) if stat.keep else 1
        zero = constant(f"max_abs::zero::{np.dtype(dtype).name}", np.zeros((), dtype))
        zeros = constant(f"max_abs::zeros::{np.dtype(dtype).name}::{width}", np.zeros((1, width), dtype))
        shape = constant(f"max_abs::shape::{width}", np.array([-1, width], np.int64))
        abs_, diff, finite, kept, rows, padded, reduced = (f"max_abs::{i}::{s}" for s in
                                                          ("abs", "diff", "finite", "kept", "rows", "padded", "max"))
        reduce = (helper.make_node("ReduceMax", [padded, rows_axis], [reduced], keepdims=0, name=f"/max_abs/{i}/ReduceMax")
                  if axes_as_input else
                  helper.make_node("ReduceMax", [padded], [reduced], axes=[0], keepdims=0, name=f"/max_abs/{i}/ReduceMax"))
        measuring.setdefault(stat.tensor, []).extend([
            helper.make_node("Abs", [stat.tensor], [abs_], name=f"/max_abs/{i}/Abs"),
            helper.make_node("Sub", [abs_, abs_], [diff], name=f"/max_abs/{i}/Sub"),  # inf - inf and nan: nan
            helper.make_node("Equal", [diff, zero], [finite], name=f"/max_abs/{i}/Equal"),
            helper.make_node("Where", [finite, abs_, zero], [kept], name=f"/max_abs/{i}/Where"),
            helper.make_node("Reshape", [kept, shape], [rows], name=f"/max_abs/{i}/Reshape"),
            helper.make_node("Concat", [rows, zeros], [padded], axis=0, name=f"/max_abs/{i}/Concat"),
            reduce,
            helper.make_node("Cast", [reduced], [stat.tensor + SUFFIX], to=TensorProto.FLOAT, name=f"/max_abs/{i}/Cast"),
        ])
        model.graph.output.append(helper.make_tensor_value_info(stat.tensor + SUFFIX, TensorProto.FLOAT, [width]))
    # Each measurement listed right after what it measures (`measuring_backend` runs nodes about as listed).
    nodes = [node for value in model.graph.input for node in measuring.pop(value.name, [])]
    for node in model.graph.node:
        nodes += [node, *(measuring_node for out in node.output for measuring_node in measuring.pop(out, []))]
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(constants.values())
    copy = folder / path.name
    onnx.save_model(model, str(copy))
    return copy


class StatisticsRunner(GraphRunner):
    """Runs the instrumented copy of a graph, binding the caller's buffers and its own maxima."""

    def __init__(self, runner: OrtGraph, stats: Sequence[Statistic]):
        self.runner, self.name = runner, runner.name
        shapes = {o.name: o.shape for o in runner.session.get_outputs()}
        self.outputs = {s.tensor + SUFFIX: np.zeros(shapes[s.tensor + SUFFIX], np.float32) for s in stats}
        self.maxima = {s.tensor: np.zeros_like(self.outputs[s.tensor + SUFFIX]) for s in stats}

    def dtype(self, tensor: str) -> str | None:
        return self.runner.dtype(tensor)

    def run(self, inputs, outputs) -> None:
        self.runner.run(inputs, {**outputs, **self.outputs})
        for tensor, running in self.maxima.items():
            np.maximum(running, self.outputs[tensor + SUFFIX], out=running)


def record_statistics(manifest: Manifest, inner: OnnxRuntimeBackend, wanted: dict[str, Sequence[Statistic]],
                      pairs: Sequence[EditPair], text: TextSource, scales: int | None = None, first_seed: int = 20_000,
                      progress: Callable[[str], None] = print) -> dict[str, dict[str, np.ndarray]]:
    """Run `pairs` as edits (their first `scales` scales; all: None) on `inner`'s graphs with the graphs
    of `wanted` measured; per graph, each statistic's running maximum."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="varedit-statistics-") as work:
        swaps = {}
        for name, stats in wanted.items():
            folder = Path(work) / name
            folder.mkdir()
            swaps[name] = instrumented(manifest.graph_path(name), folder, stats)
        runners: dict[str, StatisticsRunner] = {}

        def measured(name: str, runner: OrtGraph) -> GraphRunner:
            runners[name] = StatisticsRunner(runner, wanted[name])
            return runners[name]

        backend = SwappedBackend(inner, swaps, measured, artifact_weights=True)
        try:
            pipe = EditPipeline(manifest, backend)
            for i, pair in enumerate(pairs, 1):
                pipe.generate(**text.conditioning(pair.instruction), photo=pair.load(), noise=NumpyNoise(first_seed + i),
                              scales=scales, decode=scales is None)
                progress(f"  edit {i}/{len(pairs)}{f' (first {scales} scales)' if scales else ''} "
                         f"[{time.perf_counter() - t0:.0f} s]")
        finally:
            backend.close()
    return {name: runner.maxima for name, runner in runners.items()}
