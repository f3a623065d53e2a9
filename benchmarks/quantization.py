"""fp32 vs INT8 (W8A8) vs INT4 weight-only artifacts on ONNX Runtime's CPU provider, side by side.

    python benchmarks/quantization.py [--model tiny-2b] [--width 1024] [--blocks 2] [--rounds 3]

Exports a random-weight model (`--width` widens its transformer: the tiny presets are 64 wide,
where no matrix product is big enough to gain from int8), quantises it with
`varedit-deploy quantize --high-precision fp32` (the CPU has no fast fp16; the default search
and budget), then times the same edits on each artifact, each in its own fresh process,
alternating block by block: per graph and end to end (medians), peak RSS, and the accuracy the
quantised artifacts report. Then it profiles the `step` graph with ONNX Runtime's profiler on
inputs recorded from a real edit, to show where its time goes. Writes JSON and Markdown to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from ort_vs_eager import peak_rss_mib

ARTIFACTS = ("fp32", "int8", "int4")
STAGES = ["text_encoder", "vae_encoder", "text_condition", "source_pass", "step", "sample", "next_input",
          "vae_decoder", "transformer", "total"]
INSTRUCTION = "make the sky purple"
PROFILE_PASSES = 5


def config_for(model: str, width: int | None):
    from varedit_deploy.config import from_name

    config = from_name(model)
    if width is None:
        return config
    t = config.transformer
    return dataclasses.replace(config, name=f"{model}-w{width}",
                               transformer=dataclasses.replace(t, dim=width, heads=width // t.head_dim))


def prepare(config, work: Path, calibration_edits: int, held_out: int, samples_per_scale: int) -> dict[str, Path]:
    """Export the fp32 artifact and quantise it twice (once per `work` folder: kept ones are reused)."""
    from varedit_deploy.calibration.quantize import QuantizeOptions, quantize_artifacts
    from varedit_deploy.export.artifacts import export_artifacts
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.model.tiny_text import write_tiny_text_encoder

    folders = {a: work / a for a in ARTIFACTS}
    if all((f / "manifest.json").is_file() for f in folders.values()):
        return folders
    model = VAREditModel.random(config, seed=0)
    model.attach_text_encoder(write_tiny_text_encoder(work / "t5", config.transformer.text_channels), "fp32")
    export_artifacts(model, folders["fp32"], progress=lambda _: None,
                     source={"command": f"benchmarks/quantization.py --random-weights ({config.name})"})
    for mode in ("int8", "int4"):
        print(f"quantising {mode} ...", flush=True)
        quantize_artifacts(folders["fp32"], work / mode, QuantizeOptions(
            mode=mode, high_precision="fp32", calibration_edits=calibration_edits, held_out=held_out,
            samples_per_scale=samples_per_scale),
            command=f"quantize --mode {mode} --high-precision fp32", progress=lambda m: None)
    return folders


def time_one(folder: Path, rounds: int) -> dict:
    """In a fresh process: a warm-up edit, then `rounds` timed edits."""
    from varedit_deploy.imaging import SAMPLE_PHOTO
    from varedit_deploy.imaging import load_image
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    photo = load_image(SAMPLE_PHOTO)
    pipe = EditPipeline.from_artifacts(folder)
    pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0))
    return {"timings": [pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0)).timings for _ in range(rounds)],
            "peak_rss_mib": peak_rss_mib()}


def profile_step(folders: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Milliseconds per operator type in each artifact's `step` graph over one edit's seven calls (ORT
    profiler). The sessions share one process and take turns pass by pass, so the machine's other
    load falls on both alike; per operator type the median pass is kept."""
    import onnxruntime as ort

    from varedit_deploy.artifact import read_manifest
    from varedit_deploy.calibration.backends import Recording, RecordingBackend
    from varedit_deploy.imaging import SAMPLE_PHOTO
    from varedit_deploy.imaging import load_image
    from varedit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from varedit_deploy.runtime.pipeline import EditPipeline

    manifest = read_manifest(folders["fp32"])
    recording = Recording(per_shape=1, per_graph=64)
    EditPipeline(manifest, RecordingBackend(OnnxRuntimeBackend(manifest), recording)).edit(
        load_image(SAMPLE_PHOTO), INSTRUCTION, seed=0)
    calls = recording.samples["step"]
    sessions = {}
    for name, folder in folders.items():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / "step_profile")
        sessions[name] = ort.InferenceSession(str(read_manifest(folder).graph_path("step")), options,
                                              providers=["CPUExecutionProvider"])
    for _ in range(PROFILE_PASSES):
        for session in sessions.values():
            for sample in calls:
                session.run(None, sample)
    profiles = {}
    for name, session in sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        per_call = len(runs) // (len(calls) * PROFILE_PASSES)
        assert per_call * len(calls) * PROFILE_PASSES == len(runs), "every call runs every node once"
        per_pass: dict[str, list[float]] = defaultdict(lambda: [0.0] * PROFILE_PASSES)
        for i, e in enumerate(runs):
            per_pass[e["args"]["op_name"]][i // (per_call * len(calls))] += e["dur"] / 1e3
        profiles[name] = dict(sorted(((op, statistics.median(v)) for op, v in per_pass.items()), key=lambda kv: -kv[1]))
    return profiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-2b")
    ap.add_argument("--width", type=int, help="transformer width (default: the preset's)")
    ap.add_argument("--blocks", type=int, default=2, help="alternations of the three artifacts")
    ap.add_argument("--rounds", type=int, default=3, help="timed edits per artifact per block")
    ap.add_argument("--calibration-edits", type=int, default=8)
    ap.add_argument("--held-out", type=int, default=4)
    ap.add_argument("--samples-per-scale", type=int, default=8, help="calibration inputs recorded per scale")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--work", type=Path, help="keep the artifacts in this folder and reuse them on the next run")
    ap.add_argument("--only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--profile", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(time_one(args.only, args.rounds)))
        return
    if args.profile:
        print(json.dumps(profile_step(dict(zip(("fp32", "int8"), args.profile)))))
        return

    config = config_for(args.model, args.width)
    runs: dict[str, list[dict[str, float]]] = {a: [] for a in ARTIFACTS}
    peak: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = prepare(config, args.work or Path(tmp), args.calibration_edits, args.held_out,
                          args.samples_per_scale)
        reports = {m: json.loads((folders[m] / "quantization_report.json").read_text()) for m in ("int8", "int4")}
        for block in range(args.blocks):
            for which in ARTIFACTS if block % 2 == 0 else ARTIFACTS[::-1]:
                out = subprocess.run([sys.executable, __file__, "--only", str(folders[which]), "--rounds",
                                      str(args.rounds)], capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[which] += result["timings"]
                peak[which] = max(peak.get(which, 0.0), result["peak_rss_mib"])
                print(f"block {block + 1}/{args.blocks} {which}: total "
                      f"{statistics.median(t['total'] for t in result['timings']) * 1e3:.0f} ms", flush=True)
        out = subprocess.run([sys.executable, __file__, "--profile", str(folders["fp32"]), str(folders["int8"])],
                             capture_output=True, text=True, check=True)
        profiles = json.loads(out.stdout.strip().splitlines()[-1])

    med = {a: {k: statistics.median(r[k] for r in v) * 1e3 for k in STAGES} for a, v in runs.items()}
    n = args.blocks * args.rounds
    command = (f"python benchmarks/quantization.py --model {args.model}" + (f" --width {args.width}" if args.width else "")
               + f" --blocks {args.blocks} --rounds {args.rounds} --calibration-edits {args.calibration_edits} "
               f"--held-out {args.held_out} --samples-per-scale {args.samples_per_scale}")
    lines = [f"`{command}` on {platform.machine()}, {os.cpu_count()} cores, onnxruntime CPU; {config.name} "
             f"(width {config.transformer.dim}, depth {config.transformer.depth}), random weights; median of {n} "
             "edits per artifact, each artifact in its own process", "",
             "| stage (ms) | fp32 | int8 (W8A8) | int4 (weight-only) | fp32 / int8 | fp32 / int4 |",
             "|---|---:|---:|---:|---:|---:|"]
    for k in STAGES:
        f, i8, i4 = (med[a][k] for a in ARTIFACTS)
        lines.append(f"| {k} | {f:.1f} | {i8:.1f} | {i4:.1f} | {f / i8:.2f}x | {f / i4:.2f}x |")
    lines.append(f"| peak RSS (MiB) | {peak['fp32']:.0f} | {peak['int8']:.0f} | {peak['int4']:.0f} | | |")
    for graph in ("step",):  # the source pass runs the step graph
        w8, w4 = reports["int8"]["weight_bytes"][graph], reports["int4"]["weight_bytes"][graph]
        lines.append(f"| {graph} weights (MB) | {w8['fp32'] / 1e6:.2f} | {w8['artifact'] / 1e6:.2f} | "
                     f"{w4['artifact'] / 1e6:.2f} | {w8['fp32'] / w8['artifact']:.2f}x | {w4['fp32'] / w4['artifact']:.2f}x |")
    lines += ["", "| accuracy vs fp32 (held-out edits) | int8 | int4 |", "|---|---:|---:|"]
    for key, label in (("bit_agreement", "teacher-forced bits"), ("image_psnr_db", "free-running image PSNR (dB)"),
                       ("image_ssim", "free-running image SSIM")):
        lines.append(f"| {label} | {reports['int8'][key]:.4f} | {reports['int4'][key]:.4f} |")
    lines.append(f"| layer groups kept in high precision by the search | "
                 f"{len(reports['int8']['sensitivity']['kept_in_high_precision'])} / {len(reports['int8']['sensitivity']['ranking'])} | "
                 f"{len(reports['int4']['sensitivity']['kept_in_high_precision'])} / {len(reports['int4']['sensitivity']['ranking'])} |")
    ops = sorted(set(profiles["fp32"]) | set(profiles["int8"]), key=lambda o: -max(profiles["fp32"].get(o, 0),
                                                                                   profiles["int8"].get(o, 0)))
    lines += ["", "`step` graph, one edit's seven calls, ONNX Runtime profiler (ms per operator type; both sessions "
              f"in one process taking turns, median of {PROFILE_PASSES} passes):", "",
              "| operator | fp32 | int8 |", "|---|---:|---:|"]
    lines += [f"| {o} | {profiles['fp32'].get(o, 0):.2f} | {profiles['int8'].get(o, 0):.2f} |" for o in ops[:12]]
    lines.append(f"| all | {sum(profiles['fp32'].values()):.2f} | {sum(profiles['int8'].values()):.2f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quantization-{config.name}.md").write_text(table + "\n")
    (args.out / f"quantization-{config.name}.json").write_text(json.dumps(
        {"model": config.name, "command": command, "edits_per_artifact": n, "median_ms": med, "peak_rss_mib": peak,
         "step_profile_ms": profiles, "reports": reports,
         "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}},
        indent=1))


if __name__ == "__main__":
    main()
