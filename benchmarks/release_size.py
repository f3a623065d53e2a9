"""Release-size export and load: time, peak memory and bytes, with random weights.

    python benchmarks/release_size.py --model 2b-512 --precision fp32 [--work /tmp] [--keep] [--edit]

Runs `varedit-deploy export --random-weights` in a fresh process (its peak RSS is that process's
VmHWM), then records the artifact's bytes by graph against the model's weights at that
precision, `plan --artifacts` beside the estimate, verification times (quick: stamped; full:
every sha256), and `EditPipeline.from_artifacts` in another fresh process (load time, peak RSS,
what of it is file-backed). `--edit` also times one edit (minutes on two cores at 2B).
Writes benchmarks/results/release_size-<model>-<precision>.json and .md; deletes the artifact
unless --keep. Needs free disk of about the weights' size and RAM of about 1.2x (`--no-load`: the
export alone, for models larger than the machine's RAM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CHILD_EXPORT = """
import json, sys
from varedit_deploy.cli import main
rc = main(sys.argv[1:])
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print("PEAK " + json.dumps({"rc": rc, "VmHWM_kB": int(status["VmHWM"].split()[0])}), flush=True)
"""
CHILD_LOAD = """
import json, statistics, sys, time
t0 = time.perf_counter()
from varedit_deploy.runtime.pipeline import EditPipeline
config = dict(kv.split("=", 1) for kv in sys.argv[3:])
pipe = EditPipeline.from_artifacts(sys.argv[1], session_config=config)
out = {"load_s": time.perf_counter() - t0}
def status():
    s = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    return {k: int(s[k].split()[0]) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
out["after_load_kB"] = status()
loop = pipe.loop  # scale 0 of `step`: one token, so the time is all weight reading (placeholder inputs)
_, text_k, text_v = loop.text_buffers(8)
step, io, times = pipe.backend.graph("step"), loop._step_io(0, text_k, text_v), []
for buf in io[0].values():  # what scale 0 reads: the source rows of the caches among them
    buf[...] = 0.01
for _ in range(3):
    t = time.perf_counter()
    step.run(*io)
    times.append(time.perf_counter() - t)
out["step_scale0_s"], out["after_step_kB"] = statistics.median(times), status()
if sys.argv[2] == "edit":
    from varedit_deploy.imaging import SAMPLE_PHOTO
    from varedit_deploy.imaging import load_image
    from varedit_deploy.sampling import NumpyNoise
    t1 = time.perf_counter()
    result = pipe.edit(load_image(SAMPLE_PHOTO), "make the sky purple", noise=NumpyNoise(0))
    out["edit_s"], out["edit_timings_s"] = time.perf_counter() - t1, result.timings
    out["after_edit_kB"] = status()
print("PEAK " + json.dumps(out), flush=True)
"""


def run_child(code: str, args: list[str], log) -> dict:
    """Run `code` in a fresh interpreter, echo its output, return its final PEAK record."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    record = None
    for line in proc.stdout:
        if line.startswith("PEAK "):
            record = json.loads(line[5:])
        else:
            log(line.rstrip())
    if proc.wait() != 0 or record is None:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(args)}")
    return record


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return f"{os.cpu_count()}-core {platform.machine()} ({cpu}), {mem / 2**20:.0f} GiB RAM, Python {platform.python_version()}"


def weights_bytes(manifest) -> dict[str, int]:
    """The model's weights at the export precision (what the artifact should hold, once)."""
    from varedit_deploy.memory_plan import BYTES

    b = BYTES[manifest.precision]
    return {part: info["parameters"] * b for part, info in manifest.weights.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="2b-512")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--work", type=Path, default=Path("/tmp"), help="where the artifact is written")
    ap.add_argument("--keep", action="store_true", help="keep the artifact")
    ap.add_argument("--edit", action="store_true", help="also time one edit on ONNX Runtime")
    ap.add_argument("--no-load", action="store_true", help="export and measure the artifact only (8B in fp32 holds "
                                                          "more weights than a 24 GiB machine can load)")
    args = ap.parse_args()

    from varedit_deploy.artifact import read_manifest
    from varedit_deploy.config import from_name
    from varedit_deploy.memory_plan import artifact_data, artifact_table, plan

    art = args.work / f"release-size-{args.model}-{args.precision}"
    log = print
    log(f"exporting {args.model} ({args.precision}, random weights) to {art}")
    t0 = time.perf_counter()
    exported = run_child(CHILD_EXPORT, ["export", "--random-weights", "--model", args.model, "--precision",
                                        args.precision, "--out", str(art)], log)
    export_s = time.perf_counter() - t0
    manifest = read_manifest(art, verify="size")
    graphs = {name: sum(f["bytes"] for f in g["files"]) for name, g in manifest.graphs.items()}
    on_disk = sum(graphs.values()) + sum(f["bytes"] for f in manifest.companion_files())
    weights = weights_bytes(manifest)

    timings = {}
    for mode in ("quick", "full", "quick"):  # the second quick: after full re-stamped (same as after export)
        t = time.perf_counter()
        read_manifest(art, verify=mode)
        timings[mode] = time.perf_counter() - t
    data = artifact_data(manifest, [])
    table = artifact_table(data)
    log(table)
    # `plan --artifacts` (the artifact's own weights and cache types) against `plan --model`, T5 aside (a
    # random-weight export carries a tiny T5): the estimate must hold within 5 %
    estimate = plan(from_name(args.model), args.precision, 1.0, 77).t5_on_cpu
    measured = data["runs"][0]["total_t5_on_cpu_gib"]
    loaded = mapped = None
    if args.precision != "bf16" and not args.no_load:  # ONNX Runtime's CPU provider has no bf16 kernels
        log("loading the pipeline (ONNX Runtime)")
        loaded = run_child(CHILD_LOAD, [str(art), "edit" if args.edit else "load"], log)
        log("loading it again without weight prepacking (weights stay memory-mapped)")
        mapped = run_child(CHILD_LOAD, [str(art), "load", "session.disable_prepacking=1"], log)

    result = {
        "model": args.model, "precision": args.precision,
        "machine": machine(),
        "command": "python benchmarks/release_size.py " + " ".join(sys.argv[1:]),
        "export_seconds": round(export_s, 1), "export_peak_rss_gb": exported["VmHWM_kB"] * 1024 / 1e9,
        "artifact_bytes": on_disk, "graph_bytes": graphs, "weights_bytes": weights,
        "artifact_over_weights": on_disk / sum(weights.values()),
        "verify_seconds": {"quick": round(timings["quick"], 3), "full": round(timings["full"], 1)},
        "plan": table, "plan_estimate_t5_on_cpu_gib": estimate, "plan_artifact_t5_on_cpu_gib": measured,
        "plan_artifact_over_estimate": measured / estimate,
        "validation": {n: g.get("validation", "compared") for n, g in manifest.graphs.items()},
    }
    if loaded is not None:
        result.update({
            "load_seconds": round(loaded["load_s"], 1),
            "load_peak_rss_gb": loaded["after_load_kB"]["VmHWM"] * 1024 / 1e9,
            "load_rss_kB": loaded["after_load_kB"], "step_scale0_seconds": round(loaded["step_scale0_s"], 2),
            "unpacked": {"load_seconds": round(mapped["load_s"], 1),
                         "load_peak_rss_gb": mapped["after_load_kB"]["VmHWM"] * 1024 / 1e9,
                         "load_rss_kB": mapped["after_load_kB"],
                         "step_scale0_seconds": round(mapped["step_scale0_s"], 2),
                         "after_step_rss_kB": mapped["after_step_kB"]}})
    if args.edit and loaded is not None:
        result.update(edit_seconds=round(loaded["edit_s"], 1), edit_timings_s=loaded["edit_timings_s"],
                      edit_peak_rss_gb=loaded["after_edit_kB"]["VmHWM"] * 1024 / 1e9)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"release_size-{args.model}-{args.precision}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    log(markdown(result))
    if not args.keep:
        shutil.rmtree(art)


def markdown(r: dict) -> str:
    gb = 1e9
    w = sum(r["weights_bytes"].values())
    lines = [f"# Release-size export and load: {r['model']} {r['precision']} (random weights)", "",
             f"`{r['command']}` on {r['machine']}.", "",
             "| | value |", "|---|---:|",
             f"| export time | {r['export_seconds'] / 60:.1f} min |",
             f"| export peak RSS | {r['export_peak_rss_gb']:.2f} GB |",
             f"| model weights at {r['precision']} | {w / gb:.2f} GB |",
             f"| artifact on disk | {r['artifact_bytes'] / gb:.2f} GB ({r['artifact_over_weights']:.3f}x the weights) |",
             f"| verify quick (stamped) / full (every sha256) | {r['verify_seconds']['quick']:.3f} s / "
             f"{r['verify_seconds']['full']:.1f} s |"]
    if "load_seconds" in r:
        u = r["unpacked"]
        lines += [
            f"| pipeline load time | {r['load_seconds']:.1f} s |",
            f"| pipeline load peak RSS | {r['load_peak_rss_gb']:.2f} GB ({r['load_peak_rss_gb'] * gb / w:.2f}x the weights) |",
            f"| `step` at scale 0 (one token: reading every weight) | {r['step_scale0_seconds']:.2f} s |",
            f"| without prepacking (`session.disable_prepacking=1`): load time / peak RSS | "
            f"{u['load_seconds']:.1f} s / {u['load_peak_rss_gb']:.2f} GB |",
            f"| without prepacking: `step` at scale 0 / RSS after it, with the source rows of the KV cache (of which file-backed) | "
            f"{u['step_scale0_seconds']:.2f} s / {u['after_step_rss_kB']['VmRSS'] * 1024 / gb:.2f} GB "
            f"({u['after_step_rss_kB']['RssFile'] * 1024 / gb:.2f} GB) |"]
    else:
        why = ("`--no-load` (an fp32 model larger than this machine's RAM)" if r["precision"] != "bf16" else
               "ONNX Runtime's CPU provider has no bf16 kernels (TensorRT loads bf16 artifacts on a GPU)")
        lines.append(f"| pipeline load | not measured: {why} |")
    if "edit_seconds" in r:
        lines.append(f"| one edit (ONNX Runtime) / peak RSS | {r['edit_seconds']:.0f} s / "
                     f"{r['edit_peak_rss_gb']:.2f} GB |")
    lines.append(f"| `plan --artifacts` vs `plan --model` peak, T5 on the CPU | {r['plan_artifact_t5_on_cpu_gib']:.2f} GiB vs "
                 f"{r['plan_estimate_t5_on_cpu_gib']:.2f} GiB ({r['plan_artifact_over_estimate']:.3f}x) |")
    lines += ["", "| graph | bytes on disk |", "|---|---:|"]
    lines += [f"| {n} | {b / 1e6:,.1f} MB |" for n, b in sorted(r["graph_bytes"].items(), key=lambda kv: -kv[1])]
    lines += ["", "Weights by part: " + ", ".join(f"{k} {v / gb:.3f} GB" for k, v in r["weights_bytes"].items()),
              "", "```", r["plan"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
