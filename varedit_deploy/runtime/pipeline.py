"""The Python API: `EditPipeline.from_artifacts(ART).edit(image, instruction, cfg=, tau=, seed=)`.

Split by lifetime like onnxruntime-genai: the pipeline (graphs, buffers) is loaded once; each
`edit` takes its own sampling options and noise. Imports only numpy, Pillow and the backend.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..artifact import Manifest, read_manifest
from ..config import ModelConfig, SamplingConfig
from ..errors import ArtifactError, InputError
from ..imaging import as_rgb, postprocess, preprocess
from ..sampling import NoiseSource, SamplerInputs, make_noise
from .backend import Backend, make_backend
from .loop import LoopOutput, ScaleLoop
from .tokenizer import Tokenizer


@dataclass
class EditResult:
    image: Image.Image
    timings: dict[str, float]
    loop: LoopOutput


class EditPipeline:
    def __init__(self, manifest: Manifest, backend: Backend, tokenizer=None, keep_text_encoder: bool = True):
        """`keep_text_encoder=False` frees T5 after each encoding (it runs once per edit, before
        everything else): the memory peak is the larger phase instead of both together."""
        self.manifest, self.backend = manifest, backend
        self.config: ModelConfig = manifest.config
        self.keep_text_encoder = keep_text_encoder
        for name in manifest.graphs:  # load everything now: fail at load time, not mid-edit
            backend.graph(name)
        if not keep_text_encoder:
            backend.release("text_encoder")
        self.loop = ScaleLoop(manifest, backend)
        self._pixels = self._image = None
        token_file = manifest.tokenizer_file
        self.tokenizer = tokenizer or (Tokenizer(token_file) if token_file is not None else None)

    @classmethod
    def from_artifacts(cls, folder: str | Path, backend: str = "onnxruntime", verify: str = "quick",
                       keep_text_encoder: bool = True, **backend_options) -> "EditPipeline":
        """`verify`: "quick" (sizes; sha256 of small files and of large ones once, then stamped),
        "full" (every sha256 now), "size" or "none"."""
        manifest = read_manifest(folder, verify=verify)
        return cls(manifest, make_backend(backend, manifest, **backend_options), keep_text_encoder=keep_text_encoder)

    @classmethod
    def from_model(cls, model, device: str = "cuda", dtype=None, cuda_graphs: bool | None = None) -> "EditPipeline":
        """The torch fast path on a loaded `VAREditModel` (bf16 blocks, fused kernels, CUDA graphs)."""
        import torch

        from ..export.artifacts import schedule_record
        from .torch_backend import TorchBackend

        names = ["text_cond", "vae_encoder", "vae_decoder", "source_embed", "sar_pool", "step", "sample",
                 *[f"next_input_{s}" for s in range(model.config.schedule.num_scales)]]
        if model.text_encoder is not None:
            names.insert(0, "text_encoder")
        manifest = Manifest(Path(f"<{model.config.name} in memory>"), {
            "model": model.config.to_dict(), "schedule": schedule_record(model), "graphs": {n: {} for n in names}})
        backend = TorchBackend(manifest, model, device, dtype or torch.bfloat16, cuda_graphs)
        tokenizer = None
        if model.text_encoder is not None:
            encoder = model.text_encoder

            class _Tokenizer:
                def encode(self, text: str) -> np.ndarray:
                    return np.asarray([encoder.tokenize(text)], dtype=np.int64)

            tokenizer = _Tokenizer()
        return cls(manifest, backend, tokenizer)

    # ------------------------------------------------------------- stages
    def encode_text(self, instruction: str):
        """Instruction -> T5 features [1, Lt, Ct5], in the loop's text buffer for that length."""
        if self.tokenizer is None or not self.manifest.has_graph("text_encoder"):
            raise ArtifactError(f"artifact {self.manifest.folder} has no text encoder (it was exported from a "
                                "fixture, which has none); export a release or a --random-weights model to edit")
        ids = self.tokenizer.encode(instruction)
        features = self.loop.text_buffers(ids.shape[1])[0]
        ids_buffer = self.backend.empty(ids.shape, np.int64)
        self.backend.write(ids_buffer, ids)
        self.backend.graph("text_encoder").run({"input_ids": ids_buffer}, {"text_features": features})
        if not self.keep_text_encoder:
            self.backend.release("text_encoder")
        return features

    def encode_image(self, pixels: np.ndarray):
        """[1, 3, S, S] in [-1, 1] -> the loop's source prefix buffer [1, L_src, d_tok]."""
        size = self.config.image_size
        if pixels.shape != (1, 3, size, size):
            raise InputError(f"image tensor must be [1, 3, {size}, {size}], got {list(pixels.shape)}")
        if self._pixels is None:
            self._pixels = self.backend.empty((1, 3, size, size), np.float32)
        self.backend.write(self._pixels, pixels)
        self.backend.graph("vae_encoder").run({"image": self._pixels}, {"source_prefix": self.loop.prefix})
        return self.loop.prefix

    def decode(self, summed) -> np.ndarray:
        """Summed codes (a loop buffer) -> image [1, 3, S, S] on the host."""
        size = self.config.image_size
        if self._image is None:
            self._image = self.backend.empty((1, 3, size, size), np.float32)
        self.backend.graph("vae_decoder").run({"summed_codes": summed}, {"image": self._image})
        return self.backend.read(self._image)

    # --------------------------------------------------------------- edit
    def edit(
        self,
        image: Image.Image | np.ndarray,
        instruction: str,
        sampling: SamplingConfig | None = None,
        noise: str | NoiseSource = "numpy",
        *,
        cfg: float | None = None,
        tau: float | None = None,
        seed: int | None = None,
    ) -> EditResult:
        """Edit `image` by `instruction`; keyword overrides apply on top of `sampling`."""
        sampling = sampling or self.config.sampling
        overrides = {k: v for k, v in (("cfg", cfg), ("tau", tau), ("seed", seed)) if v is not None}
        sampling = dataclasses.replace(sampling, **overrides)
        noise_source = make_noise(noise, sampling.seed) if isinstance(noise, str) else noise
        img = as_rgb(image)
        t0 = time.perf_counter()
        features = self.encode_text(instruction)
        t1 = time.perf_counter()
        prefix = self.encode_image(preprocess(img, self.config.image_size))
        t2 = time.perf_counter()
        loop = self.loop.run(features, prefix, SamplerInputs.from_params(sampling), noise_source)
        t3 = time.perf_counter()
        result = postprocess(self.decode(loop.summed), img.size)
        t4 = time.perf_counter()
        timings = {"text_encoder": t1 - t0, "vae_encoder": t2 - t1, "transformer": t3 - t2, "vae_decoder": t4 - t3}
        timings.update(loop.timings)
        timings["total"] = t4 - t0
        return EditResult(result, timings, loop)

    def close(self) -> None:
        self.backend.close()
