"""Fit the preview projection (`preview.py`) on the artifact's own VAE graphs: no transformer, no torch.

A preview shows the loop's summed codes after a coarse scale. Such states are made here from real
photos without the transformer: the VAE encoder's continuous latent of each photo is quantised
scale by scale as the VAE's own multi-scale residual quantiser does (docs/spec/vae-text.md 2.5),
and the codes summed up to each preview scale are kept, which is what an edit's summed codes
converge to. The decoder graph decodes them; ridge least squares then maps each latent pixel's
neighbourhood to its decoded patch. Only `vae_encoder` and `vae_decoder` run, once per photo
and once per state: seconds at any model size. `export` stores the result in the artifact
(`store_preview`); a pipeline of an artifact without one fits it when asked (`EditPipeline.fit_preview`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..artifact import Manifest, file_record, write_manifest
from ..config import ModelConfig, Schedule
from ..imaging import SAMPLE_PHOTO, load_image, preprocess
from ..model.resample import area_matrix, bilinear_matrix
from .backend import Backend
from .preview import MAX_PREVIEWS, PreviewProjection, neighbourhoods, patches, preview_scales

PREVIEW_FILE = "preview/projection.npy"
KERNEL = 3  # a 3 x 3 neighbourhood: benchmarks/preview_quality.py compares 1 x 1 and the reduced decodes
RIDGE = 1e-3


def training_photos() -> list[Image.Image]:
    """The bundled photo, its mirror image and its left half: three real pictures at the model's framing."""
    photo = load_image(SAMPLE_PHOTO)
    return [photo, ImageOps.mirror(photo), photo.crop((0, 0, photo.width // 2, photo.height))]


def tokens_to_latent(tokens: np.ndarray, side: int, patchify: bool) -> np.ndarray:
    """Tokens [1, side^2, d_tok] -> VAE latent [1, d, H, W]: numpy twin of model/codes.py's."""
    grid = tokens.transpose(0, 2, 1).reshape(tokens.shape[0], -1, side, side)
    if not patchify:
        return grid
    b, c4, h, w = grid.shape  # token channel 4c + 2dy + dx <-> latent channel c at (2i + dy, 2j + dx)
    return grid.reshape(b, c4 // 4, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


def residual_states(latent: np.ndarray, schedule: Schedule, keep: set[int]) -> list[np.ndarray]:
    """The summed codes [1, d, H, W] after each scale in `keep`, from the VAE's multi-scale residual
    quantisation of `latent` (area down to each scale, sign, bilinear back up, subtract)."""
    d, full = latent.shape[1], latent.shape[-1]
    residual = latent.astype(np.float64)
    summed = np.zeros_like(residual)
    states = []
    for scale in range(max(keep) + 1):
        side = schedule.vae_side(scale)
        down, up = area_matrix(full, side), bilinear_matrix(side, full)
        codes = np.where(down @ residual @ down.T > 0, 1.0, -1.0) / np.sqrt(d)
        upsampled = up @ codes @ up.T
        residual -= upsampled
        summed += upsampled
        if scale in keep:
            states.append(summed.astype(np.float32))
    return states


def fit_projection(states: list[np.ndarray], decode: Callable[[np.ndarray], np.ndarray], patch: int,
                   kernel: int = KERNEL, ridge: float = RIDGE) -> tuple[PreviewProjection, dict]:
    """Ridge least squares from neighbourhoods of `states` to the patches `decode` makes of them."""
    x = np.concatenate([neighbourhoods(s, kernel) for s in states]).astype(np.float64)
    y = np.concatenate([patches(decode(s), patch) for s in states]).astype(np.float64)
    gram = x.T @ x
    gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
    weights = np.linalg.solve(gram, x.T @ y).astype(np.float32)
    projection = PreviewProjection(weights, kernel, patch)
    err = np.clip(x @ weights, -1, 1) - y
    psnr = float(10 * np.log10(4.0 / max(np.mean(err**2), 1e-12)))  # peak-to-peak 2 in [-1, 1]
    return projection, {"kernel": kernel, "states": len(states), "samples": len(x), "fit_psnr_db": round(psnr, 2),
                        "states_from": "VAE multi-scale residual quantisation of real photos"}


class VAEGraphs:
    """The artifact's VAE encoder and decoder on a backend, with buffers of their own (an edit's are not touched)."""

    def __init__(self, backend: Backend, config: ModelConfig):
        self.backend, self.config = backend, config
        sched, t = config.schedule, config.transformer
        size, latent = config.image_size, sched.latent_side
        self.pixels = backend.empty((1, 3, size, size), "float32")
        self.prefix = backend.empty((1, sched.source_tokens, t.d_tok), "float32")
        self.summed = backend.empty((1, t.codebook_dim, latent, latent), "float32")
        self.image = backend.empty((1, 3, size, size), "float32")

    def latent(self, photo: Image.Image) -> np.ndarray:
        """A photo -> the encoder's continuous latent [1, d, H, W]."""
        self.backend.write(self.pixels, preprocess(photo, self.config.image_size))
        self.backend.graph("vae_encoder").run({"image": self.pixels}, {"source_prefix": self.prefix})
        side = self.config.schedule.source_side
        return tokens_to_latent(self.backend.read(self.prefix), side, self.config.transformer.patchify)

    def decode(self, summed: np.ndarray) -> np.ndarray:
        """Summed codes [1, d, H, W] -> decoded image [1, 3, S, S] in [-1, 1]."""
        self.backend.write(self.summed, summed)
        self.backend.graph("vae_decoder").run({"summed_codes": self.summed}, {"image": self.image})
        return self.backend.read(self.image)


def training_states(vae: VAEGraphs) -> list[np.ndarray]:
    """Summed codes after every preview scale of the residual quantisation of each training photo."""
    sched = vae.config.schedule
    keep = set(preview_scales(sched.num_scales, MAX_PREVIEWS))
    return [state for photo in training_photos() for state in residual_states(vae.latent(photo), sched, keep)]


def fit_preview(backend: Backend, config: ModelConfig) -> tuple[PreviewProjection, dict]:
    """Fit the projection on `backend`'s VAE graphs (loading them if they are not yet)."""
    vae = VAEGraphs(backend, config)
    return fit_projection(training_states(vae), vae.decode, config.vae.patch_size)


def load_preview(manifest: Manifest) -> PreviewProjection | None:
    """The projection stored in the artifact, or None for an artifact exported without one."""
    if manifest.preview is None:
        return None
    weights = np.load(manifest.folder / manifest.preview["file"]["path"], allow_pickle=False)
    return PreviewProjection.from_weights(weights, manifest.config.vae.codebook_dim, manifest.config.vae.patch_size)


def store_preview(manifest: Manifest, projection: PreviewProjection, report: dict) -> None:
    """Write the projection into the artifact being made in `manifest.folder` and record it in its manifest."""
    path = Path(manifest.folder) / PREVIEW_FILE
    path.parent.mkdir(exist_ok=True)
    np.save(path, projection.weights)
    data = {k: v for k, v in manifest.data.items() if k != "schema_version"}
    data["preview"] = {"file": file_record(manifest.folder, path), **report}
    write_manifest(manifest.folder, data)
