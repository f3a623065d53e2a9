"""The Python API: `EditPipeline.from_artifacts(ART).edit(image, instruction, cfg=, tau=, seed=)`.

Split by lifetime like onnxruntime-genai: the pipeline (graphs, buffers) is loaded once; each
`edit` takes its own sampling options and noise. An edit queues every graph and reads back once
at the end (the image, plus bits and guided logits when `record=True`): on a device backend that
is one host synchronisation per edit. Imports only numpy, Pillow and the backend.
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
    def __init__(self, manifest: Manifest, backend: Backend, tokenizer=None):
        self.manifest, self.backend = manifest, backend
        self.config: ModelConfig = manifest.config
        for name in manifest.graphs:  # load everything now: fail at load time, not mid-edit
            backend.graph(name)
        self.loop = ScaleLoop(manifest, backend)
        self._pixels = self._image = self._ids = None
        token_file = manifest.tokenizer_file
        self.tokenizer = tokenizer or (Tokenizer(token_file) if token_file is not None else None)

    @classmethod
    def from_artifacts(cls, folder: str | Path, backend: str = "onnxruntime", verify: bool = True,
                       **backend_options) -> "EditPipeline":
        manifest = read_manifest(folder, verify=verify)
        return cls(manifest, make_backend(backend, manifest, **backend_options))

    @classmethod
    def from_model(cls, model, device: str = "cuda", dtype=None, cuda_graphs: bool | None = None) -> "EditPipeline":
        """The torch fast path on a loaded `VAREditModel` (bf16 blocks, fused kernels, CUDA graphs)."""
        import torch

        from ..export.artifacts import schedule_record
        from .torch_backend import TorchBackend

        names = ["text_cond", "vae_encoder", "vae_decoder", "source_pass", "step", "sample",
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
        if self._ids is None:  # one buffer for every instruction: its address never changes
            self._ids = self.backend.empty((self.config.transformer.text_maxlen,), "int64")
        ids_buffer = self._ids[:ids.shape[1]].reshape(ids.shape)
        self.backend.write(ids_buffer, ids)
        self.backend.graph("text_encoder").run({"input_ids": ids_buffer}, {"text_features": features})
        return features

    def encode_image(self, pixels: np.ndarray):
        """[1, 3, S, S] in [-1, 1] -> the loop's source prefix buffer [1, L_src, d_tok]."""
        size = self.config.image_size
        if pixels.shape != (1, 3, size, size):
            raise InputError(f"image tensor must be [1, 3, {size}, {size}], got {list(pixels.shape)}")
        if self._pixels is None:
            self._pixels = self.backend.empty((1, 3, size, size), "float32")
        self.backend.write(self._pixels, pixels)
        self.backend.graph("vae_encoder").run({"image": self._pixels}, {"source_prefix": self.loop.prefix})
        return self.loop.prefix

    def _decode(self, summed):
        """Queue the VAE decoder: summed codes (a loop buffer) -> the image buffer [1, 3, S, S]."""
        size = self.config.image_size
        if self._image is None:
            self._image = self.backend.empty((1, 3, size, size), "float32")
        self.backend.graph("vae_decoder").run({"summed_codes": summed}, {"image": self._image})
        return self._image

    def decode(self, summed) -> np.ndarray:
        """Summed codes (a loop buffer) -> image [1, 3, S, S] on the host."""
        return self.backend.read(self._decode(summed))

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
        record: bool = False,
    ) -> EditResult:
        """Edit `image` by `instruction`; keyword overrides apply on top of `sampling`. With `record`,
        `result.loop` also holds every scale's bits and guided logits (read back with the image)."""
        sampling = sampling or self.config.sampling
        overrides = {k: v for k, v in (("cfg", cfg), ("tau", tau), ("seed", seed)) if v is not None}
        sampling = dataclasses.replace(sampling, **overrides)
        noise_source = make_noise(noise, sampling.seed) if isinstance(noise, str) else noise
        img = as_rgb(image)
        mark = self.backend.mark
        t0 = time.perf_counter()
        m0 = mark()
        features = self.encode_text(instruction)
        m1 = mark()
        prefix = self.encode_image(preprocess(img, self.config.image_size))
        m2 = mark()
        loop = self.loop.run(features, prefix, SamplerInputs.from_params(sampling), noise_source)
        m3 = mark()
        image_buffer = self._decode(loop.summed)
        m4 = mark()
        loop.marks += [("text_encoder", m0, m1), ("vae_encoder", m1, m2), ("transformer", m2, m3),
                       ("vae_decoder", m3, m4)]
        (pixels,) = self.loop.collect(loop, [image_buffer], record=record)
        result = postprocess(pixels, img.size)
        timings = {k: loop.timings[k] for k in ("text_encoder", "vae_encoder", "transformer", "vae_decoder")}
        timings.update((k, v) for k, v in loop.timings.items() if k not in timings)
        timings["total"] = time.perf_counter() - t0  # wall clock: host work, transfers and the wait included
        return EditResult(result, timings, loop)

    def close(self) -> None:
        self.backend.close()
