"""Preview options compared: error against the full decode of the same partial codes, and cost.

    python benchmarks/preview_quality.py [--artifacts ART] [--out benchmarks/results/preview_quality.md]

Without --artifacts it exports the demo model (tiny-2b, random weights). For photos the fit
never saw (skimage's astronaut, coffee, chelsea), the summed codes after each preview scale are
decoded four ways: the full VAE decoder (the reference; its cost is what a decoded preview
costs), the artifact's least-squares projection (3 x 3 neighbourhoods), the same fit with 1 x 1
neighbourhoods, and a reduced decode (the decoder graph with free spatial axes, run on the codes
area-pooled to 1/2 and 1/4 of the latent side, bilinear back up). A constant (the mean colour of
the fit's decodes) is the floor any preview must beat. Timings are medians on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from demo_artifact import artifact_or_demo

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `varedit-deploy serve` runs numpy
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def relaxed_decoder(path: Path):
    """The vae_decoder graph with symbolic spatial axes, as an ONNX Runtime session."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        for dim, name in zip(value.type.tensor_type.shape.dim[2:], ("h", "w")):
            dim.ClearField("dim_value")
            dim.dim_param = f"{value.name}_{name}"
    del model.graph.value_info[:]
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preview_quality.md")
    args = ap.parse_args()
    with artifact_or_demo(args.artifacts) as artifacts:
        run(args, artifacts)


def run(args: argparse.Namespace, artifacts: Path) -> None:

    from skimage import data

    from varedit_deploy.model.resample import area_matrix, bilinear_matrix
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.runtime.preview import MAX_PREVIEWS, preview_scales
    from varedit_deploy.runtime.preview_fit import VAEGraphs, fit_projection, training_states

    pipe = EditPipeline.from_artifacts(artifacts)
    cfg = pipe.config
    latent, size, patch = cfg.schedule.latent_side, cfg.image_size, cfg.vae.patch_size
    scales = preview_scales(cfg.schedule.num_scales, MAX_PREVIEWS)
    vae = VAEGraphs(pipe.backend, cfg)
    decode = vae.decode
    train = training_states(vae)
    train_decoded = [decode(s) for s in train]
    mean_colour = np.mean([x.mean(axis=(0, 2, 3)) for x in train_decoded], axis=0)[None, :, None, None]
    one_by_one, _ = fit_projection(train, decode, patch, kernel=1)
    held, held_scale = [], []
    for i, photo in enumerate((data.astronaut(), data.coffee(), data.chelsea())):
        pipe.edit(photo, "make it look like autumn", seed=100 + i, on_scale=lambda s, summed: (
            held.append(pipe.backend.read(summed)), held_scale.append(s)) if s in scales else None)
    full = [decode(s) for s in held]
    session = relaxed_decoder(pipe.manifest.graph_path("vae_decoder"))

    def reduced(state, factor):
        pool, up = area_matrix(latent, latent // factor), bilinear_matrix(size // factor, size)
        small = np.ascontiguousarray(pool @ state @ pool.T, dtype=np.float32)
        out = session.run(None, {"summed_codes": small})[0]
        return up @ out @ up.T

    methods = {
        "full decode (reference)": lambda s: decode(s),
        "constant (mean colour)": lambda s: np.broadcast_to(mean_colour, (1, 3, size, size)),
        "projection 3x3 (stored)": lambda s: pipe.preview.apply(s),
        "projection 1x1": lambda s: one_by_one.apply(s),
        "reduced decode 1/2": lambda s: reduced(s, 2),
        "reduced decode 1/4": lambda s: reduced(s, 4),
    }
    rows = []
    for name, fn in methods.items():
        mse = [float(np.mean((fn(s) - x) ** 2)) for s, x in zip(held, full)]
        per_scale = {int(sc): float(10 * np.log10(4.0 / max(np.mean([m for m, t in zip(mse, held_scale) if t == sc]),
                                                                1e-12))) for sc in scales}
        rows.append({"method": name, "psnr_db": float(10 * np.log10(4.0 / max(np.mean(mse), 1e-12))),
                     "psnr_db_per_scale": per_scale, "ms": median_ms(lambda: fn(held[0]))})
    summed_buffer = pipe.loop.summed[0]
    pipe.backend.write(summed_buffer, held[0])
    served_ms = median_ms(lambda: pipe.preview_image(summed_buffer, (451, 300)))
    edit_ms = median_ms(lambda: pipe.edit(data.chelsea(), "make it look like autumn", seed=1), repeats=3)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "model": cfg.name, "preview_scales": list(scales), "held_out_states": len(held), "methods": rows,
              "served_preview_ms": served_ms, "edit_ms": edit_ms}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from varedit_deploy.fileio import write_text

    write_text(args.out.with_suffix(".json"), json.dumps(report, indent=1))
    write_text(args.out, render(report) + "\n")
    print(render(report))


def render(r: dict) -> str:
    lines = [f"# preview_quality ({r['date']}, {r['machine']}, {r['model']}, random weights)", "",
             f"{r['held_out_states']} held-out states (3 photos x scales {r['preview_scales']}); PSNR against the full "
             "decode of the same summed codes (peak-to-peak 2, images in [-1, 1]).", "",
             "| method | PSNR dB | per scale | ms per preview |", "|---|---:|---|---:|"]
    for m in r["methods"]:
        per = ", ".join(f"{s}: {v:.1f}" for s, v in m["psnr_db_per_scale"].items())
        psnr = "exact" if m["psnr_db"] > 100 else f"{m['psnr_db']:.1f}"
        lines.append(f"| {m['method']} | {psnr} | {per} | {m['ms']:.2f} |")
    lines += ["", f"A served preview (projection + resize to a 451x300 photo, `EditPipeline.preview_image`): "
                  f"{r['served_preview_ms']:.1f} ms; a whole edit: {r['edit_ms']:.0f} ms."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
