"""What one server holds: its options, the loaded pipelines, the scheduler and metrics, ready/draining.

`load` builds one pipeline per worker (device), fits the preview projection where the artifact
has none (bf16 graphs: a few VAE runs on the worker's own backend), warms each with a real edit
(sessions, first-run allocations), then starts the scheduler; until it finishes /ready answers 503.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from PIL import Image

from ..artifact import read_manifest
from ..config import SamplingConfig
from ..runtime.pipeline import EditPipeline
from ..runtime.preview import MAX_PREVIEWS, preview_scales
from ..runtime.registry import ARTIFACT_BACKENDS
from .metrics import Metrics
from .options import ServeOptions
from .scheduler import Scheduler

log = logging.getLogger("varedit_deploy.serve")


class ServerState:
    def __init__(self, options: ServeOptions):
        self.options = options
        self.manifest = read_manifest(options.artifacts)  # a bad folder fails here, before the port is bound
        config = self.manifest.config
        sched = config.schedule
        self.model_id = options.model_name or f"varedit-{config.name}"
        self.default_sampling: SamplingConfig = config.sampling
        self.num_scales = sched.num_scales
        self.image_tokens, self.output_tokens = sched.source_tokens, sched.total_tokens
        self.created = int(time.time())
        self.pipelines: list[EditPipeline] = []
        self.scheduler: Scheduler | None = None
        self.metrics: Metrics | None = None
        self.tokenizer = None
        self.ready = self.draining = False

    def sampling(self, cfg: float | None, tau: float | None, seed: int) -> SamplingConfig:
        updates = {k: v for k, v in (("cfg", cfg), ("tau", tau)) if v is not None}
        return dataclasses.replace(self.default_sampling, seed=seed, **updates)

    def load(self) -> None:
        """Build, warm and start; raises VareditError for an artifact that cannot serve edits."""
        o = self.options
        # TensorRT: worker i owns GPU i (ONNX Runtime: CPU workers); an unknown name fails in from_artifacts
        per_device = o.backend in ARTIFACT_BACKENDS and ARTIFACT_BACKENDS[o.backend].on_gpu
        for device in range(o.workers):
            t0 = time.perf_counter()
            if per_device:
                use_device(device)
            options = {"providers": worker_providers(o.providers, device)} if o.providers else {}
            pipe = EditPipeline.from_artifacts(o.artifacts, backend=o.backend, text_cache_bytes=o.text_cache_bytes,
                                               image_cache_bytes=o.image_cache_bytes, **options)
            self.pipelines.append(pipe)
            if pipe.preview is None:
                report = pipe.fit_preview()
                log.info("worker %d: the artifact has no preview projection; fitted one (fit PSNR %.1f dB)", device,
                         report["fit_psnr_db"])
            _warm(pipe)
            log.info("worker %d: %s on %s, tokenizer %s, loaded and warmed in %.1f s", device, self.model_id,
                     pipe.backend.describe(), pipe.tokenizer.source if pipe.tokenizer else "none",
                     time.perf_counter() - t0)
        self.tokenizer = self.pipelines[0].tokenizer
        self.metrics = Metrics(self.pipelines)
        self.scheduler = Scheduler(self.pipelines, o.max_batch, o.max_queue, o.batch_window_ms / 1e3, self.metrics,
                                   worker_init=use_device if per_device else None)
        self.metrics.bind(self.scheduler)
        self.ready = True

    def drain(self) -> None:
        """Refuse new edits from now on (SIGTERM); queued and running edits still finish."""
        self.draining = True

    def close(self, cancel: bool = False) -> None:
        """Finish the queued edits, or (`cancel`: a forced exit) cancel them, then release the pipelines."""
        if self.scheduler is not None:
            self.scheduler.close(cancel=cancel)
        for pipe in self.pipelines:
            pipe.close()


def worker_providers(providers, device: int) -> list:
    """ONNX Runtime providers for worker `device`: a CUDA provider without a device_id runs on GPU `device`."""
    from dataclasses import replace

    from ..runtime.providers import parse_providers

    return [replace(s, options={**s.options, "device_id": str(device)})
            if s.kind.on_cuda and "device_id" not in s.options else s for s in parse_providers(providers)]


def use_device(index: int) -> None:
    """Make GPU `index` this thread's current CUDA device (buffers and engines are created on it)."""
    from ..runtime.gpu import check, cudart

    check(cudart().cudaSetDevice(index))


def _warm(pipe: EditPipeline) -> None:
    """One real edit with previews on a small synthetic photo."""
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    photo = Image.fromarray(np.stack([ramp[None, :].repeat(48, 0), ramp[:48, None].repeat(64, 1),
                                      np.full((48, 64), 128.0)], axis=2).astype(np.uint8))
    scales = set(preview_scales(pipe.config.schedule.num_scales, MAX_PREVIEWS))

    def previews(scale: int, summed) -> None:
        if scale in scales:
            pipe.preview_image(summed, photo.size)

    pipe.edit(photo, "warm up", on_scale=previews)
