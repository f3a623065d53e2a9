"""The interface every backend implements; the scale loop knows nothing else about them.

A backend allocates the loop's buffers where its graphs run (host memory for ONNX Runtime on
the CPU, device memory for TensorRT), and runs one graph with inputs read in place and
outputs written into buffers the caller preallocated (views into the KV cache included), so
nothing is allocated or copied per step. `write`/`read` are the only host transfers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from ..artifact import Manifest
from ..errors import ConfigError


class GraphRunner(ABC):
    name: str

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Run once, reading `inputs` and writing every array of `outputs` in place."""


class Backend(ABC):
    name: str

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self._graphs: dict[str, GraphRunner] = {}

    def graph(self, name: str) -> GraphRunner:
        """The runner of graph `name`, loaded on first use."""
        if name not in self._graphs:
            self._graphs[name] = self._load(name)
        return self._graphs[name]

    @abstractmethod
    def _load(self, name: str) -> GraphRunner: ...

    def release(self, name: str) -> None:
        """Free graph `name` (its weights and buffers); the next use loads it again."""
        self._graphs.pop(name, None)

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A buffer the graphs can read and write in place; axis-0 slices stay contiguous views."""
        return np.empty(shape, dtype)

    def write(self, dst, src: np.ndarray) -> None:
        """Copy host data into a buffer (or a view of one)."""
        np.copyto(dst, src, casting="same_kind")

    def read(self, src) -> np.ndarray:
        """A host copy of a buffer."""
        return np.array(src, copy=True)

    def close(self) -> None:
        self._graphs.clear()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_backend(name: str, manifest: Manifest, **options) -> Backend:
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, **options)
    if name in ("tensorrt", "tensorrt-rtx"):
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(manifest, flavour=name, **options)
    raise ConfigError(f"unknown backend {name!r}; available: onnxruntime, tensorrt, tensorrt-rtx")
