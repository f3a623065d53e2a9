"""ONNX Runtime backend: one session per graph, IO binding straight onto the loop's buffers.

The execution providers are chosen by `providers` (runtime/providers.py: cpu, openvino, cuda,
tensorrt, nv_tensorrt_rtx, with options). With the CPU-side providers (cpu, openvino) the loop's
buffers are host arrays; with the CUDA ones they are allocations on the GPU (ort_memory.py), so
a step reads its past and writes its new K/V in device memory, and each call (a scale of `step`,
one instruction length of `text_cond`) is captured once as a CUDA graph under its own
`gpu_graph_id` and replayed after, where the provider allows it for that graph.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..artifact import Manifest
from ..errors import ArtifactError, VareditError, require
from .backend import Backend, GraphRunner, host_dtype
from .ort_memory import OrtArray, OrtMemory, element_type
from .providers import ProviderSpec, Resolved, check_graphs, parse_providers, resolve


def disabled_optimizers(ops) -> list[str]:
    """ONNX Runtime 1.32's NchwcTransformer crashes the process (a segfault while the session is
    built) on a 16-bit graph holding `Attention`; it only reorganises convolutions, which no graph
    with attention has, so it is off for those."""
    return ["NchwcTransformer"] if "Attention" in ops else []


def _ort():
    return require("onnxruntime", "ort")


# ONNX Runtime's type strings -> the element type names buffers are allocated by.
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(bool)": "bool"}
MAX_CUDA_GRAPHS = 256  # captured calls per session; later new calls run uncaptured (gpu_graph_id -1)
# What ONNX Runtime says when a session cannot capture CUDA graphs (nodes off the GPU, control flow).
_NO_CUDA_GRAPH = re.compile(r"graph capture|cuda graph", re.IGNORECASE)


def short_error(error: Exception) -> str:
    """ONNX Runtime's message cut to what says why: its last non-empty line (the rest is C++ frames)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1].rsplit("] ", 1)[-1] if lines else type(error).__name__  # after "[OpenVINO-EP] " and the like
    return text if len(text) <= 300 else text[:297] + "..."


class OrtGraph(GraphRunner):
    def __init__(self, name: str, session, cuda_graphs: bool = False, fallback: Callable[[str], object] | None = None):
        """`fallback(reason)`: a session of the same graph on the CPU provider, taken when the first run
        fails on a CPU-side provider (OpenVINO compiles lazily, and some graphs it cannot run)."""
        self.name, self.session, self.fallback = name, session, fallback
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_names = {o.name for o in session.get_outputs()}
        self.types = {v.name: _ORT_TYPES.get(v.type, v.type) for v in (*session.get_inputs(), *session.get_outputs())}
        self.cuda_graphs = cuda_graphs
        self.graph_ids: dict[tuple, object] = {}  # call (names, addresses, shapes) -> its RunOptions
        self.captured = 0  # graph ids given out (1, 2, ...; 0 is ONNX Runtime's own)

    def dtype(self, tensor: str) -> str | None:
        return self.types.get(tensor)

    def run(self, inputs: Mapping[str, np.ndarray | OrtArray], outputs: Mapping[str, np.ndarray | OrtArray]) -> None:
        if set(inputs) != self.input_names or set(outputs) != self.output_names:
            raise AssertionError(f"{self.name}: bound {sorted(inputs)} -> {sorted(outputs)}, graph has "
                                 f"{sorted(self.input_names)} -> {sorted(self.output_names)}")
        binding = self.session.io_binding()
        for name, arr in inputs.items():
            binding.bind_input(name, *_binding_args(arr, name))
        for name, arr in outputs.items():
            binding.bind_output(name, *_binding_args(arr, name))
        options = self._run_options(inputs, outputs) if self.cuda_graphs else None
        try:
            self.session.run_with_iobinding(binding, options)
        except Exception as e:  # ONNX Runtime raises its own RuntimeError types
            if self.fallback is None:
                raise VareditError(f"graph {self.name}: ONNX Runtime failed to run it ({short_error(e)})") from None
            self.session, self.fallback = self.fallback(short_error(e)), None
            self.run(inputs, outputs)  # every output is written again; the inputs are only read
        self.fallback = None  # a graph that ran once keeps its providers

    def _run_options(self, inputs: Mapping, outputs: Mapping):
        """The RunOptions of this call: its own CUDA graph id (a captured graph replays fixed shapes at
        fixed addresses), or -1 (no capture) once MAX_CUDA_GRAPHS calls have one."""
        key = tuple((name, _address(arr), tuple(arr.shape)) for name, arr in (*inputs.items(), *outputs.items()))
        options = self.graph_ids.get(key)
        if options is None:
            options = _ort().RunOptions()
            if self.captured < MAX_CUDA_GRAPHS:
                self.captured += 1
                options.add_run_config_entry("gpu_graph_id", str(self.captured))
            else:
                options.add_run_config_entry("gpu_graph_id", "-1")
            self.graph_ids[key] = options
        return options


class _CudaGraphRefused(Exception):
    """A provider refused CUDA graphs for a session (some of its nodes run off the GPU, or control flow)."""


class _LoadFailed(Exception):
    """ONNX Runtime could not create a session; the message is why, in short."""


def _address(arr: np.ndarray | OrtArray) -> int:
    return arr.ptr if isinstance(arr, OrtArray) else arr.ctypes.data


def _binding_args(arr: np.ndarray | OrtArray, name: str) -> tuple:
    """(device type, device id, element type, shape, address) of a buffer, for IOBinding.bind_*."""
    if isinstance(arr, OrtArray):
        return arr.memory.device, arr.memory.device_id, element_type(arr.dtype), arr.shape, arr.ptr
    if not arr.flags.c_contiguous:
        raise AssertionError(f"{name}: array is not C-contiguous; it cannot be bound in place")
    return "cpu", 0, element_type(arr.dtype), arr.shape, arr.ctypes.data


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, providers: Sequence[str | ProviderSpec | tuple] | None = None,
                 threads: int = 0, session_config: Mapping[str, str] | None = None,
                 device_buffers: bool | None = None, memory_arena: bool = True, priority_order: bool = False):
        """`providers`: execution providers in order of preference (runtime/providers.py), default the
        CPU provider; `session_config`: ONNX Runtime session config entries, e.g.
        {"session.disable_prepacking": "1"} (weights stay memory-mapped from the artifact instead of
        repacked into process memory: faster to load, and no copy, but the small scales run slower:
        benchmarks/RESULTS.md); `device_buffers`: hold the loop's buffers as ONNX Runtime allocations
        (default: with the CUDA providers, on their GPU; True with the CPU-side ones: on the CPU);
        `memory_arena=False`: every activation returned to the system after each run (a few runs of
        large graphs, as export's checks: the arena keeps its largest size, and grows from run to run);
        `priority_order`: nodes run in ONNX Runtime's priority-based order, about as listed, instead of its
        default depth-first one, which runs a graph's side branches (measurements of its tensors) last
        and so keeps every tensor they read alive until the end."""
        super().__init__(manifest)
        ort = _ort()
        specs = parse_providers(providers)
        check_graphs(specs, manifest)
        self.providers: Resolved = resolve(specs)
        self.threads, self.memory_arena, self.priority_order = threads, memory_arena, priority_order
        # One session per graph: idle pools must not spin, or they steal the cores of the one running.
        self.session_config = {"session.intra_op.allow_spinning": "0", **(session_config or {})}
        self.memory = None
        if self.providers.on_cuda:
            spec = next(s for s in self.providers.specs if s.kind.on_cuda)
            device = self.providers.devices.get(spec.name, [None])[0]
            self.memory = OrtMemory("cuda", self.providers.device_id,
                                    device.memory_info(ort.OrtDeviceMemoryType.DEFAULT) if device is not None else None)
        elif device_buffers:
            self.memory = OrtMemory("cpu")
        self.notes: list[str] = []  # what the providers declined, per graph (CUDA graphs, whole graphs)

    def describe(self) -> str:
        """The providers and where the buffers live, for logs and the CLI."""
        where = "host memory" if self.memory is None else f"{self.memory.device}:{self.memory.device_id} memory"
        return f"onnxruntime with {', '.join(str(s) for s in self.providers.specs)} (buffers in {where})"

    def _load(self, name: str) -> GraphRunner:
        if "plugin" in self.manifest.graphs[name]:
            raise ArtifactError(f"graph {name} of artifact {self.manifest.folder} holds TensorRT plugin nodes "
                                "(export --attention plugin), which ONNX Runtime cannot run; use a TensorRT backend, "
                                "or export the artifact again without --attention plugin")
        return self.session_for(name, self.manifest.graph_path(name))

    def session_for(self, name: str, path: Path, weights_folder: Path | None = None) -> OrtGraph:
        """A runner of graph `name` from the ONNX file `path`, with this backend's session options
        and providers (calibration runs quantised variants of a graph beside the artifact's own).
        `weights_folder`: where its external weights are, if not beside it (instrumented copies read
        the artifact's).
        Where a provider declines CUDA graphs for it, it runs without; where a CPU-side provider
        (OpenVINO) cannot load or run it, it runs on the CPU provider; `notes` says so."""
        cuda_graphs = self.providers.cuda_graphs
        try:
            try:
                session = self._session(name, path, self.providers, cuda_graphs, weights_folder)
            except _CudaGraphRefused:
                self.notes.append(f"{name}: no CUDA graphs (the provider runs part of it elsewhere)")
                cuda_graphs, session = False, self._session(name, path, self.providers, False, weights_folder)
        except _LoadFailed as e:
            if not self._can_fall_back(name):
                raise ArtifactError(f"graph {path} cannot be loaded by ONNX Runtime with "
                                    f"{', '.join(str(s) for s in self.providers.for_graph(name))} ({e})") from None
            return OrtGraph(name, self._on_cpu(name, path, str(e), weights_folder))
        fallback = ((lambda reason: self._on_cpu(name, path, reason, weights_folder)) if self._can_fall_back(name)
                    else None)
        return OrtGraph(name, session, cuda_graphs, fallback)

    def _can_fall_back(self, name: str) -> bool:
        return not self.providers.on_cuda and any(s.name != "cpu" for s in self.providers.for_graph(name))

    def _on_cpu(self, name: str, path: Path, reason: str, weights_folder: Path | None = None):
        """A CPU-provider session of graph `name`, noting why the providers asked for did not take it."""
        hint = ("; export with --attention decomposed to run it there" if "Attention" in self.manifest.graphs[name]["ops"]
                and "Attention" in reason else "")
        asked = ", ".join(s.name for s in self.providers.for_graph(name))
        self.notes.append(f"{name}: runs on the CPU provider ({asked} declined it: {reason}{hint})")
        try:
            return self._session(name, path, resolve(parse_providers(["cpu"])), False, weights_folder)
        except _LoadFailed as e:
            raise ArtifactError(f"graph {path} cannot be loaded by ONNX Runtime ({e})") from None

    def _session(self, name: str, path: Path, providers: Resolved, cuda_graphs: bool,
                 weights_folder: Path | None = None):
        ort = _ort()
        options, model = self._session_options(), str(path)
        if weights_folder is not None:  # a graph read from bytes finds its external data there
            model = path.read_bytes()
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_folder))
        listed = providers.configure(options, self.manifest, name, cuda_graphs)
        try:
            session = ort.InferenceSession(model, options, providers=listed,
                                           disabled_optimizers=disabled_optimizers(self.manifest.graphs[name]["ops"]))
        except Exception as e:
            if cuda_graphs and _NO_CUDA_GRAPH.search(str(e)):
                raise _CudaGraphRefused() from None
            raise _LoadFailed(short_error(e)) from None
        wanted = {s.kind.ep_name for s in providers.for_graph(name)}
        # By name, ONNX Runtime retries on its CPU provider alone when a provider fails to start, with a warning only.
        if not providers.plugin and not wanted & set(session.get_providers()):
            raise VareditError(f"graph {name}: ONNX Runtime ran it on {session.get_providers()}, not on "
                               f"{sorted(wanted)} as asked (the provider failed to start; ONNX Runtime's log says why)")
        return session

    def _session_options(self):
        """Fresh session options for one session: providers are added per session (their options,
        TensorRT profiles and caches among them, differ by graph)."""
        options = _ort().SessionOptions()
        options.intra_op_num_threads = self.threads
        options.enable_cpu_mem_arena = self.memory_arena
        if self.priority_order:
            options.execution_order = _ort().ExecutionOrder.PRIORITY_BASED
        options.log_severity_level = 3
        for key, value in self.session_config.items():
            options.add_session_config_entry(key, value)
        return options

    # ---------------------------------------------------------------- buffers
    def empty(self, shape: tuple[int, ...], dtype: str):
        if self.memory is None:
            return super().empty(shape, dtype)
        return self.memory.empty(tuple(shape), host_dtype(dtype))

    def write(self, dst, src: np.ndarray) -> None:
        if isinstance(dst, OrtArray):
            dst.memory.write(dst, src)
        else:
            super().write(dst, src)

    def read_all(self, buffers) -> list[np.ndarray]:
        return [b.memory.read(b) if isinstance(b, OrtArray) else np.array(b, copy=True) for b in buffers]
