"""TensorRT backend: engines from `varedit-deploy build`, device buffers, CUDA graphs per call.

The loop hands every graph call device views (KV-cache prefixes and slots included), so a
step's new K/V are written straight into the caches. Each (profile, shapes, addresses) call
runs once eagerly, is then captured as a CUDA graph and replayed: the small scales are
launch-bound. Everything decidable without a GPU (profiles, shapes, offsets, compatibility)
is plain data elsewhere; this module only talks to TensorRT and CUDA.

Like every backend it waits for the device once per edit: runs, uploads (through page-locked
staging memory) and timing marks (CUDA events) are queued on one stream, and `read_all` is the
one synchronisation.

Nothing fails silently: every status TensorRT returns is checked and a refusal names the
graph, profile and tensor. Each engine holds one activation block, the size of its largest
profile, shared by all its execution contexts (they run one at a time on one stream), instead
of one block per context. A captured graph replays the context state it was recorded from,
so each captured call keeps its own context, bound once, and a replay binds nothing.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..artifact import Manifest
from ..engine_set import ENGINE_MANIFEST, build_command, check_engines, engine_dir_name, engine_precision, select_profile
from ..errors import ArtifactError, EngineError
from ..plugins.trt_plugin import register_plugin
from .backend import Backend, GraphRunner, host_dtype
from .gpu import CudaGraph, DeviceArray, Event, Stream, current_compute_capability
from .tensorrt_import import dtype_name, import_tensorrt

CallKey = tuple  # (profile, ((tensor, address, shape), ...)): what a captured graph has baked in
# Captured calls (a context and a CUDA graph each) kept per engine, least recently used dropped first:
# every instruction length makes new calls (an edit of 8B-1024 is 14 step calls), and a server sees many.
MAX_CAPTURED_CALLS = 256


def _memory_query(obj, name: str):
    """TensorRT >= 10.1 and TensorRT-RTX name the memory queries `<name>_v2`; TensorRT 10.0 only `<name>`."""
    return getattr(obj, f"{name}_v2") if hasattr(obj, f"{name}_v2") else getattr(obj, name)


def give_device_memory(context, block: DeviceArray) -> None:
    """Point a user-managed context at `block` (TensorRT >= 10.1 and TensorRT-RTX: set_device_memory;
    10.0: the device_memory property)."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(block.ptr, block.nbytes)
    else:
        context.device_memory = block.ptr


@dataclass
class _Context:
    handle: Any  # IExecutionContext
    profile: int
    bound: CallKey | None = None  # the call whose shapes and addresses are set on it


class TrtGraph(GraphRunner):
    def __init__(self, name: str, engine, trt: ModuleType, profiles: list[dict], stream: Stream,
                 use_cuda_graphs: bool):
        self.name, self.engine, self.trt, self.profiles, self.stream = name, engine, trt, profiles, stream
        self.use_cuda_graphs = use_cuda_graphs
        self.profile_bytes = [int(_memory_query(engine, "get_device_memory_size_for_profile")(p))
                              for p in range(engine.num_optimization_profiles)]
        # What any one context needs (set_device_memory asks for at least the engine's size).
        self.workspace = DeviceArray.empty((max(int(_memory_query(engine, "device_memory_size")), *self.profile_bytes),),
                                           np.uint8)
        self.contexts: OrderedDict[tuple, _Context] = OrderedDict()  # by use, oldest first
        self.graphs: dict[CallKey, CudaGraph] = {}

    def _where(self, profile: int) -> str:
        label = f" ({self.profiles[profile]['name']})" if self.profiles else ""
        return f"graph {self.name}, profile {profile}{label}"

    def _context(self, key: tuple, profile: int) -> _Context:
        if key in self.contexts:
            self.contexts.move_to_end(key)
        else:
            handle = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if handle is None:
                raise EngineError(f"{self._where(profile)}: TensorRT could not create an execution context")
            give_device_memory(handle, self.workspace)
            if self.profiles and not handle.set_optimization_profile_async(profile, self.stream.ptr):
                raise EngineError(f"{self._where(profile)}: TensorRT refused to select the optimisation profile")
            self.contexts[key] = _Context(handle, profile)
            self._evict()
        return self.contexts[key]

    def _evict(self) -> None:
        """Drop the least recently used calls past MAX_CAPTURED_CALLS: a call's graph, then its context.
        Nothing waits first: the call dropped last ran MAX_CAPTURED_CALLS calls ago, more than an edit
        makes of one engine, so an edit's `read_all` has since waited for it."""
        while len(self.contexts) > MAX_CAPTURED_CALLS:
            key, _ = self.contexts.popitem(last=False)
            graph = self.graphs.pop(key, None)
            if graph is not None:
                graph.destroy()

    def _bind(self, ctx: _Context, key: CallKey, inputs: Mapping[str, DeviceArray],
              outputs: Mapping[str, DeviceArray]) -> None:
        if ctx.bound == key:
            return
        ctx.bound = None  # half-bound until every call below succeeds
        where = self._where(ctx.profile)
        for name, arr in (*inputs.items(), *outputs.items()):  # a buffer of another type would be misread
            if self.dtype(name) != arr.dtype.name:
                raise EngineError(f"{where}: tensor {name!r} is {self.dtype(name)} in the engine, "
                                  f"the buffer bound to it is {arr.dtype.name}")
        for name, arr in inputs.items():
            if not ctx.handle.set_input_shape(name, arr.shape):
                accepts = self.profiles[ctx.profile]["shapes"].get(name) if self.profiles else None
                note = f" (the profile accepts {accepts[0]} to {accepts[2]})" if accepts else ""
                raise EngineError(f"{where}: TensorRT refused shape {tuple(arr.shape)} for input {name!r}{note}")
        for name, arr in (*inputs.items(), *outputs.items()):
            if not ctx.handle.set_tensor_address(name, arr.ptr):
                raise EngineError(f"{where}: TensorRT refused the address of tensor {name!r} ({arr.ptr:#x})")
        for name, arr in outputs.items():  # a buffer of another shape would be overrun or half written
            expected = tuple(ctx.handle.get_tensor_shape(name))
            if expected != tuple(arr.shape):
                raise EngineError(f"{where}: output {name!r} is {expected} for these inputs, "
                                  f"the buffer bound to it is {tuple(arr.shape)}")
        ctx.bound = key

    def _enqueue(self, ctx: _Context) -> None:
        if not ctx.handle.execute_async_v3(self.stream.ptr):
            raise EngineError(f"{self._where(ctx.profile)}: TensorRT failed to enqueue the engine "
                              "(execute_async_v3 returned False; TensorRT's log above says why)")

    def _capturable(self, ctx: _Context) -> bool:
        """TensorRT-RTX says whether a context can be stream-captured (not, e.g., with data-dependent
        shapes); TensorRT 10.x has no such query, and a capture it cannot make fails and raises."""
        check = getattr(ctx.handle, "is_stream_capturable", None)
        return check is None or bool(check(self.stream.ptr))

    def run(self, inputs: Mapping[str, DeviceArray], outputs: Mapping[str, DeviceArray]) -> None:
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        try:
            profile = select_profile(self.profiles, shapes) if self.profiles else 0
        except ValueError as e:
            raise EngineError(f"graph {self.name}: {e}") from None
        key = (profile, tuple((name, arr.ptr, tuple(arr.shape)) for name, arr in (*inputs.items(), *outputs.items())))
        graph = self.graphs.get(key)
        if graph is not None:  # shapes and addresses are baked into the graph: nothing to bind
            self.contexts.move_to_end(key)
            self.stream.launch(graph)
        else:
            # A captured call gets a context of its own; eager calls share one per profile.
            ctx = self._context(key if self.use_cuda_graphs else (profile,), profile)
            self._bind(ctx, key, inputs, outputs)
            self._enqueue(ctx)  # the first call runs eagerly (lazy initialisation), then is captured
            if self.use_cuda_graphs and self._capturable(ctx):
                self.graphs[key] = self.stream.capture(lambda: self._enqueue(ctx))

    def dtype(self, tensor: str) -> str:
        return dtype_name(self.engine.get_tensor_dtype(tensor))

    def memory_report(self) -> dict[str, Any]:
        """Device memory of this engine's activations: the shared block against one static block per profile."""
        return {"profiles": len(self.profile_bytes), "profile_bytes": list(self.profile_bytes),
                "shared_bytes": self.workspace.nbytes, "contexts": len(self.contexts),
                "one_per_profile_bytes": len(self.profile_bytes) * max(self.profile_bytes),
                "cuda_graphs": len(self.graphs)}

    def close(self) -> None:
        """Release captured graphs, then contexts, then the activation block (in that order), once the
        stream's queued work, which may still use them, has finished."""
        self.stream.synchronize()
        for graph in self.graphs.values():
            graph.destroy()
        self.graphs.clear()
        self.contexts.clear()  # TensorRT destroys a context when its last reference goes
        self.workspace.free()
        self.engine = None  # before the backend's runtime, which must outlive its engines


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, manifest: Manifest, flavour: str = "tensorrt", precision: str | None = None,
                 engine_dir: str | Path | None = None, cuda_graphs: bool = True):
        super().__init__(manifest)
        self.trt = import_tensorrt(flavour)
        target = current_compute_capability()
        precision = engine_precision(manifest, precision, target)  # None: what `build` makes of it by default
        folder = Path(engine_dir) if engine_dir else manifest.folder / "engines" / engine_dir_name(
            flavour, self.trt.__version__, target, precision)
        rebuild = build_command(manifest.folder, flavour, target if flavour == "tensorrt-rtx" else "current", precision)
        if not folder.is_dir():
            raise ArtifactError(f"no engines for {flavour} {self.trt.__version__} {target} {precision} in "
                                f"{manifest.folder / 'engines'}; build them: {rebuild}")
        problems = check_engines(folder, manifest, self.trt.__version__, target)
        if problems:
            raise ArtifactError(f"engines in {folder} cannot run here: " + "; ".join(problems) + f"; rebuild: {rebuild}")
        self.folder = folder
        data = json.loads((folder / ENGINE_MANIFEST).read_text())
        self.records = data["engines"]
        self.weight_streaming = bool(data.get("weight_streaming"))
        self.weights_stripped = bool(data.get("weights_stripped"))
        if data.get("plugins"):  # check_engines matched their versions: register before deserialising
            register_plugin(self.trt)
        self.logger = self.trt.Logger(self.trt.Logger.ERROR)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = Stream()
        self.cuda_graphs = cuda_graphs
        # Weak: a buffer the loop drops (text buffers outgrown by a longer instruction) is freed then,
        # not held until close; close frees those still alive.
        self._buffers: list[weakref.ref[DeviceArray]] = []

    def _load(self, name: str) -> GraphRunner:
        rec = self.records[name]
        engine = self.runtime.deserialize_cuda_engine((self.folder / rec["path"]).read_bytes())
        if engine is None:
            raise ArtifactError(f"engine {self.folder / rec['path']} cannot be deserialized")
        if self.weights_stripped:
            self._refit(name, engine)
        if self.weight_streaming:  # built streamable (build --weight-streaming): it keeps every weight on the
            # device until given a budget, set after deserialising and before any context (TensorRT's docs)
            engine.weight_streaming_budget_v2 = engine.get_weight_streaming_automatic_budget()
        return TrtGraph(name, engine, self.trt, rec["profiles"], self.stream, self.cuda_graphs)

    def _refit(self, name: str, engine) -> None:
        """Give a weight-stripped engine its weights, from the artifact's graph file it was built from (the
        engine manifest's hashes matched the artifact's in `check_engines`); before any context exists."""
        graph = self.manifest.graph_path(name)
        refitter = self.trt.Refitter(engine, self.logger)
        parser = self.trt.OnnxParserRefitter(refitter, self.logger)
        if not parser.refit_from_file(str(graph)):
            errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors)) or "no reason given"
            raise EngineError(f"engine {name}: TensorRT could not read its weights from {graph} ({errors})")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise EngineError(f"engine {name}: {graph} lacks {len(missing)} of the weights it was built with "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if not refitter.refit_cuda_engine():
            raise EngineError(f"engine {name}: TensorRT refused the weights of {graph} (refit_cuda_engine returned "
                              "False: they are not the ones it was built with)")

    def tensor_dtype(self, graph: str, tensor: str) -> str:
        """What the engine takes or gives `tensor` in (the engine manifest must say the same)."""
        got = super().tensor_dtype(graph, tensor)
        recorded = self.records[graph].get("io", {}).get(tensor, got)
        if recorded != got:
            raise EngineError(f"engine {graph}: {tensor} is {got}, its engine manifest says {recorded}; rebuild "
                              "the engines")
        return got

    def empty(self, shape, dtype) -> DeviceArray:
        buffer = DeviceArray.empty(tuple(shape), host_dtype(dtype))
        self._buffers = [ref for ref in self._buffers if ref() is not None] + [weakref.ref(buffer)]
        return buffer

    def write(self, dst: DeviceArray, src: np.ndarray) -> None:
        self.stream.copy_to_device(dst, src)  # queued from staging memory: no wait

    def read_all(self, buffers) -> list[np.ndarray]:
        return self.stream.read_back(list(buffers))  # the one synchronisation

    def mark(self) -> Event:
        return self.stream.record()

    def seconds(self, start: Event, end: Event) -> float:
        return end.seconds_since(start)

    def memory_report(self) -> dict[str, dict[str, Any]]:
        """Per loaded engine: activation bytes shared by its contexts (see TrtGraph.memory_report)."""
        return {name: runner.memory_report() for name, runner in self._graphs.items()}

    def close(self) -> None:
        """Release graphs, contexts and activation blocks, the loop's buffers, then the stream."""
        super().close()
        for ref in self._buffers:
            buffer = ref()
            if buffer is not None:
                buffer.free()
        self._buffers.clear()
        self.stream.destroy()
