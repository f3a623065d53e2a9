"""TensorRT backend: engines from `varedit-deploy build`, device buffers, CUDA graphs per scale.

The loop hands every graph call device views (KV-cache prefixes and slots included), so a
step's new K/V are written straight into the caches. Each (graph, profile, shapes, addresses)
call is run once eagerly, then captured as a CUDA graph and replayed: the small scales are
launch-bound. Everything decidable without a GPU (profiles, shapes, offsets, compatibility)
is plain data elsewhere; this module only talks to TensorRT and CUDA.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..artifact import Manifest
from ..build.engines import BuildOptions, build_command, check_engines, engine_dir_name
from ..build.tensorrt_api import import_tensorrt
from ..errors import ArtifactError
from .backend import Backend, GraphRunner
from .binding_plan import select_profile
from .gpu import DeviceArray, Stream, current_compute_capability


class TrtGraph(GraphRunner):
    def __init__(self, name: str, engine, profiles: list[dict], stream: Stream, use_cuda_graphs: bool):
        self.name, self.engine, self.profiles, self.stream = name, engine, profiles, stream
        self.contexts: dict[int, object] = {}
        self.graphs: dict[tuple, object] = {}
        self.use_cuda_graphs = use_cuda_graphs

    def _context(self, profile: int):
        if profile not in self.contexts:
            ctx = self.engine.create_execution_context()
            if self.profiles:
                ctx.set_optimization_profile_async(profile, self.stream.handle)
            self.contexts[profile] = ctx
        return self.contexts[profile]

    def run(self, inputs: Mapping[str, DeviceArray], outputs: Mapping[str, DeviceArray]) -> None:
        shapes = {k: v.shape for k, v in inputs.items()}
        profile = select_profile(self.profiles, shapes) if self.profiles else 0
        ctx = self._context(profile)
        for name, arr in inputs.items():
            ctx.set_input_shape(name, arr.shape)
        addresses = tuple((name, arr.ptr, arr.shape) for name, arr in (*inputs.items(), *outputs.items()))
        for name, ptr, _ in addresses:
            ctx.set_tensor_address(name, ptr)
        key = (profile, addresses)
        if not self.use_cuda_graphs:
            ctx.execute_async_v3(self.stream.handle)
        elif key in self.graphs:
            self.stream.launch(self.graphs[key])
        else:  # first call: run eagerly (allocations, lazy init), then capture for replays
            ctx.execute_async_v3(self.stream.handle)
            self.stream.begin_capture()
            ctx.execute_async_v3(self.stream.handle)
            self.graphs[key] = self.stream.end_capture()
        self.stream.synchronize()


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, manifest: Manifest, flavour: str = "tensorrt", precision: str = "fp16",
                 engine_dir: str | Path | None = None, cuda_graphs: bool = True):
        super().__init__(manifest)
        self.trt = import_tensorrt(flavour)
        target = current_compute_capability()
        folder = Path(engine_dir) if engine_dir else manifest.folder / "engines" / engine_dir_name(
            flavour, self.trt.__version__, target, precision)
        fix = build_command(manifest.folder, BuildOptions(flavour=flavour, precision=precision,
                                                          target=target if flavour == "tensorrt-rtx" else "current"))
        if not folder.is_dir():
            raise ArtifactError(f"no engines for {flavour} {self.trt.__version__} {target} {precision} in "
                                f"{manifest.folder / 'engines'}; build them: {fix}")
        problems = check_engines(folder, manifest, self.trt.__version__, target)
        if problems:
            raise ArtifactError(f"engines in {folder} cannot run here: " + "; ".join(problems) + f"; rebuild: {fix}")
        self.folder = folder
        self.records = json.loads((folder / "engines.json").read_text())["engines"]
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.ERROR))
        self.stream = Stream()
        self.cuda_graphs = cuda_graphs

    def _load(self, name: str) -> GraphRunner:
        rec = self.records[name]
        engine = self.runtime.deserialize_cuda_engine((self.folder / rec["path"]).read_bytes())
        if engine is None:
            raise ArtifactError(f"engine {self.folder / rec['path']} cannot be deserialized")
        return TrtGraph(name, engine, rec["profiles"], self.stream, self.cuda_graphs)

    def empty(self, shape, dtype) -> DeviceArray:
        return DeviceArray.empty(tuple(shape), dtype)

    def write(self, dst: DeviceArray, src: np.ndarray) -> None:
        self.stream.copy_to_device(dst, src)

    def read_all(self, buffers) -> list[np.ndarray]:
        out = [self.stream.copy_to_host(b) for b in buffers]
        self.stream.synchronize()
        return out

    def close(self) -> None:
        """Destroy every captured graph and the stream (engines and contexts go with their owners)."""
        graphs = [g for runner in self._graphs.values() for g in runner.graphs.values()]
        super().close()
        self.stream.release(graphs)
