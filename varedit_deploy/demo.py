"""`varedit-deploy demo`: the main job on a fresh machine, in about a minute on two cores.

Builds the small built-in model (random weights, written in the official release layout and
loaded back by the real loader), exports it to ONNX, edits a real photo on ONNX Runtime,
replays the same edit on the eager PyTorch reference with the same noise, and writes the
result, a side-by-side picture and a timing table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE = Path(__file__).parent / "assets" / "sample.jpg"


def _write_release(folder: Path, model_name: str, progress: Callable[[str], None]):
    """A release-layout folder (official .pth names and key layout, flan-t5-xl/) for a tiny model."""
    import dataclasses

    import torch

    from .config import from_name
    from .model.checkpoint import ours_to_official_transformer
    from .model.loaded import VAREditModel
    from .model.tiny_text import write_tiny_text_encoder

    base = from_name(model_name)
    config = dataclasses.replace(base, transformer_file=f"{model_name}.pth", vae_file=f"{model_name}-vae.pth",
                                 text_encoder_dir="flan-t5-xl")
    model = VAREditModel.random(config, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    state = ours_to_official_transformer(model.transformer.state_dict(), config.transformer.block_chunks)
    torch.save(state, folder / config.transformer_file)
    torch.save({"vae": model.vae.state_dict()}, folder / config.vae_file)
    write_tiny_text_encoder(folder / "flan-t5-xl", config.transformer.text_channels)
    progress(f"      wrote {folder} (official file layout, random weights)")
    return config


def run_demo(out: Path, model_name: str = "tiny-2b", image: Path | None = None,
             instruction: str = "make the sky purple", seed: int = 0,
             progress: Callable[[str], None] = print) -> dict:
    from .errors import InputError
    from .export.artifacts import export_artifacts
    from .fileio import write_text
    from .imaging import load_image, save_image
    from .model.edit import edit as reference_edit
    from .model.loaded import VAREditModel
    from .runtime.pipeline import EditPipeline
    from .sampling import NumpyNoise

    if not model_name.startswith("tiny-"):
        raise InputError("the demo builds a random-weight model; use a tiny preset (tiny-2b, tiny-8b)")
    out = Path(out)
    photo = load_image(image or SAMPLE)
    t0 = time.perf_counter()
    progress(f"[1/4] building the small built-in model {model_name}")
    config = _write_release(out / "release", model_name, progress)
    model = VAREditModel.from_release(out / "release", config, text_precision="fp32")

    progress("[2/4] exporting to ONNX")
    artifacts = export_artifacts(model, out / "artifacts", source={
        "command": f"varedit-deploy demo --out {out} --model {model_name}"}, progress=lambda m: progress("      " + m))

    progress("[3/4] editing the photo on ONNX Runtime")
    pipe = EditPipeline.from_artifacts(artifacts)
    pipe.edit(photo, instruction, seed=seed)  # warm-up: session creation and first-run allocations
    ort_result = pipe.edit(photo, instruction, seed=seed, noise=NumpyNoise(seed), record=True)

    progress("[4/4] replaying the same edit on the eager PyTorch reference")
    reference_edit(model, photo, instruction, noise=NumpyNoise(seed))  # warm-up
    ref_result = reference_edit(model, photo, instruction, noise=NumpyNoise(seed))

    save_image(ort_result.image, out / "edited.png")
    side = Image.new("RGB", (photo.width * 2, photo.height), (255, 255, 255))
    side.paste(photo, (0, 0))
    side.paste(ort_result.image, (photo.width, 0))
    save_image(side, out / "side_by_side.png")
    same_bits = all(np.array_equal(a, b.numpy()) for a, b in zip(ort_result.loop.bits,
                                                                    (r.bits for r in ref_result.generation.scales)))
    pixel_diff = int(np.max(np.abs(np.asarray(ort_result.image, np.int32) - np.asarray(ref_result.image, np.int32))))
    stages = ["text_encoder", "vae_encoder", "transformer", "vae_decoder", "total"]
    table = _timing_table(stages, ort_result.timings, ref_result.timings)
    summary = {
        "model": model_name, "instruction": instruction, "seed": seed, "image": str(image or SAMPLE),
        "onnxruntime_ms": {k: ort_result.timings[k] * 1e3 for k in ort_result.timings},
        "reference_ms": {k: ref_result.timings[k] * 1e3 for k in ref_result.timings},
        "bits_identical_to_reference": same_bits, "max_pixel_difference_to_reference": pixel_diff,
        "wall_seconds": time.perf_counter() - t0,
    }
    write_text(out / "timings.md", table + "\n")
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    progress(table)
    progress(f"bits identical to the reference: {same_bits}; max pixel difference: {pixel_diff}")
    progress(f"wrote {out / 'edited.png'}, {out / 'side_by_side.png'}, {out / 'timings.md'} "
             f"({summary['wall_seconds']:.0f} s in all)")
    return summary


def _timing_table(stages: list[str], ort: dict[str, float], ref: dict[str, float]) -> str:
    lines = ["| stage | ONNX Runtime (ms) | eager PyTorch (ms) | speed-up |", "|---|---:|---:|---:|"]
    for s in stages:
        lines.append(f"| {s} | {ort[s] * 1e3:.1f} | {ref[s] * 1e3:.1f} | {ref[s] / max(ort[s], 1e-9):.2f}x |")
    return "\n".join(lines)
