"""The interface every backend implements; the scale loop knows nothing else about them.

A backend loads the graphs of an artifact and runs one graph on host arrays: inputs are
read in place, outputs are written into arrays the caller preallocated (views into the KV
cache included), so no backend allocates or copies per step on the caller's behalf.
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
    raise ConfigError(f"unknown backend {name!r}; available: onnxruntime")
