"""Release-size quantisation: time, peak memory, bytes and agreement, on an exported random-weight artifact.

    python benchmarks/release_quantize.py --artifacts /tmp/rs/art-2b-512-fp32 --mode int4 \
        [--kv-cache int8] [--calibration-edits 2] [--calibration-scales 6] [--held-out 2] [--report-scales 6] \
        [--work /tmp/rs] [--keep]

Runs `varedit-deploy quantize` in a fresh process (its peak RSS: that process's VmHWM, with how much
of the resident memory was file-backed at the end), then records the quantised artifact's bytes per
graph against the source's and against the same weights in bf16, the report's agreement, and
`plan --artifacts` of the result. Writes benchmarks/results/release_quantize-<model>-<mode>[-kv8].json
and .md; deletes the quantised artifact unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from release_size import CHILD_EXPORT, RESULTS, machine, run_child


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--mode", required=True, choices=["int4", "int8", "fp8"])
    ap.add_argument("--kv-cache", choices=["int8"])
    ap.add_argument("--calibration-edits", type=int, default=2)
    ap.add_argument("--calibration-scales", type=int)
    ap.add_argument("--held-out", type=int, default=2)
    ap.add_argument("--report-scales", type=int)
    ap.add_argument("--work", type=Path, default=Path("/tmp"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from varedit_deploy.artifact import read_manifest
    from varedit_deploy.memory_plan import artifact_data

    source = read_manifest(args.artifacts, verify="quick")
    name = f"{source.config.name}-{args.mode}{'-kv8' if args.kv_cache else ''}"
    out = args.work / f"release-quantize-{name}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["quantize", "--artifacts", str(args.artifacts), "--out", str(out), "--mode", args.mode,
            "--calibration-edits", str(args.calibration_edits), "--held-out", str(args.held_out)]
    for flag, value in (("--kv-cache", args.kv_cache), ("--calibration-scales", args.calibration_scales),
                        ("--report-scales", args.report_scales)):
        if value is not None:
            argv += [flag, str(value)]
    t0 = time.perf_counter()
    peak = run_child(CHILD_EXPORT, argv, print)
    seconds = time.perf_counter() - t0
    result = read_manifest(out, verify="quick")
    report = json.loads((out / "quantization_report.json").read_text())
    plan = subprocess.run([sys.executable, "-m", "varedit_deploy.cli", "plan", "--artifacts", str(out)],
                          capture_output=True, text=True, check=True).stdout
    bf16 = {part: info["parameters"] * 2 for part, info in source.weights.items()}
    record = {
        "machine": machine(), "command": "varedit-deploy " + " ".join(argv), "model": source.config.name,
        "source_precision": source.precision, "mode": args.mode, "kv_cache": args.kv_cache,
        "quantize_s": seconds, "peak_rss_gb": peak["VmHWM_kB"] / 1e6,
        "graph_bytes": {g: {"source": source.graph_bytes(g), "quantized": result.graph_bytes(g)} for g in source.graphs},
        "artifact_bytes": sum(map(result.graph_bytes, result.graphs)),
        "weights_bf16_bytes": bf16, "transformer_bytes": result.graph_bytes("step") + result.graph_bytes("text_cond"),
        "report": {k: report.get(k) for k in ("agreement", "not_measured", "calibration_set", "weights_made_on")},
        "plan": artifact_data(result, []), "plan_text": plan,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"release_quantize-{name}.json").write_text(json.dumps(record, indent=1))
    (RESULTS / f"release_quantize-{name}.md").write_text(markdown(record))
    print(markdown(record))
    if not args.keep:
        shutil.rmtree(out)


def markdown(r: dict) -> str:
    t_bf16 = r["weights_bf16_bytes"]["transformer"]
    a = r["report"]["agreement"]
    lines = [f"# Release-size quantisation: {r['model']} {r['mode']}{' + int8 KV cache' if r['kv_cache'] else ''} "
             f"from {r['source_precision']} (random weights)", "",
             f"`{r['command']}` on {r['machine']}.", "",
             "| | value |", "|---|---:|",
             f"| quantize time | {r['quantize_s'] / 60:.1f} min |",
             f"| quantize peak RSS | {r['peak_rss_gb']:.2f} GB |",
             f"| transformer (step + text_cond) | {r['transformer_bytes'] / 1e9:.2f} GB "
             f"({r['transformer_bytes'] / t_bf16:.3f}x its bf16 weights, {t_bf16 / 1e9:.2f} GB) |",
             f"| artifact | {r['artifact_bytes'] / 1e9:.2f} GB |", ""]
    if a:
        scales = range(len(a["per_scale_bit_agreement"]))
        lines += [f"Teacher-forced agreement with the {r['source_precision']} source, {a['held_out_edits']} held-out "
                  f"edits ({a['bits_compared']:,} bits; random weights, not trained ones):", "",
                  "| scale | " + " | ".join(map(str, scales)) + " | all |", "|---" * (len(scales) + 2) + "|",
                  "| bits | " + " | ".join(f"{x:.4f}" for x in a["per_scale_bit_agreement"]) + f" | {a['bit_agreement']:.4f} |",
                  "| logit KL (nats/bit) | " + " | ".join(f"{x:.1e}" for x in a["per_scale_logit_kl"]) + " | |", ""]
    else:
        lines += [f"Agreement not measured: {r['report']['not_measured']}.", ""]
    lines += ["| graph | source MB | quantised MB |", "|---|---:|---:|"]
    lines += [f"| {g} | {b['source'] / 1e6:,.1f} | {b['quantized'] / 1e6:,.1f} |" for g, b in r["graph_bytes"].items()
              if b["source"] > 1e6]
    return "\n".join(lines + ["", "```", r["plan_text"].rstrip(), "```", ""])


if __name__ == "__main__":
    main()
