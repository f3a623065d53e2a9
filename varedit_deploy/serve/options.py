"""Every server setting and its default, in one place (the CLI passes only what was typed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.registry import DEFAULT_ARTIFACT_BACKEND


@dataclass(frozen=True)
class ServeOptions:
    artifacts: str
    backend: str = DEFAULT_ARTIFACT_BACKEND  # a name of runtime/registry.py
    providers: tuple = ()  # ONNX Runtime's execution providers (runtime/providers.py); none: cpu
    host: str = "127.0.0.1"  # loopback unless asked: put a gateway with TLS in front for anything else
    port: int = 8000
    api_key: str | None = None  # bearer key for /v1/*; None: no authentication
    model_name: str | None = None  # the id in /v1/models; default varedit-<model preset>
    workers: int = 1  # pipelines, one per device (TensorRT: device i for worker i)
    max_batch: int = 1  # edits handed to one edit_batch call
    batch_window_ms: float = 5.0  # how long a worker waits for a batch to fill
    max_queue: int = 64  # edits waiting; beyond it: 429 with Retry-After
    timeout_s: float = 300.0  # per-request deadline from arrival; beyond it: 504
    max_upload_bytes: int = 20 * 2**20  # whole request body; beyond it: 413
    max_pixels: int = 4096 * 4096  # source image width x height, checked before decoding; beyond it: 413
    max_output_side: int = 4096  # the `size` field's largest side
    text_cache_bytes: int = 64 * 2**20  # T5 features by instruction
    image_cache_bytes: int = 64 * 2**20  # VAE-encoder prefixes by photo content
    cors_origins: tuple[str, ...] = field(default_factory=tuple)  # none: no CORS headers at all
    ui: bool = True  # the playground page at GET / (serve/page.py)
