"""The range record: every tensor's largest absolute value in the fp32 graphs, on real edits, kept in the artifact.

Random tiny weights never leave fp16's range; trained ones do (Flan-T5's FFN outputs pass 65,504,
image VAEs overflow in fp16). The record is what tells whether fp16 is safe for an artifact's
weights: `build --precision fp16` keeps fp32 every node that reads or writes a value beyond
`FP16_SAFE_MAX` (export/precision.py), or with `--strict-fp16` refuses, naming them.

Every float tensor of the graphs that fp16 lowers gets the largest finite `|x|` appended (Abs,
non-finite values to 0, a flattening Reshape, a Concat with 0 so that an empty tensor gives 0,
ReduceMax; infinities a graph makes on purpose, like T5's log of relative position 0, are no range
that fp16 could lose), in a copy of the graph beside a link to its weights; the copies run in place of the graphs on the fp32 artifact's own edits of the
calibration photos and instructions, through the ordinary pipeline.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import Manifest, file_record, read_manifest, write_manifest
from ..errors import ArtifactError
from ..export.precision import FP16_SAFE_MAX, HALF_GRAPHS
from ..fileio import write_text
from ..runtime.backend import GraphRunner
from ..runtime.onnxruntime_backend import OnnxRuntimeBackend, OrtGraph
from ..runtime.pipeline import EditPipeline
from .backends import SwappedBackend
from .dataset import load_set
from .evaluate import run_edit, text_source

RANGES_FILE = "ranges.json"
SUFFIX = "::max_abs"
DEFAULT_EDITS = 4


def instrumented(path: Path, folder: Path) -> tuple[Path, list[str]]:
    """A copy of the graph at `path` in `folder` that also outputs `<tensor>::max_abs` for every float
    tensor (graph inputs and node outputs), its external weights linked, not copied; and those tensors."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    for location in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
        os.symlink((path.parent / location).resolve(), folder / location)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    floats = {v.name for v in (*inferred.input, *inferred.value_info, *inferred.output)
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    produced = [o for n in model.graph.node for o in n.output]
    tensors = [t for t in [*(i.name for i in model.graph.input), *produced] if t in floats]
    flat = helper.make_tensor("max_abs::flat", TensorProto.INT64, [1], [-1])
    zero = helper.make_tensor("max_abs::zero", TensorProto.FLOAT, [1], [0.0])
    model.graph.initializer.extend([flat, zero])
    for i, tensor in enumerate(tensors):
        abs_, diff, finite, kept, flat_, padded = (f"max_abs::{i}::{step}" for step in
                                                  ("abs", "diff", "finite", "kept", "flat", "padded"))
        model.graph.node.extend([
            helper.make_node("Abs", [tensor], [abs_], name=f"/max_abs/{i}/Abs"),
            helper.make_node("Sub", [abs_, abs_], [diff], name=f"/max_abs/{i}/Sub"),  # inf - inf and nan: nan
            helper.make_node("Equal", [diff, zero.name], [finite], name=f"/max_abs/{i}/Equal"),
            helper.make_node("Where", [finite, abs_, zero.name], [kept], name=f"/max_abs/{i}/Where"),
            helper.make_node("Reshape", [kept, flat.name], [flat_], name=f"/max_abs/{i}/Reshape"),
            helper.make_node("Concat", [flat_, zero.name], [padded], axis=0, name=f"/max_abs/{i}/Concat"),
            helper.make_node("ReduceMax", [padded], [tensor + SUFFIX], keepdims=0, name=f"/max_abs/{i}/ReduceMax"),
        ])
        model.graph.output.append(helper.make_tensor_value_info(tensor + SUFFIX, TensorProto.FLOAT, []))
    copy = folder / path.name
    onnx.save_model(model, str(copy))
    return copy, tensors


class _RangeRunner(GraphRunner):
    """Runs the instrumented copy of a graph, binding the caller's buffers and its own maxima."""

    def __init__(self, runner: OrtGraph, tensors: list[str]):
        self.runner, self.name = runner, runner.name
        self.outputs = {t + SUFFIX: np.zeros((), np.float32) for t in tensors}
        self.maxima = dict.fromkeys(tensors, 0.0)

    def dtype(self, tensor: str) -> str | None:
        return self.runner.dtype(tensor)

    def run(self, inputs, outputs) -> None:
        self.runner.run(inputs, {**outputs, **self.outputs})
        for tensor in self.maxima:
            self.maxima[tensor] = max(self.maxima[tensor], float(self.outputs[tensor + SUFFIX]))


def record_ranges(artifacts: str | Path, calibration: Path | None = None, edits: int = DEFAULT_EDITS,
                  fixture: Path | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `edits` calibration edits on the fp32 artifact with every lowered graph measured; write the
    record into the artifact (`ranges.json`, listed in its manifest) and return it."""
    manifest = read_manifest(artifacts, verify="full")
    if manifest.precision != "fp32" or manifest.quantization is not None:
        raise ArtifactError(f"artifact {manifest.folder} holds {manifest.precision} graphs"
                            f"{' (quantised)' if manifest.quantization else ''}; ranges are recorded on fp32 graphs: "
                            "export with --precision fp32 and record them there")
    pairs = load_set(calibration).calibration[:edits]
    text = text_source(manifest, fixture)
    measured = [name for name in HALF_GRAPHS if manifest.has_graph(name)]
    t0 = time.perf_counter()
    progress(f"ranges of {', '.join(measured)} on {len(pairs)} fp32 edits ({', '.join(p.instruction for p in pairs)})")
    with tempfile.TemporaryDirectory(prefix="varedit-ranges-") as work, OnnxRuntimeBackend(manifest) as inner:
        swaps, tensors = {}, {}
        for name in measured:
            folder = Path(work) / name
            folder.mkdir()
            swaps[name], tensors[name] = instrumented(manifest.graph_path(name), folder)
        backend = SwappedBackend(inner, swaps)
        runners = {name: _RangeRunner(backend.graph(name), tensors[name]) for name in measured}
        backend._graphs.update(runners)
        pipe = EditPipeline(manifest, backend)
        for i, pair in enumerate(pairs, 1):
            run_edit(pipe, text, pair, seed=20_000 + i, decode=True)
            progress(f"  edit {i}/{len(pairs)} [{time.perf_counter() - t0:.0f} s]")
        backend.close()
    record = {"graphs": {name: {"values": r.maxima, "scopes": scope_maxima(r.maxima)} for name, r in runners.items()},
              "edits": [{"image": p.image, "instruction": p.instruction} for p in pairs],
              "fp16_safe_max": FP16_SAFE_MAX}
    store_ranges(manifest, record)
    progress(ranges_summary(record))
    return record


def scope_maxima(values: Mapping[str, float]) -> dict[str, float]:
    """The largest value per module scope ('/blocks.3/ffn/fc2/MatMul_output_0' -> '/blocks.3/ffn/fc2')."""
    scopes: dict[str, float] = {}
    for tensor, value in values.items():
        scope = tensor.rsplit("/", 1)[0] if tensor.startswith("/") else "(graph I/O)"
        scopes[scope] = max(scopes.get(scope, 0.0), value)
    return dict(sorted(scopes.items()))


def ranges_summary(record: dict[str, Any]) -> str:
    """One line per graph: its largest value, where, and how many tensors pass fp16's safe range."""
    lines = []
    for name, graph in record["graphs"].items():
        values = graph["values"]
        worst = max(values, key=values.get)
        over = sum(v > record["fp16_safe_max"] for v in values.values())
        lines.append(f"  {name:<13} max |x| {values[worst]:.3g} at {worst}; {over} of {len(values)} tensors beyond "
                     f"{record['fp16_safe_max']:g} (fp16 keeps their nodes fp32)")
    return "\n".join(lines)


def store_ranges(manifest: Manifest, record: dict[str, Any]) -> None:
    """Write the record into the artifact and list it in the manifest (both written whole or not at all).
    Engines built before are stale from then on: an fp16 build is lowered by the record."""
    path = manifest.folder / RANGES_FILE
    write_text(path, json.dumps(record, indent=1))
    data = {k: v for k, v in manifest.data.items() if k != "schema_version"}
    data["ranges"] = {"file": file_record(manifest.folder, path), "edits": len(record["edits"]),
                      "graphs": sorted(record["graphs"])}
    write_manifest(manifest.folder, data)
