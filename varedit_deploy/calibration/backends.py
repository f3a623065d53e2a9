"""Backends that wrap another backend: one records every graph call's inputs, one swaps graphs.

Calibration must not know the scale loop's internals (which graphs it runs, in what order, with
which caches): it wraps the backend's graph runners, so whatever the loop runs is recorded with
its real inputs, past KV caches included. Samples are copies, bounded per graph and per input
shape (for `step` and `sample` each scale has its own shapes, so every scale is represented).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.backend import Backend, GraphRunner
from ..runtime.onnxruntime_backend import OnnxRuntimeBackend

Sample = dict[str, np.ndarray]


class DelegatingBackend(Backend):
    """Buffers, transfers, synchronisation and timing are the inner backend's; subclasses decide
    what each graph runs."""

    def __init__(self, inner: Backend):
        super().__init__(inner.manifest)
        self.inner, self.name, self.compute_dtype = inner, inner.name, inner.compute_dtype

    def _load(self, name: str) -> GraphRunner:
        return self.inner.graph(name)

    def empty(self, shape, dtype):
        return self.inner.empty(shape, dtype)

    def write(self, dst, src) -> None:
        self.inner.write(dst, src)

    def read_all(self, buffers) -> list[np.ndarray]:
        return self.inner.read_all(buffers)

    def read(self, src) -> np.ndarray:
        return self.inner.read(src)

    def mark(self) -> object:
        return self.inner.mark()

    def seconds(self, start, end) -> float:
        return self.inner.seconds(start, end)

    def close(self) -> None:
        self._graphs.clear()
        self.inner.close()


@dataclass
class Recording:
    """Input samples per graph: at most `per_shape` per distinct input shapes, `per_graph` in all, and
    `bytes_per_graph` of copies (a release model's late scales carry GBs of past KV per call)."""

    per_shape: int = 8
    per_graph: int = 64
    bytes_per_graph: int = 2 * 2**30
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    _counts: dict[tuple, int] = field(default_factory=dict)
    _bytes: dict[str, int] = field(default_factory=dict)

    def wants(self, graph: str, inputs: Mapping[str, np.ndarray]) -> bool:
        key = (graph, tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items())))
        size = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in inputs.values())
        if (self._counts.get(key, 0) >= self.per_shape or len(self.samples.get(graph, ())) >= self.per_graph
                or self._bytes.get(graph, 0) + size > self.bytes_per_graph):
            return False
        self._counts[key] = self._counts.get(key, 0) + 1
        self._bytes[graph] = self._bytes.get(graph, 0) + size
        return True

    def add(self, graph: str, sample: Sample) -> None:
        self.samples.setdefault(graph, []).append(sample)

    def shapes(self, graph: str) -> int:
        """How many distinct input shapes `graph` was recorded with (the step: one per scale)."""
        return len({key for key in self._counts if key[0] == graph})


class _RecordingRunner(GraphRunner):
    def __init__(self, inner: GraphRunner, backend: Backend, recording: Recording):
        self.inner, self.name, self.backend, self.recording = inner, inner.name, backend, recording

    def dtype(self, tensor: str) -> str | None:
        return self.inner.dtype(tensor)

    def run(self, inputs, outputs) -> None:
        if self.recording.wants(self.name, inputs):
            self.recording.add(self.name, {k: self.backend.read(v) for k, v in inputs.items()})
        self.inner.run(inputs, outputs)


class RecordingBackend(DelegatingBackend):
    def __init__(self, inner: Backend, recording: Recording):
        super().__init__(inner)
        self.recording = recording

    def _load(self, name: str) -> GraphRunner:
        return _RecordingRunner(self.inner.graph(name), self.inner, self.recording)


class SwappedBackend(DelegatingBackend):
    """The inner ONNX Runtime backend, except that the graphs in `swaps` run other ONNX files
    (a quantised variant of `step`, say) in sessions of the same options, each wrapped by `wrap`
    where given (what records its statistics, say). `artifact_weights`: the swapped files read their
    external weights from the artifact's graph folder (copies that change the graph, not its weights)."""

    def __init__(self, inner: OnnxRuntimeBackend, swaps: Mapping[str, Path],
                 wrap: Callable[[str, GraphRunner], GraphRunner] | None = None, artifact_weights: bool = False):
        super().__init__(inner)
        self.swaps, self.wrap, self.artifact_weights = dict(swaps), wrap, artifact_weights
        self._own: list[GraphRunner] = []

    def _load(self, name: str) -> GraphRunner:
        if name not in self.swaps:
            return self.inner.graph(name)
        folder = self.inner.manifest.graph_path(name).parent if self.artifact_weights else None
        runner = self.inner.session_for(name, self.swaps[name], folder)
        self._own.append(runner)
        return self.wrap(name, runner) if self.wrap is not None else runner

    def close(self) -> None:
        """Release the swapped sessions only; the inner backend is shared and stays loaded."""
        for runner in self._own:
            runner.close()
        self._own.clear()
        self._graphs.clear()
