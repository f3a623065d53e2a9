"""What the range record finds, and fp16's agreement with fp32 before and after it.

    python benchmarks/fp16_ranges.py [--artifacts ART_FP32 [--edits 1]]

Constructed ranges: tests/test_ranges.py's tiny-2b whose T5 FFN output, VAE decoder and step
residual stream pass 65,504 in fp32 (trained-like; random weights never do). Each lowered graph is
run in true fp16 (onnx's reference evaluator; ONNX Runtime's CPU provider computes fp16 nodes in
fp32 and cannot overflow) on the inputs of a real fp32 edit, lowered three ways: every node fp16
(naive), as `build --precision fp16` lowers without a record (T5's `wo` and residual stream fp32,
as the official load), and with the record. Reports whether the outputs stay finite and their
largest error relative to fp32's largest value.

`--artifacts`: an fp32 release-size export; records its ranges (`varedit-deploy ranges`) if it has
none, and reports each graph's largest value, where, and what an fp16 build would keep fp32.
Writes benchmarks/results/fp16_ranges.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = Path(__file__).parent / "results"


def agreement(reference: np.ndarray, lowered: np.ndarray) -> str:
    lowered = lowered.astype(np.float32)
    if not np.isfinite(lowered).all():
        return f"**not finite** ({np.mean(~np.isfinite(lowered)):.1%} inf/nan)"
    return f"{np.max(np.abs(lowered - reference)) / np.max(np.abs(reference)):.2e}"


def constructed_rows() -> list[str]:
    """The three lowerings of the wide tiny model's text encoder, step and VAE decoder."""
    from test_ranges import _run, _run_fp16, export_wide_artifact, record_calls

    from varedit_deploy.artifact import read_manifest
    from varedit_deploy.export.external_data import lower_graph
    from varedit_deploy.export.precision import out_of_range_nodes, to_half
    from varedit_deploy.model.tiny_text import write_tiny_text_encoder

    rows = []
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy's word for the overflows measured here
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        art = export_wide_artifact(write_tiny_text_encoder(tmp / "t5-source", d_model=256), tmp / "wide")
        m = read_manifest(art)
        feeds = {"text_encoder": {"input_ids": np.array([[5, 9, 7, 12, 30, 1]], np.int64)}, **record_calls(art)}
        for graph, inputs in feeds.items():
            reference = _run(m.graph_path(graph), inputs)[0]
            naive = tmp / f"{graph}-naive.onnx"
            onnx.save(to_half(onnx.load(str(m.graph_path(graph))), "fp16"), str(naive))
            lowered = {"every node fp16": naive}
            for label, ranges in (("build, no record", None), ("build, with the record", m.ranges[graph])):
                lowered[label] = tmp / f"{graph}-{len(lowered)}.onnx"
                lower_graph(m.graph_path(graph), graph, "fp16", m.step_io, lowered[label], ranges)
            cells = [agreement(reference, _run_fp16(path, inputs)[0]) for path in lowered.values()]
            kept = len(out_of_range_nodes(onnx.load(str(m.graph_path(graph)), load_external_data=False), m.ranges[graph]))
            rows.append(f"| {graph} | {max(m.ranges[graph].values()):.3g} | " + " | ".join(cells) + f" | {kept} |")
    return rows


def release_lines(artifacts: Path, edits: int) -> list[str]:
    """The record of a release-size fp32 export: per graph its largest value and the scopes nearest fp16's range."""
    from varedit_deploy.artifact import read_manifest
    from varedit_deploy.calibration.ranges import RANGES_FILE, record_ranges
    from varedit_deploy.export.precision import FP16_SAFE_MAX

    path = artifacts / RANGES_FILE
    started, existed = time.perf_counter(), path.is_file()
    record = json.loads(path.read_text()) if existed else record_ranges(artifacts, edits=edits)
    took = "" if existed else f", recorded in {(time.perf_counter() - started) / 60:.1f} min"
    m = read_manifest(artifacts, verify="quick")
    lines = [f"`{artifacts.name}`: {m.config.name} fp32, random weights, {len(record['edits'])} edit(s) "
             f"({', '.join(e['instruction'] for e in record['edits'])}){took}.", "",
             "| graph | largest \\|x\\| | where | tensors beyond 16,384 | the three largest scopes |",
             "|---|---:|---|---:|---|"]
    for name, graph in record["graphs"].items():
        values, scopes = graph["values"], graph["scopes"]
        worst = max(values, key=values.get)
        top = sorted(scopes.items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"| {name} | {values[worst]:.3g} | `{worst}` | {sum(v > FP16_SAFE_MAX for v in values.values())} "
                     f"of {len(values)} | " + ", ".join(f"`{s}` {v:.3g}" for s, v in top) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", type=Path, help="an fp32 release-size export to record and report")
    ap.add_argument("--edits", type=int, default=1, help="calibration edits for its record, if it has none "
                                                         "(minutes each at 2B)")
    args = ap.parse_args()
    machine = f"{platform.machine()}, {platform.python_version()}"
    lines = ["# fp16 and the range record", "",
             f"`python benchmarks/fp16_ranges.py` ({machine}). Constructed ranges (tests/test_ranges.py's wide "
             "tiny-2b), each graph in true fp16 (onnx's reference evaluator) on the inputs of an fp32 edit: the "
             "largest error of its first output relative to fp32's largest value.", "",
             "| graph | largest \\|x\\| recorded | every node fp16 | build, no record | build, with the record | "
             "nodes the record keeps fp32 |", "|---|---:|---|---|---|---:|"]
    lines += constructed_rows()
    if args.artifacts:
        lines += ["", *release_lines(args.artifacts, args.edits)]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fp16_ranges.md").write_text(text)


if __name__ == "__main__":
    main()
