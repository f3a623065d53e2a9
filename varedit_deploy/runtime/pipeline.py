"""The Python API: `EditPipeline.from_artifacts(ART).edit(image, instruction, cfg=, tau=, seed=)`.

Split by lifetime like onnxruntime-genai: the pipeline (graphs, buffers) is loaded once; each
`edit` takes its own sampling options and noise. An edit queues every graph and reads back once
at the end (the image, plus bits and guided logits when `record=True`): on a device backend that
is one host synchronisation per edit. Imports only numpy, Pillow and the backend.
`edit_batch` is the entry point of a server's scheduler; optional caches skip the text and
VAE encoders for instructions and photos seen before. `generate` is the same run for checks
and tools, in diffusers' `prompt_embeds=` style: precomputed text features or source prefix,
teacher-forced bits, the first scales only, everything read back as arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..artifact import Manifest, read_manifest, required_graphs, schedule_record
from ..config import ModelConfig, SamplingConfig
from ..errors import ArtifactError, InputError
from ..graph_io import StepIO
from ..imaging import as_rgb, postprocess, preprocess
from ..sampling import NoiseSource, SamplerInputs, make_noise
from ..timings import STAGES, ms_since
from .backend import Backend
from .loop import LoopOutput, ScaleHook, ScaleLoop
from .preview import PreviewProjection
from .preview_fit import fit_preview, load_preview
from .registry import DEFAULT_ARTIFACT_BACKEND, make_backend
from .stage_cache import StageCache
from .tokenizer import load_tokenizer


@dataclass
class EditResult:
    image: Image.Image
    timings_ms: dict[str, float]  # milliseconds per stage and part (varedit_deploy.timings)
    loop: LoopOutput


@dataclass
class Generation:
    """What `EditPipeline.generate` read back, host arrays all."""

    bits: list[np.ndarray]  # per scale run [1, n, d_tok]: sampled (or, teacher-forced, what the sampler drew)
    guided_logits: list[np.ndarray]  # per scale run [n * d_tok, 2]
    text_features: np.ndarray  # [1, Lt, Ct5]: what the loop was conditioned on
    source_prefix: np.ndarray  # [1, L_src, d_tok]
    summed: np.ndarray  # [1, d, H, W]: the summed codes after the scales run
    decoded: np.ndarray | None  # [1, 3, S, S] in [-1, 1]; None unless every scale ran and `decode`
    timings_ms: dict[str, float]


@dataclass
class EditRequest:
    """One item of `edit_batch`: the arguments of `edit`."""

    image: Image.Image | np.ndarray
    instruction: str
    sampling: SamplingConfig | None = None
    noise: str | NoiseSource = "numpy"
    on_scale: ScaleHook | None = None
    record: bool = False


class EditPipeline:
    def __init__(self, manifest: Manifest, backend: Backend, tokenizer=None, text_cache_bytes: int = 0,
                 image_cache_bytes: int = 0, keep_text_encoder: bool = True):
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
        self._pixels = self._image = self._ids = None
        # The artifact's tokenizer graph where onnxruntime-extensions is installed, else its tokenizer.json.
        self.tokenizer = tokenizer or load_tokenizer(manifest)
        self.text_cache, self.image_cache = StageCache(text_cache_bytes), StageCache(image_cache_bytes)
        # The latent-to-RGB map of `preview_image`: the artifact's, or None until `fit_preview`.
        self.preview: PreviewProjection | None = load_preview(manifest)

    @classmethod
    def from_artifacts(cls, folder: str | Path, backend: str = DEFAULT_ARTIFACT_BACKEND, verify: str = "quick",
                       text_cache_bytes: int = 0, image_cache_bytes: int = 0, keep_text_encoder: bool = True,
                       tokenizer: str = "auto", **backend_options) -> "EditPipeline":
        """`backend`: a name of runtime/registry.py's table; `verify`: "quick" (sizes; sha256 of small
        files and of large ones once, then stamped), "full" (every sha256 now), "size" or "none";
        `tokenizer`: "graph" (the artifact's tokenizer.onnx), "json" (tokenizer.json) or "auto" (the
        graph where onnxruntime-extensions is installed); `backend_options` go to the backend, e.g.
        `providers=["openvino:mode=exact"]` for ONNX Runtime (runtime/providers.py)."""
        manifest = read_manifest(folder, verify=verify)
        text_tokenizer = load_tokenizer(manifest, tokenizer)
        return cls(manifest, make_backend(backend, manifest, **backend_options), text_tokenizer,
                   text_cache_bytes=text_cache_bytes, image_cache_bytes=image_cache_bytes,
                   keep_text_encoder=keep_text_encoder)

    @classmethod
    def from_model(cls, model, device: str = "cuda", dtype=None, cuda_graphs: bool | None = None) -> "EditPipeline":
        """The torch fast path on a loaded `VAREditModel` (bf16 blocks, fused kernels, CUDA graphs)."""
        import torch

        from .torch_backend import TorchBackend

        names = required_graphs(model.config)
        if model.text_encoder is not None:
            names.insert(0, "text_encoder")
        dtype = dtype or torch.bfloat16
        manifest = Manifest(Path(f"<{model.config.name} in memory>"), {
            "model": model.config.to_dict(), "schedule": schedule_record(model.config), "graphs": {n: {} for n in names},
            "precision": {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype],
            "step_io": StepIO().to_json()})
        backend = TorchBackend(manifest, model, device, dtype, cuda_graphs)
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
        key = ids.tobytes()
        cached = self.text_cache.get(key) if self.text_cache.enabled else None
        if cached is not None:
            self.backend.write(features, cached)
            return features
        if self._ids is None:  # one buffer for every instruction: its address never changes
            self._ids = self.backend.empty((self.config.transformer.text_maxlen,), "int64")
        ids_buffer = self._ids[:ids.shape[1]].reshape(ids.shape)
        self.backend.write(ids_buffer, ids)
        self.backend.graph("text_encoder").run({"input_ids": ids_buffer}, {"text_features": features})
        if self.text_cache.enabled:
            self.text_cache.put(key, self.backend.read(features))
        if not self.keep_text_encoder:
            self.backend.read_all([])  # a device backend may still be running T5: wait before freeing it
            self.backend.release("text_encoder")
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

    def encode_photo(self, img: Image.Image):
        """An RGB photo -> the loop's source prefix buffer, from the image cache when it was seen before."""
        if not self.image_cache.enabled:
            return self.encode_image(preprocess(img, self.config.image_size))
        key = hashlib.blake2b(f"{img.width}x{img.height}:".encode() + img.tobytes(), digest_size=16).digest()
        cached = self.image_cache.get(key)
        if cached is not None:
            self.backend.write(self.loop.prefix, cached)
            return self.loop.prefix
        prefix = self.encode_image(preprocess(img, self.config.image_size))
        self.image_cache.put(key, self.backend.read(prefix))
        return prefix

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
        on_scale: ScaleHook | None = None,
    ) -> EditResult:
        """Edit `image` by `instruction`; keyword overrides apply on top of `sampling`. With `record`,
        `result.loop` also holds every scale's bits and guided logits (read back with the image).
        `on_scale(scale, summed)` runs after every scale (see `preview_image`); an exception it
        raises ends the edit there."""
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
        prefix = self.encode_photo(img)
        m2 = mark()
        loop = self.loop.run(features, prefix, SamplerInputs.from_params(sampling), noise_source, on_scale=on_scale)
        m3 = mark()
        image_buffer = self._decode(loop.summed)
        m4 = mark()
        loop.marks += [("text_encoder", m0, m1), ("vae_encoder", m1, m2), ("transformer", m2, m3),
                       ("vae_decoder", m3, m4)]
        (pixels,) = self.loop.collect(loop, [image_buffer], record=record)
        result = postprocess(pixels, img.size)
        timings = {k: loop.timings_ms[k] for k in STAGES}
        timings.update((k, v) for k, v in loop.timings_ms.items() if k not in timings)
        timings["total"] = ms_since(t0)  # wall clock: host work, transfers and the wait included
        return EditResult(result, timings, loop)

    def edit_batch(self, requests: Sequence[EditRequest]) -> list[EditResult | Exception]:
        """Edit several requests; an item that fails gives its exception in its place, the others run.

        Today the items run one after another (bit-identical to separate `edit` calls); once the
        graphs carry a batch axis they run as one batch, and callers do not change.
        """
        results: list[EditResult | Exception] = []
        for r in requests:
            try:
                results.append(self.edit(r.image, r.instruction, r.sampling, r.noise, record=r.record,
                                          on_scale=r.on_scale))
            except Exception as e:  # noqa: BLE001 - returned to its caller, never lost
                results.append(e)
        return results

    def generate(
        self,
        instruction: str | None = None,
        photo: Image.Image | np.ndarray | None = None,
        *,
        text_features: np.ndarray | None = None,
        pixels: np.ndarray | None = None,
        source_prefix: np.ndarray | None = None,
        sampling: SamplingConfig | None = None,
        noise: str | NoiseSource = "numpy",
        teacher_bits: Sequence[np.ndarray] | None = None,
        scales: int | None = None,
        decode: bool = True,
    ) -> Generation:
        """One run of the loop with everything read back, for checks and tools (parity, calibration).

        Conditioning: `instruction` (through the text encoder) or `text_features` [1, Lt, Ct5]. Source:
        `photo` (preprocessed as `edit` does), `pixels` [1, 3, S, S] in [-1, 1], or the VAE encoder's
        `source_prefix` [1, L_src, d_tok]. `teacher_bits` feeds those bits (per scale) to the next scale
        instead of the sampled ones; `scales` stops after the first scales; `decode` runs the VAE decoder
        when every scale ran. One host synchronisation, like `edit`."""
        if (instruction is None) == (text_features is None):
            raise InputError("give exactly one of an instruction and text features")
        if sum(x is not None for x in (photo, pixels, source_prefix)) != 1:
            raise InputError("give exactly one of a photo, its pixels and its source prefix")
        sampling = sampling or self.config.sampling
        noise_source = make_noise(noise, sampling.seed) if isinstance(noise, str) else noise
        t0 = time.perf_counter()
        features = self.encode_text(instruction) if instruction is not None else text_features
        if source_prefix is None:
            source_prefix = (self.encode_image(pixels) if pixels is not None
                             else self.encode_image(preprocess(as_rgb(photo), self.config.image_size)))
        loop = self.loop.run(features, source_prefix, SamplerInputs.from_params(sampling), noise_source,
                             teacher_bits=list(teacher_bits) if teacher_bits is not None else None, scales=scales)
        whole = loop.scales == self.config.schedule.num_scales
        image = self._decode(loop.summed) if decode and whole else None
        fed_features = self.loop.text_buffers(features.shape[1])[0]
        buffers = [fed_features, self.loop.prefix, loop.summed] + ([image] if image is not None else [])
        host = self.loop.collect(loop, buffers, record=True)
        timings = dict(loop.timings_ms, total=ms_since(t0))
        return Generation(loop.bits, loop.guided_logits, host[0], host[1], host[2],
                          host[3] if image is not None else None, timings)

    # ------------------------------------------------------------ previews
    def fit_preview(self) -> dict:
        """Fit the preview projection on this pipeline's VAE graphs (an artifact exported without one,
        e.g. bf16 graphs that ONNX Runtime's CPU provider cannot run); returns the fit's report."""
        self.preview, report = fit_preview(self.backend, self.config)
        return report

    def preview_image(self, summed, original_size: tuple[int, int]) -> Image.Image:
        """The picture the summed codes (a loop buffer, e.g. from `on_scale`) are heading to, cheaply."""
        if self.preview is None:
            raise ArtifactError(f"artifact {self.manifest.folder} has no preview projection; call fit_preview() "
                                "first (seconds: it runs the VAE graphs only)")
        return postprocess(self.preview.apply(self.backend.read(summed)), original_size)

    def close(self) -> None:
        self.backend.close()
