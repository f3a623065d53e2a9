"""The accuracy report of a quantised artifact: quantization_report.json, .md and a PNG grid.

The report says which weights it was measured on: agreement on a random-weight model (no
trained margins between bit logits) says little about a trained one, so the same command must
be rerun on the release checkpoints before trusting a mode there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..fileio import atomic_path, write_text

REPORT = "quantization_report.json"
GRID_ROWS = 4
THUMB = 160


def weights_made_on(source: dict[str, Any]) -> dict[str, Any]:
    """What the artifact's manifest says about the weights it was exported from."""
    command = source.get("command", "")
    if source.get("fixture") or "--fixture" in command:
        return {"trained": False, "weights": "a golden fixture's random weights (run through the official code); "
                                              "not a trained model"}
    if "--checkpoint-dir" in command:
        return {"trained": True, "weights": f"release checkpoints ({command})"}
    if "--random-weights" in command or command.startswith("varedit-deploy demo"):
        return {"trained": False, "weights": "random weights; not a trained model"}
    return {"trained": None, "weights": "unknown (the artifact's manifest does not say what it was exported from)"}


def markdown(report: dict[str, Any]) -> str:
    r = report
    scales = range(len(r["per_scale_bit_agreement"]))
    lines = [f"# Quantisation report: {r['mode']} ({r['method']}), high precision {r['high_precision']}, "
             f"KV cache {r['kv_cache']}", "",
             f"Weights: **{r['weights_made_on']['weights']}**.", "",
             f"Calibration set: {r['calibration_set']['description']} (sha256 {r['calibration_set']['sha256'][:16]}...); "
             f"text features: {r['calibration_set']['text']}.", "",
             "## Teacher-forced agreement with fp32 on the held-out edits", "",
             "| scale | " + " | ".join(str(s) for s in scales) + " | all |",
             "|---" * (len(scales) + 2) + "|",
             "| bits, quantised | " + " | ".join(f"{a:.4f}" for a in r["per_scale_bit_agreement"])
             + f" | {r['bit_agreement']:.4f} |",
             "| bits, fp16 | " + " | ".join(f"{a:.4f}" for a in r["fp16_per_scale_bit_agreement"])
             + f" | {r['fp16_bit_agreement']:.4f} |",
             "| logit KL (nats/bit), quantised | " + " | ".join(f"{k:.1e}" for k in r["per_scale_logit_kl"]) + " | |",
             *(["", f"The 8-bit KV cache alone (fp32 graphs otherwise): {r['kv_cache_alone_bit_agreement']:.4f} "
                "of the bits agree."] if "kv_cache_alone_bit_agreement" in r else []),
             "", "## Free-running images", "",
             "| compared | PSNR (dB) | SSIM |", "|---|---:|---:|",
             f"| quantised vs fp32 | {r['image_psnr_db']:.2f} | {r['image_ssim']:.4f} |",
             f"| quantised vs fp16 | {r['image_vs_fp16']['psnr_db']:.2f} | {r['image_vs_fp16']['ssim']:.4f} |",
             f"| fp16 vs fp32 | {r['fp16_image_vs_fp32']['psnr_db']:.2f} | {r['fp16_image_vs_fp32']['ssim']:.4f} |",
             "", "Grid (source | fp32 | fp16 | quantised): `quantization_grid.png`.", "",
             "## Weight bytes per graph", "",
             "Learned weights (initializers); constant tables (RoPE, pooling matrices) are counted apart.", "",
             "| graph | fp32 | fp16 | this artifact | / fp16 | constant tables |", "|---|---:|---:|---:|---:|---:|"]
    for graph, w in r["weight_bytes"].items():
        ratio = f"{w['ratio_to_fp16']:.3f}" if w["ratio_to_fp16"] is not None else "-"
        lines.append(f"| {graph} | {w['fp32']:,} | {w['fp16']:,} | {w['artifact']:,} | {ratio} | {w['tables']:,} |")
    s = r["sensitivity"]
    lines += ["", "## Layer groups", "",
              f"Candidates {len(r['layer_groups']['candidates'])}, excluded by the recipe "
              f"{len(r['layer_groups']['excluded'])} ({', '.join(r['layer_groups']['excluded']) or 'none'}), "
              f"kept in high precision by the search {len(s['kept_in_high_precision'])} "
              f"({', '.join(s['kept_in_high_precision']) or 'none'}), quantised {len(r['layer_groups']['quantized'])}.",
              ""]
    if s["skipped"]:
        lines.append("Sensitivity search skipped (`--no-search`): every candidate group is quantised.")
    else:
        lines += [f"Search budget {s['min_bit_agreement']:g}: {'reached' if s['reached'] else 'NOT reached'} "
                  f"({s['agreement']:.5f}, quantisation alone, fp32 elsewhere).", "",
                  "| rank | group | bit agreement quantised alone |", "|---:|---|---:|"]
    lines += [f"| {i} | {g['group']} | {g['bit_agreement_alone']:.5f} |" for i, g in enumerate(s["ranking"], 1)]
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}.", ""]
    return "\n".join(lines)


def table(report: dict[str, Any]) -> str:
    """The lines `varedit-deploy quantize` prints."""
    r = report
    fmt = " ".join(f"{a:.4f}" for a in r["per_scale_bit_agreement"])
    ratios = ", ".join(f"{g} {w['ratio_to_fp16']:.2f}x" for g, w in r["weight_bytes"].items() if w["quantized"])
    return "\n".join([
        f"{r['mode']} ({r['method']}, {r['high_precision']} elsewhere, KV cache {r['kv_cache']}) on "
        f"{r['weights_made_on']['weights']}",
        f"teacher-forced bit agreement with fp32, per scale: {fmt}; all {r['bit_agreement']:.4f} "
        f"(fp16 artifact: {r['fp16_bit_agreement']:.4f})",
        f"free-running image vs fp32: PSNR {r['image_psnr_db']:.2f} dB, SSIM {r['image_ssim']:.4f}; "
        f"vs fp16: PSNR {r['image_vs_fp16']['psnr_db']:.2f} dB",
        f"weights vs fp16: {ratios or 'nothing quantised'}",
        f"layer groups quantised {len(r['layer_groups']['quantized'])}, kept in high precision "
        f"{len(r['sensitivity']['kept_in_high_precision'])}, excluded by the recipe {len(r['layer_groups']['excluded'])}",
    ])


def grid(rows: list[tuple[Image.Image, np.ndarray, np.ndarray, np.ndarray]]) -> Image.Image:
    """Held-out edits side by side: source | fp32 | fp16 | quantised."""
    labels = ("source", "fp32", "fp16", "quantised")
    head = 18
    out = Image.new("RGB", (THUMB * 4, head + THUMB * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for c, label in enumerate(labels):
        draw.text((c * THUMB + 4, 3), label, fill=(0, 0, 0))
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            pic = img if isinstance(img, Image.Image) else Image.fromarray(img)
            pic = pic.convert("RGB")
            pic.thumbnail((THUMB, THUMB))
            out.paste(pic, (c * THUMB, head + r * THUMB))
    return out


FILES = (REPORT, "quantization_report.md", "quantization_grid.png")  # listed in the quantised manifest


def write(folder: Path, report: dict[str, Any], grid_rows) -> None:
    write_text(folder / REPORT, json.dumps(report, indent=1))
    write_text(folder / FILES[1], markdown(report))
    with atomic_path(folder / FILES[2]) as tmp:
        grid(grid_rows[:GRID_ROWS]).save(tmp, format="PNG")
