"""Per-graph comparison of TensorRT engines against ONNX Runtime, through Polygraphy's runners.

For every graph (and every profile of `step`/`sample`) Polygraphy feeds the same generated
inputs to an `OnnxrtRunner` on the fp32 graph and a `TrtRunner` on the built engine, and
compares all outputs. Needs a GPU and TensorRT (or TensorRT-RTX) to run the engines, and a
Polygraphy that really uses the TensorRT the engines were built with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import read_manifest
from ..engine_set import check_engines, read_engine_manifest
from ..errors import VareditError, missing_dependency
from ..runtime.gpu import current_compute_capability
from ..runtime.tensorrt_import import import_tensorrt
from ..engine_set import graph_profiles

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int8": np.int8}  # int8: 8-bit KV caches


@dataclass
class GraphComparison:
    graph: str
    profile: str
    max_abs_error: dict[str, float]
    passed: bool


def select_polygraphy_tensorrt(flavour: str) -> None:
    """Make Polygraphy's TensorRT runners use `flavour`'s module (tensorrt or tensorrt_rtx).

    Polygraphy chooses once, when its TensorRT modules are first imported: each binds
    `lazy_import_trt()`, which reads `polygraphy.config.USE_TENSORRT_RTX`, itself read from the
    POLYGRAPHY_USE_TENSORRT_RTX environment variable when `polygraphy.config` is imported (Polygraphy
    >= 0.49.24; older ones always use tensorrt). So the
    choice is set before those imports, then checked: a process whose Polygraphy already chose
    the other module is refused rather than silently comparing with the wrong TensorRT.
    """
    wanted = import_tensorrt(flavour).__name__  # fails first, and clearly, when it is not installed
    use_rtx = flavour == "tensorrt-rtx"
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if use_rtx else "0"
    try:
        from polygraphy import config

        config.USE_TENSORRT_RTX = use_rtx  # polygraphy.config may have been imported before the variable was set
        from polygraphy.backend.trt import loader, runner
    except ImportError:
        raise missing_dependency("polygraphy", "trt") from None
    for module in (loader, runner):
        try:
            bound = module.trt.__name__
        except Exception:  # Polygraphy's lazy import of the other module failed
            bound = "the other TensorRT"
        if bound != wanted:
            raise VareditError(f"Polygraphy in this process already uses {bound}, not {wanted} (it chooses when "
                               "first imported); compare these engines in a new process")


def compare_engines(artifacts: str | Path, engine_dir: str | Path, flavour: str = "tensorrt",
                    rtol: float = 1e-3, atol: float = 1e-3) -> list[GraphComparison]:
    select_polygraphy_tensorrt(flavour)
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.comparator import CompareFunc, Comparator, DataLoader
    except ImportError:
        raise missing_dependency("polygraphy", "trt") from None
    manifest = read_manifest(artifacts)
    engine_dir = Path(engine_dir)
    records = read_engine_manifest(engine_dir)["engines"]
    # The engines must be this artifact's, for this TensorRT and this GPU, as the runtime demands;
    # a set built for some graphs only is compared on those.
    problems = [p for p in check_engines(engine_dir, manifest, import_tensorrt(flavour).__version__,
                                         current_compute_capability()) if not p.startswith("no engine for graph")]
    if problems:
        raise VareditError(f"engines in {engine_dir} cannot be compared here: {'; '.join(problems)}")
    results = []
    for name, graph in manifest.graphs.items():
        if name not in records:
            continue
        profiles = graph_profiles(manifest, name) or [None]
        for index, profile in enumerate(profiles):
            metadata = {}
            for spec in graph["inputs"]:
                shape = profile.shapes[spec["name"]][1] if profile and spec["name"] in profile.shapes else spec["shape"]
                metadata[spec["name"]] = (_NP[spec["dtype"]], tuple(shape))
            loader = DataLoader(input_metadata=_metadata(metadata), val_range={"bits": (0, 1), "input_ids": (0, 100),
                                                                               "noise": (0.05, 3.0)})
            engine = EngineFromBytes((engine_dir / records[name]["path"]).read_bytes())
            runners = [OnnxrtRunner(SessionFromOnnx(str(manifest.graph_path(name)))),
                       TrtRunner(engine, optimization_profile=index if profile else None)]
            outputs = Comparator.run(runners, data_loader=loader)
            accuracy = Comparator.compare_accuracy(outputs, compare_func=CompareFunc.simple(rtol=rtol, atol=atol))
            errors = {}
            for out_name in outputs[0][1][0]:
                a, b = outputs[0][1][0][out_name], outputs[1][1][0][out_name]
                errors[out_name] = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
            results.append(GraphComparison(name, profile.name if profile else "default", errors, bool(accuracy)))
    return results


def _metadata(entries: dict[str, tuple]):
    from polygraphy.common import TensorMetadata

    meta = TensorMetadata()
    for name, (dtype, shape) in entries.items():
        meta.add(name, dtype, shape)
    return meta
