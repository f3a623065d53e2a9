"""Writing an artifact's graphs for `quantize`: saved beside their weights, copied, and their manifest entries."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import Manifest, file_record
from ..export.onnx_export import EXTERNAL_DATA_BYTES, tensorrt_support
from ..export.opsets import graph_opset
from .ptq import stored_bytes


def save_graph(model, path: Path) -> list[Path]:
    """Write a graph, its weights beside it in `<name>.data` when large (as `export` does)."""
    import onnx

    if stored_bytes(model)["weights"] > EXTERNAL_DATA_BYTES:
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


def graph_entry(folder: Path, files: list[Path], old: dict[str, Any], model, precision: str,
                quantized: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest entry of a rewritten graph: files, I/O types, opset and operators of what was written,
    and its weights' bytes as stored (`plan --artifacts` reads them): the old entry's, scaled as the files
    shrank (weights and constants alike; at release size the constants, RoPE tables and the like, are a
    few MB of GBs, so the figure is the weights' own)."""
    import onnx

    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    io = {k: [{**spec, "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(types[spec["name"]])).name}
              for spec in old[k]] for k in ("inputs", "outputs")}
    ops = Counter(n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx"))
    records = [file_record(folder, p) for p in files]
    ratio = sum(r["bytes"] for r in records) / max(sum(f["bytes"] for f in old["files"]), 1)
    weights = {**old["weights"], "bytes": round(old["weights"]["bytes"] * ratio),
               "by_module": {k: round(v * ratio) for k, v in old["weights"]["by_module"].items()}}
    entry = {**old, **io, "files": records, "precision": precision, "weights": weights,
             "opset": graph_opset(model),
             "ops": dict(sorted(ops.items())), **tensorrt_support(ops)}
    entry.pop("max_abs_error_vs_torch", None)  # measured on the fp32 graph, not this one
    if quantized is not None:
        entry["quantized"] = quantized
    return entry


def copy_files(manifest: Manifest, records: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Copy an artifact's files (manifest records) into `folder`; return their new records."""
    for rec in records:
        (folder / rec["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.folder / rec["path"], folder / rec["path"])
    return [file_record(folder, folder / rec["path"]) for rec in records]
