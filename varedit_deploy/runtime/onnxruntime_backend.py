"""ONNX Runtime backend: one session per graph, IO binding straight onto the caller's arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..artifact import Manifest
from ..errors import ArtifactError, require
from .backend import Backend, GraphRunner


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


class OrtGraph(GraphRunner):
    def __init__(self, name: str, session):
        self.name, self.session = name, session
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_names = {o.name for o in session.get_outputs()}
        self.types = {v.name: _ORT_TYPES.get(v.type, v.type) for v in (*session.get_inputs(), *session.get_outputs())}

    def dtype(self, tensor: str) -> str | None:
        return self.types.get(tensor)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        if set(inputs) != self.input_names or set(outputs) != self.output_names:
            raise AssertionError(f"{self.name}: bound {sorted(inputs)} -> {sorted(outputs)}, graph has "
                                 f"{sorted(self.input_names)} -> {sorted(self.output_names)}")
        binding = self.session.io_binding()
        for name, arr in inputs.items():
            binding.bind_input(name, "cpu", 0, arr.dtype.type, arr.shape, _pointer(arr, name))
        for name, arr in outputs.items():
            binding.bind_output(name, "cpu", 0, arr.dtype.type, arr.shape, _pointer(arr, name))
        self.session.run_with_iobinding(binding)


def _pointer(arr: np.ndarray, name: str) -> int:
    if not arr.flags.c_contiguous:
        raise AssertionError(f"{name}: array is not C-contiguous; it cannot be bound in place")
    return arr.ctypes.data


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, providers: Sequence[str] | None = None, threads: int = 0,
                 session_config: Mapping[str, str] | None = None, memory_arena: bool = True):
        """`session_config`: ONNX Runtime session config entries, e.g. {"session.disable_prepacking": "1"}
        (weights stay memory-mapped from the artifact instead of repacked into process memory:
        faster to load, and no copy, but the small scales run slower: benchmarks/RESULTS.md).
        `memory_arena=False`: every activation returned to the system after each run (a few runs of
        large graphs, as export's checks: the arena keeps its largest size, and grows from run to run)."""
        super().__init__(manifest)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.threads, self.memory_arena = threads, memory_arena
        # One session per graph: idle pools must not spin, or they steal the cores of the one running.
        self.session_config = {"session.intra_op.allow_spinning": "0", **(session_config or {})}

    def _options(self, extra: Mapping[str, str] | None = None):
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.enable_cpu_mem_arena = self.memory_arena
        options.log_severity_level = 3
        for key, value in {**self.session_config, **(extra or {})}.items():
            options.add_session_config_entry(key, value)
        return options

    def _load(self, name: str) -> GraphRunner:
        if "plugin" in self.manifest.graphs[name]:
            raise ArtifactError(f"graph {name} of artifact {self.manifest.folder} holds TensorRT plugin nodes "
                                "(export --attention plugin), which ONNX Runtime cannot run; use a TensorRT backend, "
                                "or export the artifact again without --attention plugin")
        return self.session_for(name, self.manifest.graph_path(name))

    def session_for(self, name: str, path: Path, weights_folder: Path | None = None) -> OrtGraph:
        """A runner of graph `name` from the ONNX file `path`, with this backend's session options
        (calibration runs quantised variants of a graph beside the artifact's own). `weights_folder`:
        where its external weights are, if not beside it (instrumented copies read the artifact's)."""
        ort = _ort()
        model, extra = str(path), None
        if weights_folder is not None:
            model = path.read_bytes()
            extra = {"session.model_external_initializers_file_folder_path": str(weights_folder)}
        try:
            session = ort.InferenceSession(model, self._options(extra), providers=self.providers,
                                           disabled_optimizers=disabled_optimizers(self.manifest.graphs[name]["ops"]))
        except Exception as e:
            raise ArtifactError(f"graph {path} cannot be loaded by ONNX Runtime ({e})") from None
        return OrtGraph(name, session)
