"""How much could batching requests gain on this machine? An upper bound, measured, before building it.

    python benchmarks/batch_headroom.py [--artifacts ART] [--batch 16] [--edits 5]
                                        [--out benchmarks/results/batch_headroom.md]

Batching helps a stage only where running B items at once costs less than B runs of one. It
measures, with ONNX Runtime on this machine:

1. where one edit's time goes (`EditPipeline.edit` on the artifact: median stage times);
2. the VAE encoder and decoder per image at batch 1 and at `--batch`, exported here with a batch
   axis (the artifact's graphs have none; the weights do not change the work of a convolution).

Then the bound: even if batching made the text encoder and the whole transformer free, an edit
still costs its pre/post-processing and its VAE work at the batched per-image rate, so edits/s
can grow by at most total / (VAE at the batched rate + everything else that is per image).

And, for the release models on an H200, the same question at the roofline (no GPU needed: a model,
docs/spec/transformer.md 6): each transformer step (the source pass and every scale) of a batch of B
costs max(B x its FLOPs / peak, (its weights + B x its KV reads) / bandwidth); batching can only
save the weight streaming of the steps that are bandwidth bound, and the KV caches bound B.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

from demo_artifact import artifact_or_demo

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RELEASES = ("2b-512", "8b-512", "8b-1024")
H200_TFLOPS, H200_TBPS, H200_GIB = 790.0, 4.3, 141 * 1e9 / 2**30  # docs/spec/transformer.md 6; 141 GB of HBM
ROOFLINE_BATCHES = (1, 4, 16)
VAE_STAGES = ("vae_encoder", "vae_decoder")
FREE_STAGES = ("text_encoder", "transformer")  # assumed to cost nothing per edit in a batch (the bound)


def stage_times(art: Path, edits: int) -> dict[str, float]:
    """Median ms per stage of `edits` edits of the demo photo after one warm-up."""
    from varedit_deploy.imaging import SAMPLE_PHOTO
    from varedit_deploy.imaging import load_image
    from varedit_deploy.runtime.pipeline import EditPipeline

    pipe = EditPipeline.from_artifacts(art)
    photo = load_image(SAMPLE_PHOTO)
    pipe.edit(photo, "make the sky purple")
    runs = [pipe.edit(photo, "make the sky purple", seed=i).timings_ms for i in range(edits)]
    pipe.close()
    return {k: statistics.median(r[k] for r in runs) for k in (*FREE_STAGES, *VAE_STAGES, "total")}


def batched_vae_ms(art: Path, batch: int, repeats: int = 3) -> dict[str, dict[int, float]]:
    """Per-image ms of the VAE graphs at batch 1 and `batch` (best of `repeats`), exported with a batch axis."""
    import onnxruntime as ort
    import torch

    from varedit_deploy.artifact import read_manifest
    from varedit_deploy.export.graphs import VAEEncoderGraph
    from varedit_deploy.model.loaded import VAREditModel

    config = read_manifest(art).config
    model = VAREditModel.random(config, seed=0)
    t, sched = config.transformer, config.schedule
    graphs = {"vae_encoder": (VAEEncoderGraph(model), (3, config.image_size, config.image_size)),
              "vae_decoder": (model.vae.decoder, (t.codebook_dim, sched.latent_side, sched.latent_side))}
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    out: dict[str, dict[int, float]] = {}
    for name, (module, shape) in graphs.items():
        buf = io.BytesIO()
        torch.onnx.export(module, (torch.zeros(2, *shape),), buf, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
        session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
        out[name] = {}
        for b in (1, batch):
            x = np.random.default_rng(0).uniform(-1, 1, (b, *shape)).astype(np.float32)
            session.run(None, {"x": x})
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                session.run(None, {"x": x})
                best = min(best, time.perf_counter() - t0)
            out[name][b] = best * 1e3 / b
    return out


def headroom(stages: dict[str, float], vae: dict[str, dict[int, float]], batch: int) -> dict[str, float]:
    """The bound on edits/s gained by batches of `batch` (see the module docstring)."""
    per_image = stages["total"] - sum(stages[k] for k in (*FREE_STAGES, *VAE_STAGES))  # pre/post-processing
    batched = per_image + sum(stages[k] * vae[k][batch] / vae[k][1] for k in VAE_STAGES)
    return {"per_image_ms": per_image, "batched_edit_ms": batched, "max_gain": stages["total"] / batched}


def step_costs(config) -> list[tuple[float, float]]:
    """(FLOPs, KV-cache bytes read in bf16) of the source pass and of every scale step, CFG batch 2 (one request)."""
    from gpu_fast_path import step_flops

    t, sched = config.transformer, config.schedule
    src = sched.source_tokens
    source_pass = 2 * 14 * t.dim * t.dim * t.depth * 2 * src + 4 * src * t.dim * src * t.depth * 2
    row_bytes = 2 * 2 * t.dim * 2  # K and V, 2 CFG rows, bf16, per token and layer
    reads = [0.0] + [row_bytes * ((n + start) + (src + start) * (t.depth - 1))
                     for n, start in zip(sched.tokens, sched.starts)]
    return list(zip([source_pass, *step_flops(config)], reads))


def roofline(name: str) -> dict:
    """Per-edit transformer time at the H200 roofline for each batch size, and the batch the memory holds."""
    from varedit_deploy.memory_plan import kv_cache_bytes, transformer_bytes
    from varedit_deploy.config import from_name

    config = from_name(name)
    weights = transformer_bytes(config, "bf16")
    steps = step_costs(config)

    def edit_ms(b: int) -> float:
        return sum(max(b * f / (H200_TFLOPS * 1e12), (weights + b * kv) / (H200_TBPS * 1e12)) for f, kv in steps) / b * 1e3

    per_request = kv_cache_bytes(config, 2)
    fits = int((H200_GIB * 2**30 - weights) // per_request)
    return {"ms": {b: edit_ms(b) for b in ROOFLINE_BATCHES}, "kv_gib_per_request": per_request / 2**30,
            "max_batch_bf16_kv": fits}


def roofline_report(rows: dict[str, dict]) -> list[str]:
    lines = ["", "## The release models at the H200 roofline (analytic)", "",
             f"Transformer per edit at {H200_TFLOPS:.0f} TFLOP/s bf16 and {H200_TBPS} TB/s (text encoder, VAE and "
             "launch overheads excluded): what batching can gain once the engines reach the roofline.", "",
             "| model | " + " | ".join(f"batch {b} ms/edit" for b in ROOFLINE_BATCHES)
             + f" | gain at {ROOFLINE_BATCHES[-1]} | KV cache per request (bf16) | requests that fit beside the weights |",
             "|---|" + "---:|" * (len(ROOFLINE_BATCHES) + 3)]
    for name, r in rows.items():
        ms = r["ms"]
        lines.append(f"| {name} | " + " | ".join(f"{ms[b]:.1f}" for b in ROOFLINE_BATCHES)
                     + f" | {ms[1] / ms[ROOFLINE_BATCHES[-1]]:.2f}x | {r['kv_gib_per_request']:.2f} GiB"
                     f" | {r['max_batch_bf16_kv']} |")
    return lines


def report(stages, vae, bound, batch: int, machine: str, releases: dict[str, dict]) -> str:
    total = stages["total"]
    lines = [f"# Batching headroom ({machine})", "",
             "`python benchmarks/batch_headroom.py`: one edit's stages on ONNX Runtime (median), then the VAE graphs "
             f"per image at batch 1 and {batch}.", "",
             "| stage | ms per edit | share | per image at batch 1 | per image at batch " f"{batch} | batch gain |",
             "|---|---:|---:|---:|---:|---:|"]
    for k in (*FREE_STAGES, *VAE_STAGES):
        row = f"| {k} | {stages[k]:.1f} | {stages[k] / total:.0%} |"
        row += (f" {vae[k][1]:.1f} ms | {vae[k][batch]:.1f} ms | {vae[k][1] / vae[k][batch]:.2f}x |" if k in vae
                else " - | - | assumed free |")
        lines.append(row)
    lines += [f"| pre/post-processing (per image) | {bound['per_image_ms']:.1f} | {bound['per_image_ms'] / total:.0%} "
              "| - | - | 1.00x |",
              f"| total | {total:.1f} | 100% | | | |", "",
              f"**Upper bound on edits/s gained by batches of {batch}: {bound['max_gain']:.2f}x** (an edit would "
              f"still cost {bound['batched_edit_ms']:.1f} ms of {total:.1f} even with the text encoder and the "
              "transformer free)."]
    lines += roofline_report(releases)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch_headroom.md")
    args = ap.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime CPU"
    with artifact_or_demo(args.artifacts) as art:
        print("timing edits ...", flush=True)
        stages = stage_times(art, args.edits)
        print(f"timing the VAE graphs at batch 1 and {args.batch} ...", flush=True)
        vae = batched_vae_ms(art, args.batch)
    bound = headroom(stages, vae, args.batch)
    releases = {name: roofline(name) for name in RELEASES}
    text = report(stages, vae, bound, args.batch, machine, releases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "batch": args.batch, "stages_ms": stages, "vae_per_image_ms": vae, **bound,
         "h200_roofline": releases}, indent=2) + "\n")
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
