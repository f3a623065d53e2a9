"""ONNX Runtime loop vs the eager PyTorch reference, side by side on one small configuration.

    python benchmarks/ort_vs_eager.py [--model tiny-2b] [--blocks 3] [--rounds 3]

Both run the same random-weight model, photo, instruction and noise. Each backend runs in its
own fresh process (no thread pool of one spinning while the other runs, and a clean peak-RSS
reading), alternating block by block on the noisy machine; per stage we report the median
over all timed rounds. Writes JSON and a Markdown table to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ["text_encoder", "vae_encoder", "transformer", "vae_decoder", "total"]
INSTRUCTION = "make the sky purple"
BACKENDS = ("eager", "onnxruntime")


def build(model_name: str, folder: Path):
    """The random-weight model with a tiny T5, and its exported artifact (made once per run)."""
    from varedit_deploy.config import from_name
    from varedit_deploy.export.artifacts import export_artifacts
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.model.tiny_text import write_tiny_text_encoder

    config = from_name(model_name)
    model = VAREditModel.random(config, seed=0)
    text_dir = folder / "t5"
    if not (text_dir / "config.json").exists():
        write_tiny_text_encoder(text_dir, config.transformer.text_channels)
    model.attach_text_encoder(text_dir, "fp32")
    art = folder / "artifacts"
    if not (art / "manifest.json").exists():
        export_artifacts(model, art, progress=lambda _: None)
    return model, art


def peak_rss_mib() -> float:
    """VmHWM: unlike ru_maxrss, it is not inherited from the parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_one_backend(which: str, model_name: str, work: Path, rounds: int) -> dict:
    """In a fresh process: a warm-up edit, then `rounds` timed edits."""
    from varedit_deploy.imaging import SAMPLE_PHOTO
    from varedit_deploy.imaging import load_image
    from varedit_deploy.sampling import NumpyNoise

    photo = load_image(SAMPLE_PHOTO)
    if which == "onnxruntime":  # the deployment path: no torch in this process
        from varedit_deploy.runtime.pipeline import EditPipeline

        pipe = EditPipeline.from_artifacts(work / "artifacts")

        def once():
            return pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0)).timings_ms
    else:
        from varedit_deploy.model.edit import edit

        model, _ = build(model_name, work)

        def once():
            return edit(model, photo, INSTRUCTION, noise=NumpyNoise(0)).timings_ms
    once()
    return {"timings": [once() for _ in range(rounds)], "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-2b")
    ap.add_argument("--blocks", type=int, default=3, help="alternations of the two backends")
    ap.add_argument("--rounds", type=int, default=3, help="timed edits per backend per block")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--only", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_one_backend(args.only, args.model, args.work, args.rounds)))
        return

    runs: dict[str, list[dict[str, float]]] = {b: [] for b in BACKENDS}
    peak: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build(args.model, Path(tmp))
        for block in range(args.blocks):
            for which in BACKENDS if block % 2 == 0 else BACKENDS[::-1]:
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--only", which,
                                      "--work", tmp, "--rounds", str(args.rounds)],
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[which] += result["timings"]
                peak[which] = max(peak.get(which, 0.0), result["peak_rss_mib"])
                print(f"block {block + 1}/{args.blocks} {which}: total "
                      f"{statistics.median(t['total'] for t in result['timings']):.0f} ms", flush=True)

    med = {b: {k: statistics.median(r[k] for r in v) for k in v[0]} for b, v in runs.items()}
    scales = sorted((k for k in med["eager"] if k.startswith("scale_")), key=lambda k: int(k.split("_")[1]))
    n = args.blocks * args.rounds
    lines = [f"`python benchmarks/ort_vs_eager.py --model {args.model} --blocks {args.blocks} --rounds {args.rounds}`"
             f" on {platform.machine()}, {os.cpu_count()} cores; median of {n} edits per backend, each backend in "
             "its own process", "",
             "| stage | eager PyTorch (ms) | ONNX Runtime (ms) | eager / ORT |", "|---|---:|---:|---:|"]
    for k in STAGES + scales:
        e, o = med["eager"][k], med["onnxruntime"][k]
        lines.append(f"| {k} | {e:.1f} | {o:.1f} | {e / o:.2f}x |")
    lines.append(f"| peak RSS of the process (MiB) | {peak['eager']:.0f} | {peak['onnxruntime']:.0f} | |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ort_vs_eager-{args.model}.md").write_text(table + "\n")
    (args.out / f"ort_vs_eager-{args.model}.json").write_text(json.dumps(
        {"model": args.model, "edits_per_backend": n, "median_ms": med, "peak_rss_mib": peak,
         "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}},
        indent=1))


if __name__ == "__main__":
    main()
