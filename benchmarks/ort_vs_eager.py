"""ONNX Runtime (CPU provider, OpenVINO) vs the eager PyTorch reference, side by side on one small configuration.

    python benchmarks/ort_vs_eager.py [--model tiny-2b] [--blocks 3] [--rounds 3]
        [--variants eager onnxruntime openvino-exact openvino-fast ...] [--attention fused|decomposed]

All run the same random-weight model, photo, instruction and noise. Each variant runs in its own
fresh process (no thread pool of one spinning while another runs, and a clean peak-RSS reading),
alternating block by block on the noisy machine; per stage we report the median over all timed
rounds. No thread pool spin-waits (ONNX Runtime's sessions are made with allow_spinning 0, and
the children get OMP_WAIT_POLICY=PASSIVE for torch's OpenMP pool): on a shared machine a spinning
pool collapses under oversubscription (an eager tiny-2b edit took 10-14 s instead of 1 s under a
load of 7 on 2 cores). Variants other than the eager reference and the CPU provider also report how far they
are from the CPU provider's fp32 edit: bits identical per scale under teacher forcing (fed the
CPU provider's bits, with the same noise) and running free, and the edited image's PSNR.
OpenVINO's ONNX reader has no `Attention` (opset 23): give `--attention decomposed` to run the
step there. Writes JSON and a Markdown table to benchmarks/results/.
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
# Variant -> ONNX Runtime providers (None: the eager PyTorch reference).
VARIANTS: dict[str, list[str] | None] = {
    "eager": None,
    "onnxruntime": ["cpu"],
    "openvino-exact": ["openvino:mode=exact"],
    "openvino-fast": ["openvino:mode=fast"],
    "openvino-fast-vae": ["openvino:mode=fast,graphs=vae_encoder+vae_decoder"],
    "openvino-fast-decoder": ["openvino:mode=fast,graphs=vae_decoder"],
}


def build(model_name: str, folder: Path, attention: str = "fused"):
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
        export_artifacts(model, art, progress=lambda _: None, attention=attention)
    return model, art


def peak_rss_mib() -> float:
    """VmHWM: unlike ru_maxrss, it is not inherited from the parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def agreement(pipe, photo) -> dict:
    """This pipeline against the CPU provider's fp32 edit of the same artifact, photo and noise."""
    import numpy as np

    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    reference = EditPipeline.from_artifacts(pipe.manifest.folder)
    ref = reference.edit(photo, INSTRUCTION, noise=NumpyNoise(0), record=True)
    free = pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0), record=True)
    forced = pipe.generate(INSTRUCTION, photo, noise=NumpyNoise(0), teacher_bits=ref.loop.bits, decode=False)
    reference.close()

    def share(runs) -> list[float]:
        return [float(np.mean(a == b)) for a, b in zip(runs, ref.loop.bits)]

    bits = [b.size for b in ref.loop.bits]
    mse = np.mean((np.asarray(free.image, np.float64) - np.asarray(ref.image, np.float64)) ** 2)
    return {"teacher_forced": share(forced.bits), "free": share(free.loop.bits),
            "teacher_forced_all": float(np.average(share(forced.bits), weights=bits)),
            "free_all": float(np.average(share(free.loop.bits), weights=bits)),
            "image_psnr_db": float(10 * np.log10(255.0**2 / max(mse, 1e-12)))}


def run_one_variant(which: str, model_name: str, work: Path, rounds: int) -> dict:
    """In a fresh process: a warm-up edit, then `rounds` timed edits (and the agreement, where it applies)."""
    from varedit_deploy.imaging import SAMPLE_PHOTO, load_image
    from varedit_deploy.sampling import NumpyNoise

    photo = load_image(SAMPLE_PHOTO)
    providers = VARIANTS[which]
    extra = {}
    if providers is not None:  # the deployment path: no torch in this process
        import onnxruntime as ort

        from varedit_deploy.runtime.pipeline import EditPipeline

        ort.set_default_logger_severity(3)  # OpenVINO's provider logs warnings through the default logger
        pipe = EditPipeline.from_artifacts(work / "artifacts", providers=providers)

        def once():
            return pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0)).timings_ms

        extra = {"onnxruntime": ort.__version__, "runs_on": pipe.backend.describe(), "notes": pipe.backend.notes}
    else:
        from varedit_deploy.model.edit import edit

        model, _ = build(model_name, work)

        def once():
            return edit(model, photo, INSTRUCTION, noise=NumpyNoise(0)).timings_ms
    once()
    result = {"timings": [once() for _ in range(rounds)], "peak_rss_mib": peak_rss_mib(), **extra}
    if providers is not None and providers != ["cpu"]:
        result["agreement"] = agreement(pipe, photo)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-2b")
    ap.add_argument("--blocks", type=int, default=3, help="alternations of the variants")
    ap.add_argument("--rounds", type=int, default=3, help="timed edits per variant per block")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["eager", "onnxruntime"])
    ap.add_argument("--attention", choices=["fused", "decomposed"], default="fused",
                    help="how the step's attentions are exported (OpenVINO reads only decomposed)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--only", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_one_variant(args.only, args.model, args.work, args.rounds)))
        return

    variants = args.variants
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build(args.model, Path(tmp), args.attention)
        for block in range(args.blocks):
            for which in variants if block % 2 == 0 else variants[::-1]:
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--only", which,
                                      "--work", tmp, "--rounds", str(args.rounds)],
                                     capture_output=True, text=True, check=True,
                                     env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[which] += result.pop("timings")
                peak = max(results.get(which, {}).get("peak_rss_mib", 0.0), result.pop("peak_rss_mib"))
                results[which] = {**result, "peak_rss_mib": peak}
                print(f"block {block + 1}/{args.blocks} {which}: total "
                      f"{statistics.median(t['total'] for t in runs[which][-args.rounds:]):.0f} ms", flush=True)

    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    base = "eager" if "eager" in med else variants[0]
    scales = sorted((k for k in med[base] if k.startswith("scale_")), key=lambda k: int(k.split("_")[1]))
    n = args.blocks * args.rounds
    command = (f"python benchmarks/ort_vs_eager.py --model {args.model} --blocks {args.blocks} --rounds {args.rounds}"
               + (f" --variants {' '.join(variants)}" if variants != ["eager", "onnxruntime"] else "")
               + (f" --attention {args.attention}" if args.attention != "fused" else ""))
    lines = [f"`{command}` on {platform.machine()}, {os.cpu_count()} cores; median of {n} edits per variant, each in "
             "its own process, no thread pool spinning; ratios are the first column's time over each variant's", "",
             "| stage | " + " | ".join(f"{v} (ms)" for v in variants) + " | " +
             " | ".join(f"{base} / {v}" for v in variants if v != base) + " |",
             "|---|" + "---:|" * (2 * len(variants) - 1)]
    for k in STAGES + scales:
        lines.append(f"| {k} | " + " | ".join(f"{med[v][k]:.1f}" for v in variants) + " | " +
                     " | ".join(f"{med[base][k] / med[v][k]:.2f}x" for v in variants if v != base) + " |")
    lines.append("| peak RSS of the process (MiB) | " + " | ".join(f"{results[v]['peak_rss_mib']:.0f}" for v in variants)
                 + " |" + " |" * (len(variants) - 1))
    agreeing = [v for v in variants if "agreement" in results[v]]
    if agreeing:
        lines += ["", "Against the CPU provider's fp32 edit (same artifact, photo, noise): share of identical bits "
                  "per scale, teacher-forced (fed the CPU provider's bits) and running free, and image PSNR", "",
                  "| variant | teacher-forced, per scale | teacher-forced, all bits | free-running, all bits | "
                  "image PSNR (dB) |", "|---|---|---:|---:|---:|"]
        for v in agreeing:
            a = results[v]["agreement"]
            lines.append(f"| {v} | {' '.join(f'{x:.4f}' for x in a['teacher_forced'])} | {a['teacher_forced_all']:.4f} "
                         f"| {a['free_all']:.4f} | {a['image_psnr_db']:.1f} |")
    notes = {v: results[v]["notes"] for v in variants if results[v].get("notes")}
    lines += [""] + [f"- {v}: {note}" for v, vnotes in notes.items() for note in vnotes]
    table = "\n".join(lines).rstrip()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"ort_vs_eager-{args.model}" + ("" if variants == ["eager", "onnxruntime"] else
                                           "-openvino" if any(v.startswith("openvino") for v in variants) else "-variants")
    (args.out / f"{stem}.md").write_text(table + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"model": args.model, "attention": args.attention, "edits_per_variant": n, "median_ms": med,
         "variants": results,
         "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}},
        indent=1))


if __name__ == "__main__":
    main()
