"""Every backend by name, in one table: what the CLI, the server, parity and the API choose from.

Artifact backends run an exported artifact's graphs (`EditPipeline.from_artifacts(..., backend=)`);
their modules are imported only when chosen, so ONNX Runtime users never import TensorRT. Model
backends run a loaded PyTorch model: the eager reference, and the torch fast path
(`EditPipeline.from_model`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from ..artifact import Manifest
from ..errors import ConfigError
from .backend import Backend


@dataclass(frozen=True)
class ArtifactBackend:
    module: str  # where the Backend subclass lives
    cls: str
    on_gpu: bool  # its buffers live on the current CUDA device (a server gives each worker its own GPU)
    options: dict[str, Any] = field(default_factory=dict)  # fixed constructor options


ARTIFACT_BACKENDS: dict[str, ArtifactBackend] = {
    "onnxruntime": ArtifactBackend("varedit_deploy.runtime.onnxruntime_backend", "OnnxRuntimeBackend", False),
    "tensorrt": ArtifactBackend("varedit_deploy.runtime.tensorrt_backend", "TensorRTBackend", True,
                                {"flavour": "tensorrt"}),
    "tensorrt-rtx": ArtifactBackend("varedit_deploy.runtime.tensorrt_backend", "TensorRTBackend", True,
                                    {"flavour": "tensorrt-rtx"}),
}
DEFAULT_ARTIFACT_BACKEND = "onnxruntime"
# Run on a loaded model rather than an artifact: the eager PyTorch reference, and the fast path.
MODEL_BACKENDS = {"torch": "the PyTorch reference, eager, in the official order of work",
                  "torch-fast": "the torch fast path: preallocated caches, fused Triton kernels, CUDA graphs"}


def make_backend(name: str, manifest: Manifest, **options: Any) -> Backend:
    """The artifact backend `name` over `manifest`, with `options` for its constructor."""
    entry = ARTIFACT_BACKENDS.get(name)
    if entry is None:
        raise ConfigError(f"unknown backend {name!r}; available: {', '.join(ARTIFACT_BACKENDS)}")
    backend_class = getattr(importlib.import_module(entry.module), entry.cls)
    return backend_class(manifest, **entry.options, **options)
