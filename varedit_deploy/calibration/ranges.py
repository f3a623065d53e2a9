"""The range record: every tensor's largest absolute value in the fp32 graphs, on real edits, kept in the artifact.

Random tiny weights never leave fp16's range; trained ones do (Flan-T5's FFN outputs pass 65,504,
image VAEs overflow in fp16). The record is what tells whether fp16 is safe for an artifact's
weights: `build --precision fp16` keeps fp32 every node that reads or writes a value beyond
`FP16_SAFE_MAX` (export/precision.py), or with `--strict-fp16` refuses, naming them.

Every float tensor of the graphs that fp16 lowers is measured (statistics.py: its largest finite
|x|, recorded inside a copy of its graph) on the fp32 artifact's own edits of the calibration photos
and instructions, through the ordinary pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..artifact import Manifest, file_record, read_manifest, write_manifest
from ..errors import ArtifactError
from ..export.precision import FP16_SAFE_MAX, HALF_GRAPHS
from ..fileio import write_text
from .dataset import load_set
from .evaluate import text_source
from .statistics import float_tensors, measuring_backend, record_statistics

RANGES_FILE = "ranges.json"
DEFAULT_EDITS = 4


def record_ranges(artifacts: str | Path, calibration: Path | None = None, edits: int = DEFAULT_EDITS,
                  fixture: Path | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `edits` calibration edits on the fp32 artifact with every lowered graph measured; write the
    record into the artifact (`ranges.json`, listed in its manifest) and return it."""
    manifest = read_manifest(artifacts, verify="full")
    if manifest.precision != "fp32" or manifest.quantization is not None:
        raise ArtifactError(f"artifact {manifest.folder} holds {manifest.precision} graphs"
                            f"{' (quantised)' if manifest.quantization else ''}; ranges are recorded on fp32 graphs: "
                            "export with --precision fp32 and record them there")
    pairs = load_set(calibration).calibration[:edits]
    text = text_source(manifest, fixture)
    wanted = {name: float_tensors(manifest.graph_path(name)) for name in HALF_GRAPHS if manifest.has_graph(name)}
    progress(f"ranges of {', '.join(wanted)} on {len(pairs)} fp32 edits ({', '.join(p.instruction for p in pairs)})")
    with measuring_backend(manifest) as inner:
        found = record_statistics(manifest, inner, wanted, pairs, text, progress=progress)
    maxima = {name: {tensor: float(v[0]) for tensor, v in values.items()} for name, values in found.items()}
    record = {"graphs": {name: {"values": values, "scopes": scope_maxima(values)} for name, values in maxima.items()},
              "edits": [{"image": p.image, "instruction": p.instruction} for p in pairs],
              "fp16_safe_max": FP16_SAFE_MAX}
    store_ranges(manifest, record)
    progress(ranges_summary(record))
    return record


def scope_maxima(values: Mapping[str, float]) -> dict[str, float]:
    """The largest value per module scope ('/blocks.3/ffn/fc2/MatMul_output_0' -> '/blocks.3/ffn/fc2')."""
    scopes: dict[str, float] = {}
    for tensor, value in values.items():
        scope = tensor.rsplit("/", 1)[0] if tensor.startswith("/") else "(graph I/O)"
        scopes[scope] = max(scopes.get(scope, 0.0), value)
    return dict(sorted(scopes.items()))


def ranges_summary(record: dict[str, Any]) -> str:
    """One line per graph: its largest value, where, and how many tensors pass fp16's safe range."""
    lines = []
    for name, graph in record["graphs"].items():
        values = graph["values"]
        worst = max(values, key=values.get)
        over = sum(v > record["fp16_safe_max"] for v in values.values())
        lines.append(f"  {name:<13} max |x| {values[worst]:.3g} at {worst}; {over} of {len(values)} tensors beyond "
                     f"{record['fp16_safe_max']:g} (fp16 keeps their nodes fp32)")
    return "\n".join(lines)


def store_ranges(manifest: Manifest, record: dict[str, Any]) -> None:
    """Write the record into the artifact and list it in the manifest (both written whole or not at all).
    Engines built before are stale from then on: an fp16 build is lowered by the record."""
    path = manifest.folder / RANGES_FILE
    write_text(path, json.dumps(record, indent=1))
    data = {k: v for k, v in manifest.data.items() if k != "schema_version"}
    data["ranges"] = {"file": file_record(manifest.folder, path), "edits": len(record["edits"]),
                      "graphs": sorted(record["graphs"])}
    write_manifest(manifest.folder, data)
