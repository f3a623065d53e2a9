"""The interface every backend implements; the scale loop knows nothing else about them.

A backend allocates the loop's buffers where its graphs run (host memory for ONNX Runtime on
the CPU, device memory for TensorRT and torch), and runs one graph with inputs read in place and
outputs written into buffers the caller preallocated (views into the KV cache included), so
nothing is allocated or copied per step. `write` and `read_all` are the only host transfers:
`write` returns at once (a device backend stages the source and copies it asynchronously), and
`read_all` is the one host synchronisation, however many buffers it reads. `mark` records a
point in the backend's stream of work (a host clock here, a CUDA event on device backends) and
`seconds` measures between two marks once a later `read_all` has returned.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from ..artifact import Manifest
from ..errors import require


class GraphRunner(ABC):
    name: str

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Run once, reading `inputs` and writing every array of `outputs` in place."""

    def dtype(self, tensor: str) -> str | None:
        """The element type the graph takes or gives `tensor` in, where the runner knows it."""
        return None

    def close(self) -> None:
        """Release what the runner holds beyond Python objects (device memory, contexts, CUDA graphs)."""


def host_dtype(name: str) -> np.dtype:
    """The numpy dtype of an element type name; bfloat16 through ml_dtypes (numpy has none)."""
    if name == "bfloat16":
        return np.dtype(require("ml_dtypes", "trt").bfloat16)
    return np.dtype(name)


class Backend(ABC):
    name: str
    # What the KV caches and text K/V are held in where the graphs do not say (the torch fast path).
    compute_dtype: str = "float32"

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self._graphs: dict[str, GraphRunner] = {}

    def describe(self) -> str:
        """What runs the graphs, in a few words, for logs and the CLI."""
        return self.name

    def graph(self, name: str) -> GraphRunner:
        """The runner of graph `name`, loaded on first use."""
        if name not in self._graphs:
            self._graphs[name] = self._load(name)
        return self._graphs[name]

    @abstractmethod
    def _load(self, name: str) -> GraphRunner: ...

    def release(self, name: str) -> None:
        """Free graph `name` (its weights and buffers); the next use loads it again."""
        runner = self._graphs.pop(name, None)
        if runner is not None:
            runner.close()

    def empty(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """A buffer the graphs can read and write in place; axis-0 slices stay contiguous views.
        `dtype` is an element type name ("float32", "float16", "bfloat16", "int64", "int8")."""
        return np.empty(shape, host_dtype(dtype))

    def tensor_dtype(self, graph: str, tensor: str) -> str:
        """The element type `graph` takes or gives for `tensor`, which the buffer bound to it must have:
        what the loaded graph says (an ONNX Runtime session, an engine), else the artifact's record of
        its graph files, else `compute_dtype` (the torch fast path's in-memory graphs)."""
        found = self.graph(graph).dtype(tensor)
        if found is not None:
            return found
        entry = self.manifest.graphs.get(graph, {})
        for spec in (*entry.get("inputs", ()), *entry.get("outputs", ())):
            if spec["name"] == tensor:
                return spec["dtype"]
        return self.compute_dtype

    def write(self, dst, src: np.ndarray) -> None:
        """Copy host data into a buffer (or a view of one); `src` may be reused at once."""
        np.copyto(dst, src, casting="same_kind")

    def read_all(self, buffers) -> list[np.ndarray]:
        """Host copies of the buffers, after every graph run so far has finished: one synchronisation."""
        return [np.array(b, copy=True) for b in buffers]

    def read(self, src) -> np.ndarray:
        """A host copy of one buffer (a synchronisation of its own: prefer one `read_all`)."""
        return self.read_all([src])[0]

    def mark(self) -> object:
        """A point in the backend's work, for timing; graphs here run synchronously, so the host clock."""
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Seconds between two marks (valid once a `read_all` issued after both has returned)."""
        return end - start

    def close(self) -> None:
        """Release every loaded graph; `with backend:` calls this on exit."""
        for runner in self._graphs.values():
            runner.close()
        self._graphs.clear()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
