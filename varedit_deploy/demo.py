"""`varedit-deploy demo`: the main job on a fresh machine, in well under a minute on two cores.

Builds the small built-in model (random weights, written in the official release layout and
loaded back by the real loader), exports it to ONNX, edits a real photo on ONNX Runtime,
replays the same edit on the eager PyTorch reference with the same noise, and writes the
result, a labelled side-by-side picture, a timing table and a summary. The timing compares
like with like: both sides warmed up, then several edits each, interleaved, reported as the
median with its range.
"""

from __future__ import annotations

import json
import statistics
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# What a demo folder holds; `--out` may be new, empty, or hold only these (a previous demo's).
WRITES = ("release", "artifacts", "edited.png", "side_by_side.png", "timings.md", "summary.json")
COMPARES = "ONNX Runtime vs the eager PyTorch reference: same model, same photo, same noise"
PIXEL_NOTE = ("the two decoders round float32 differently (ONNX Runtime's kernels vs PyTorch's), and truncating "
              "to 8-bit turns a ~1e-6 difference into one level; the sampled bits are what must match")


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


def check_demo_folder(out: Path) -> None:
    """The demo writes fixed names into `out`: refuse a folder holding anything else."""
    from .errors import OutputError
    from .fileio import check_writable

    check_writable(out / WRITES[0], "--out")  # also refuses an `out` that is a file
    others = sorted(p.name for p in out.iterdir() if p.name not in WRITES) if out.is_dir() else []
    if others:
        raise OutputError(f"--out {out} holds files the demo did not write ({', '.join(others[:5])}); "
                          "give a new or empty folder, or a previous demo's")


def run_demo(out: Path, model_name: str = "tiny-2b", image: Path | None = None,
             instruction: str = "make the sky purple", seed: int = 0, timed_edits: int = 5,
             progress: Callable[[str], None] = print) -> dict:
    from .errors import InputError
    from .export.artifacts import export_artifacts
    from .fileio import write_text
    from .imaging import SAMPLE_PHOTO, load_image, save_image
    from .model.edit import edit as reference_edit
    from .model.loaded import VAREditModel
    from .runtime.pipeline import EditPipeline
    from .sampling import NumpyNoise

    if not model_name.startswith("tiny-"):
        raise InputError("the demo builds a random-weight model; use a tiny preset (tiny-2b, tiny-8b)")
    if not instruction.strip():
        raise InputError("the instruction is empty; say what to change, e.g. 'make the sky purple'")
    out = Path(out)
    check_demo_folder(out)
    photo = load_image(image or SAMPLE_PHOTO)
    t0 = time.perf_counter()
    progress(f"[1/4] building the small built-in model {model_name}")
    config = _write_release(out / "release", model_name, progress)
    model = VAREditModel.from_release(out / "release", config, text_precision="fp32")

    progress("[2/4] exporting to ONNX")
    artifacts = export_artifacts(model, out / "artifacts", overwrite=True, progress=lambda m: progress("      " + m),
                                 source={"command": f"varedit-deploy demo --out {out} --model {model_name}"})

    progress(f"[3/4] editing the photo on ONNX Runtime and on the eager PyTorch reference: one warm-up each, "
             f"then {timed_edits} timed edits each, interleaved")
    pipe = EditPipeline.from_artifacts(artifacts)

    def on_ort(record: bool = False):
        return pipe.edit(photo, instruction, noise=NumpyNoise(seed), record=record)

    def on_reference():
        return reference_edit(model, photo, instruction, noise=NumpyNoise(seed))

    ort_result, ref_result = on_ort(record=True), on_reference()  # warm-up: sessions, first-run allocations, caches
    ort_runs, ref_runs = [], []
    for _ in range(timed_edits):
        ort_runs.append(on_ort().timings_ms)
        ref_runs.append(on_reference().timings_ms)

    progress("[4/4] writing the results")
    same_bits = all(np.array_equal(a, b.numpy()) for a, b in zip(ort_result.loop.bits,
                                                                    (r.bits for r in ref_result.generation.scales)))
    pixel_diff = int(np.max(np.abs(np.asarray(ort_result.image, np.int32) - np.asarray(ref_result.image, np.int32))))
    save_image(ort_result.image, out / "edited.png")
    save_image(side_by_side(photo, ort_result.image, instruction), out / "side_by_side.png")
    ort_stats, ref_stats = _stats(ort_runs), _stats(ref_runs)
    speedup = ref_stats["total"]["median"] / ort_stats["total"]["median"]
    table = _timing_table(ort_stats, ref_stats, timed_edits)
    summary = {
        "model": model_name, "instruction": instruction, "seed": seed, "image": str(image or SAMPLE_PHOTO),
        "compares": f"{COMPARES}; {timed_edits} edits each after one warm-up, interleaved",
        "onnxruntime_ms": ort_stats, "reference_ms": ref_stats, "speedup_of_median_total": speedup,
        "bits_identical_to_reference": same_bits, "max_pixel_difference_to_reference": pixel_diff,
        "max_pixel_difference_note": PIXEL_NOTE, "wall_seconds": time.perf_counter() - t0,
    }
    write_text(out / "timings.md", table + "\n")
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    progress(table)
    total = ort_stats["total"], ref_stats["total"]
    progress(f"speed-up {speedup:.2f}x: {COMPARES}; median of {timed_edits} edits each after one warm-up "
             f"(ONNX Runtime {total[0]['median']:.0f} ms, range {total[0]['min']:.0f}-{total[0]['max']:.0f}; "
             f"PyTorch {total[1]['median']:.0f} ms, range {total[1]['min']:.0f}-{total[1]['max']:.0f})")
    progress(f"bits identical to the reference: {same_bits} (every bit sampled at every scale); "
             f"max pixel difference: {pixel_diff} of 255 ({PIXEL_NOTE})")
    written = ", ".join(str(out / name) for name in ("edited.png", "side_by_side.png", "timings.md", "summary.json"))
    progress(f"wrote {written} ({summary['wall_seconds']:.0f} s in all)")
    progress(f"try edits in a browser: {serve_command(out / 'artifacts')}  (needs the [serve] extra; "
             "then open http://127.0.0.1:8000/)")
    return summary


def serve_command(artifacts: Path) -> str:
    """The command that serves `artifacts` with the playground page at GET /."""
    import shlex

    return f"varedit-deploy serve --artifacts {shlex.quote(str(artifacts))}"


def _stats(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per timing key: median, min and max over the runs (ms)."""
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in runs[0]}


def _timing_table(ort: dict[str, dict[str, float]], ref: dict[str, dict[str, float]], runs: int) -> str:
    from .timings import timing_rows

    def cell(stats: dict[str, dict[str, float]], key: str) -> str:
        if key not in stats:
            return "-"
        s = stats[key]
        return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"

    lines = [f"Median ms of {runs} edits each after one warm-up (min-max in parentheses); {COMPARES}.", "",
             "| stage | ONNX Runtime | eager PyTorch | speed-up (medians) |", "|---|---:|---:|---:|"]
    for key, label, parent in timing_rows({**ref, **ort}):
        ratio = f"{ref[key]['median'] / ort[key]['median']:.2f}x" if key in ort and key in ref else "-"
        name = f"{parent} / {label}" if parent else label
        lines.append(f"| {name} | {cell(ort, key)} | {cell(ref, key)} | {ratio} |")
    return "\n".join(lines)


def side_by_side(source: Image.Image, result: Image.Image, instruction: str) -> Image.Image:
    """Source and result with a label over each, and the instruction and what the picture is below."""
    font = ImageFont.load_default(size=max(12, source.width // 32))
    line_h = font.getbbox("Hg")[3] + 6
    width, pad = source.width * 2, 8
    chars = max(20, int((width - 2 * pad) / max(font.getlength("x"), 1)))
    footer = textwrap.wrap(f'instruction: "{instruction}"', chars) + textwrap.wrap(
        "random weights: a pipeline check, not a trained model", chars)
    canvas = Image.new("RGB", (width, source.height + line_h * (1 + len(footer)) + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, label) in enumerate(((source, "source"), (result, "result (ONNX Runtime)"))):
        draw.text((i * source.width + pad, pad // 2), label, fill="black", font=font)
        canvas.paste(panel, (i * source.width, line_h + pad // 2))
    y = line_h + source.height + pad
    for text in footer:
        draw.text((pad, y), text, fill="black", font=font)
        y += line_h
    return canvas
