"""Agreement of fp16 ONNX graphs with fp32 ones on ONNX Runtime CPU, under shared noise.

    python benchmarks/precision_agreement.py [--model tiny-2b] [--edits 3]

Exports a random-weight model in fp32 and fp16, runs the same edits (photo, instruction,
noise) on both, and reports the fraction of identical bits per scale and the final image PSNR.
bf16 graphs cannot run on ONNX Runtime's CPU provider; they are checked on GPUs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-2b")
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from varedit_deploy.config import from_name
    from varedit_deploy.imaging import SAMPLE_PHOTO
    from varedit_deploy.export.artifacts import export_artifacts
    from varedit_deploy.imaging import load_image
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.model.tiny_text import write_tiny_text_encoder
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    photo = load_image(SAMPLE_PHOTO)
    config = from_name(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        model = VAREditModel.random(config, seed=0)
        model.attach_text_encoder(write_tiny_text_encoder(Path(tmp) / "t5", config.transformer.text_channels), "fp32")
        pipes = {p: EditPipeline.from_artifacts(export_artifacts(model, Path(tmp) / p, precision=p,
                                                                 progress=lambda _: None)) for p in ("fp32", "fp16")}
        per_scale = np.zeros(config.schedule.num_scales)
        psnr = []
        for seed in range(args.edits):
            r = {p: pipe.edit(photo, "make the sky purple", seed=seed, noise=NumpyNoise(seed), record=True)
                 for p, pipe in pipes.items()}
            per_scale += [np.mean(a == b) for a, b in zip(r["fp16"].loop.bits, r["fp32"].loop.bits)]
            mse = np.mean((np.asarray(r["fp16"].image, np.float64) - np.asarray(r["fp32"].image, np.float64)) ** 2)
            psnr.append(10 * np.log10(255.0**2 / max(mse, 1e-12)))
    per_scale /= args.edits
    total_bits = np.array(config.schedule.tokens) * config.transformer.d_tok
    overall = float(np.sum(per_scale * total_bits) / np.sum(total_bits))
    table = [f"`python benchmarks/precision_agreement.py --model {args.model} --edits {args.edits}` "
             "(ONNX Runtime CPU, fp16 graphs vs fp32 graphs, shared noise)", "",
             "| scale | " + " | ".join(str(s) for s in range(len(per_scale))) + " | all bits | image PSNR (dB) |",
             "|---" * (len(per_scale) + 3) + "|",
             "| identical bits | " + " | ".join(f"{a:.4f}" for a in per_scale) +
             f" | {overall:.4f} | {np.mean(psnr):.1f} |"]
    print("\n".join(table))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"precision_agreement-{args.model}.md").write_text("\n".join(table) + "\n")
    (args.out / f"precision_agreement-{args.model}.json").write_text(json.dumps(
        {"model": args.model, "per_scale_identical_bits": per_scale.tolist(), "overall": overall,
         "psnr_db": psnr}, indent=1))


if __name__ == "__main__":
    main()
