"""What 16-bit KV caches cost: fp16 graphs with 16-bit cache I/O against the same graphs with fp32 cache I/O.

    python benchmarks/cache_precision.py [--fixtures tiny-2b tiny-8b tiny-8b-1024]

For each golden fixture, export its model as fp16 graphs twice: as `export --precision fp16` does
(the KV caches, SAR references and text K/V taken and given in fp16) and with every graph input
and output fp32 (what 16-bit artifacts held before). Both replay the fixture under teacher forcing
with the official noise on ONNX Runtime's CPU provider; the table gives each one's bit agreement
and largest logit error against the official fp32 run, and the two against each other.
Writes benchmarks/results/cache_precision.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

RESULTS = Path(__file__).parent / "results"
FIXTURES = Path(os.environ.get("VAREDIT_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


def replay(artifact: Path, fixture) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import TorchCPUNoise

    pipe = EditPipeline.from_artifacts(artifact)
    run = pipe.generate(text_features=fixture.text_features, pixels=fixture.pixels, sampling=fixture.config.sampling,
                        noise=TorchCPUNoise(fixture.config.sampling.seed), teacher_bits=fixture.teacher_bits(),
                        decode=False)
    pipe.close()
    return run.bits, run.guided_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", nargs="+", default=["tiny-2b", "tiny-8b", "tiny-8b-1024"])
    args = ap.parse_args()

    import varedit_deploy.export.precision as precision
    from varedit_deploy.export.artifacts import export_artifacts
    from varedit_deploy.fixtures import FixtureData
    from varedit_deploy.model.loaded import VAREditModel

    rows = []
    for name in args.fixtures:
        fixture = FixtureData.load(FIXTURES / name)
        expected = [fixture.expected[f"logits_{s}"].reshape(-1, 2) for s in range(fixture.config.schedule.num_scales)]
        official = [b.reshape(-1) for b in fixture.teacher_bits()]
        runs = {}
        with tempfile.TemporaryDirectory() as tmp:
            model = VAREditModel.from_fixture(fixture.folder)
            for label in ("16-bit caches", "fp32 caches"):
                out = Path(tmp) / label.replace(" ", "-")
                if label == "fp32 caches":  # every graph input and output fp32, as before
                    with mock.patch.object(precision, "cache_io", lambda graph, names, io: set()):
                        export_artifacts(model, out, precision="fp16", validate=False, progress=lambda _: None)
                else:
                    export_artifacts(model, out, precision="fp16", validate=False, progress=lambda _: None)
                runs[label] = replay(out, fixture)
        row = {"fixture": name}
        for label, (bits, logits) in runs.items():
            row[label] = {
                "bits_vs_official": float(np.mean(np.concatenate([b.reshape(-1) == o for b, o in zip(bits, official)]))),
                "max_logit_error": float(max(np.max(np.abs(g.reshape(-1, 2) - e)) for g, e in zip(logits, expected))),
            }
        a, b = runs["16-bit caches"], runs["fp32 caches"]
        row["bits_between"] = float(np.mean(np.concatenate([(x == y).reshape(-1) for x, y in zip(a[0], b[0])])))
        row["max_logit_difference_between"] = float(max(np.max(np.abs(x - y)) for x, y in zip(a[1], b[1])))
        rows.append(row)
        print(json.dumps(row))
    lines = [f"# fp16 graphs: 16-bit vs fp32 KV-cache I/O (ONNX Runtime CPU, teacher-forced, official noise)", "",
             f"`python benchmarks/cache_precision.py` on {os.cpu_count()}-core {platform.machine()}.", "",
             "| fixture | bits vs official, 16-bit caches | fp32 caches | max logit error vs official, 16-bit | fp32 | "
             "bits identical between the two | max logit difference between |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, f = r["16-bit caches"], r["fp32 caches"]
        lines.append(f"| {r['fixture']} | {s['bits_vs_official']:.5f} | {f['bits_vs_official']:.5f} | "
                     f"{s['max_logit_error']:.3g} | {f['max_logit_error']:.3g} | {r['bits_between']:.5f} | "
                     f"{r['max_logit_difference_between']:.3g} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_precision.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "cache_precision.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
