"""Fit the preview projection (`preview.py`) against the artifact's own VAE decoder, torch-free.

The training pairs are what previews will be asked for: the model edits the bundled photo
(a few seeds, the model's own sampling settings), the summed codes after each preview scale
are kept, and the decoder graph decodes them. Ridge least squares then maps each latent
pixel's neighbourhood to its decoded patch. `export` stores the result in the artifact
(`add_preview`); a server given an older artifact fits it once at start-up, in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..artifact import Manifest, file_record, read_manifest, write_manifest
from ..imaging import load_image, preprocess
from ..sampling import NumpyNoise, SamplerInputs
from .preview import MAX_PREVIEWS, PreviewProjection, neighbourhoods, patches, preview_scales

if TYPE_CHECKING:
    from .pipeline import EditPipeline

PREVIEW_FILE = "preview/projection.npy"
SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "sample.jpg"
INSTRUCTIONS = ("make the sky purple", "turn it into a watercolor painting")
KERNEL = 3  # a 3 x 3 neighbourhood: benchmarks/preview_quality.py compares 1 x 1 and the reduced decodes
RIDGE = 1e-3


def training_states(pipe: "EditPipeline", edits: int = len(INSTRUCTIONS)) -> list[np.ndarray]:
    """Summed codes [1, d, H, W] after every preview scale of `edits` edits of the bundled photo."""
    scales = set(preview_scales(pipe.config.schedule.num_scales, MAX_PREVIEWS))
    pipe.encode_image(preprocess(load_image(SAMPLE), pipe.config.image_size))
    sampler = SamplerInputs.from_params(pipe.config.sampling)
    states: list[np.ndarray] = []

    def keep(scale: int, summed) -> None:
        if scale in scales:
            states.append(pipe.backend.read(summed))

    rng = np.random.default_rng(0)
    for i in range(edits):
        if pipe.tokenizer is not None and pipe.manifest.has_graph("text_encoder"):
            features = pipe.encode_text(INSTRUCTIONS[i % len(INSTRUCTIONS)])
        else:  # a fixture artifact has no text encoder: condition on stand-in features
            features = rng.standard_normal((1, 8, pipe.config.transformer.text_channels), dtype=np.float32)
        pipe.loop.run(features, pipe.loop.prefix, sampler, NumpyNoise(i), on_scale=keep)
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
    return projection, {"kernel": kernel, "states": len(states), "samples": len(x), "fit_psnr_db": round(psnr, 2)}


def fit_preview(pipe: "EditPipeline") -> tuple[PreviewProjection, dict]:
    """Fit the projection on `pipe`'s own graphs (the states, then their full decodes)."""
    buffer = None

    def decode(state: np.ndarray) -> np.ndarray:
        nonlocal buffer
        buffer = pipe.backend.empty(state.shape, np.float32) if buffer is None else buffer
        pipe.backend.write(buffer, state)
        return pipe.decode(buffer)

    return fit_projection(training_states(pipe), decode, pipe.config.vae.patch_size)


def load_preview(manifest: Manifest) -> PreviewProjection | None:
    """The projection stored in the artifact, or None for an artifact exported before previews."""
    record = manifest.data.get("preview")
    if record is None:
        return None
    weights = np.load(manifest.folder / record["file"]["path"], allow_pickle=False)
    return PreviewProjection.from_weights(weights, manifest.config.vae.codebook_dim, manifest.config.vae.patch_size)


def add_preview(folder: Path, progress: Callable[[str], None] = print) -> None:
    """Export hook: fit the projection on the just-written graphs (ONNX Runtime) and record it in the manifest."""
    from .backend import make_backend
    from .pipeline import EditPipeline

    manifest = read_manifest(folder, verify="none")
    if manifest.data.get("precision") == "bf16":  # ONNX Runtime's CPU provider has no bf16 kernels
        progress("preview projection: skipped for bf16 graphs (a server fits one on its own backend at start)")
        return
    if manifest.data.get("attention") == "plugin":  # TensorRT plugin nodes: ONNX Runtime cannot run the step
        progress("preview projection: skipped for plugin graphs (a server fits one on its own backend at start)")
        return
    with make_backend("onnxruntime", manifest) as backend:
        projection, report = fit_preview(EditPipeline(manifest, backend))
    path = Path(folder) / PREVIEW_FILE
    path.parent.mkdir(exist_ok=True)
    np.save(path, projection.weights)
    data = {k: v for k, v in manifest.data.items() if k != "schema_version"}
    data["preview"] = {"file": file_record(Path(folder), path), **report}
    write_manifest(Path(folder), data)
    progress(f"preview projection: {report['kernel']}x{report['kernel']} neighbourhoods, {report['states']} states, "
             f"fit PSNR {report['fit_psnr_db']:.1f} dB against the decoder")
