"""`varedit-deploy export`: a model -> a self-describing artifact folder of ONNX graphs.

Graph by graph, and tensor by tensor inside each graph: every graph is traced without its
weights, then each weight is read (memory-mapped checkpoint, drawn at random, or the model in
memory), converted and written, so the export holds about one tensor of the model at a time.
`--precision fp16|bf16` stores half-precision graphs (weights and matrix work in 16 bits;
norms, softmax, reductions and all graph I/O in fp32); fp32 artifacts can also be lowered at
engine build time instead.

The folder is written under a temporary name and renamed when complete, so an interrupted
export never leaves something that looks like an artifact; what it may replace, and which
built engines it keeps, is decided in `destination.py`.
"""

from __future__ import annotations

import platform
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifact import file_record, read_manifest, schedule_record, write_manifest, write_stamp
from ..errors import ConfigError
from ..fileio import atomic_dir
from ..graph_io import StepIO
from ..model.loaded import VAREditModel
from ..precisions import GRAPH_PRECISIONS
from ..runtime.onnxruntime_backend import OnnxRuntimeBackend
from ..runtime.preview_fit import fit_preview, store_preview
from .attention_nodes import ATTENTION_FORMS
from .destination import carry_engines, check_export_target
from .graphs import graph_specs
from .onnx_export import EXTERNAL_DATA_BYTES, VALIDATE_BYTES, export_graph
from .source import ExportSource
from .tokenizer_graph import write_tokenizer_graph

TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_BLOCK = re.compile(r"blocks?\.(\d+)\.")  # ours (blocks.i) and T5's (encoder.block.i)
LONG_GRAPH_BYTES = 256 * 2**20  # graphs with more weights than this report their progress per block


def export_artifacts(
    model: VAREditModel | ExportSource,
    out: str | Path,
    precision: str = "fp32",
    source: dict[str, Any] | None = None,
    progress: Callable[[str], None] = print,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    validate: bool = True,
    overwrite: bool = False,
    attention: str = "fused",
) -> Path:
    """Export every graph of `model` into the artifact folder `out`: a new or empty folder, or
    with `overwrite` an existing artifact (replaced atomically, keeping still-valid engines).
    `attention`: the step's attentions as ONNX `Attention` nodes ("fused", opset 23) or spelled
    out ("decomposed", opset 17: TensorRT before 10.14, e.g. JetPack 6)."""
    if precision not in GRAPH_PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(GRAPH_PRECISIONS)}")
    if attention not in ATTENTION_FORMS:
        raise ConfigError(f"unknown attention form {attention!r}; choose one of {', '.join(ATTENTION_FORMS)}")
    out = Path(out)
    previous = check_export_target(out, overwrite)
    import onnx
    import torch

    src = model if isinstance(model, ExportSource) else ExportSource.from_model(model)
    specs = graph_specs(src.model, src.t5, attention)
    graphs: dict[str, dict[str, Any]] = {}
    progress(f"exporting {src.description} at {precision}: {len(specs)} graphs")
    with atomic_dir(out, replace=previous is not None) as tmp:
        (tmp / "graphs").mkdir()
        for i, spec in enumerate(specs, 1):
            t0 = time.perf_counter()
            entry = export_graph(spec, tmp / "graphs", src, precision,
                                 external_data_bytes, VALIDATE_BYTES if validate else None,
                                 _block_progress(f"[{i:>2}/{len(specs)}] {spec.name:<14}", progress))
            entry["files"] = [{**f, "path": f"graphs/{f['path']}"} for f in entry["files"]]
            graphs[spec.name] = entry
            mb = sum(f["bytes"] for f in entry["files"]) / 1e6
            worst = max(entry.get("max_abs_error_vs_torch", {}).values(), default=None)
            check = f"max |ORT - torch| {worst:.1e}" if worst is not None else "not compared with torch"
            flag = f"; not supported by TensorRT: {entry['tensorrt_unsupported_ops']}" if entry[
                "tensorrt_unsupported_ops"] else ""
            progress(f"[{i:>2}/{len(specs)}] {spec.name:<14} {len(entry['ops']):>3} op types, {mb:>9.1f} MB, "
                     f"{check}, {time.perf_counter() - t0:.1f} s{flag}")
        tokenizer = _copy_tokenizer(src.text_folder, tmp, progress)
        write_manifest(tmp, {
            "model": src.config.to_dict(),
            "precision": precision,
            "attention": attention,
            "schedule": schedule_record(src.model.config),
            "step_io": StepIO().to_json(),
            "graphs": graphs,
            "weights": _weights_summary(src, graphs),
            "tokenizer": tokenizer,
            "source": source or {},
            "exporter": {"varedit_deploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "python": platform.python_version(), "weights_from": src.description},
        })
        _add_preview(tmp, progress)
        # hashed as they were written: a load trusts the large ones while their size and mtime stay the same
        write_stamp(tmp, [f for g in graphs.values() for f in g["files"]])
        carry_engines(previous, tmp, progress)
    progress(f"wrote {out}")
    return out


def _add_preview(folder: Path, progress: Callable[[str], None]) -> None:
    """Fit the preview projection on the just-written VAE graphs (ONNX Runtime) and store it: only the
    VAE encoder and decoder run, never the transformer."""
    manifest = read_manifest(folder, verify="none")
    if manifest.precision == "bf16":  # ONNX Runtime's CPU provider has no bf16 kernels
        progress("preview projection: skipped for bf16 graphs (a server fits one on its own backend at start)")
        return
    with OnnxRuntimeBackend(manifest, memory_arena=False) as backend:  # a few large runs: no arena to keep
        projection, report = fit_preview(backend, manifest.config)
    store_preview(manifest, projection, report)
    progress(f"preview projection: {report['kernel']}x{report['kernel']} neighbourhoods, {report['states']} states "
             f"from the VAE's own quantisation of real photos, fit PSNR {report['fit_psnr_db']:.1f} dB against the decoder")


def _block_progress(label: str, progress: Callable[[str], None]) -> Callable[[int, int, str], None]:
    """Per-tensor write callbacks -> one line per block of a long graph."""
    state = {"block": None}

    def report(done: int, total: int, name: str) -> None:
        match = _BLOCK.search(name)
        if total < LONG_GRAPH_BYTES or match is None or match[1] == state["block"]:
            return
        state["block"] = match[1]
        progress(f"{label} writing block {match[1]:>3}: {done / 1e9:6.2f} / {total / 1e9:.2f} GB")

    return report


def _weights_summary(src: ExportSource, graphs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per model part: its parameters and the graphs that store them (each weight once)."""
    modules = {"transformer": src.model.transformer, "vae": src.model.vae, "text_encoder": src.t5}
    summary = {}
    for key, module in modules.items():
        if module is None:
            continue
        stored = {g: len(e["weights"]["parameters"][key]) for g, e in graphs.items()
                  if key in e["weights"]["parameters"]}
        summary[key] = {"parameters": sum(p.numel() for p in module.parameters()),
                        "tensors": len(list(module.parameters())), "stored_in": stored}
    return summary


def _copy_tokenizer(text_folder: Path | None, folder: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Ship `tokenizer.json` (what the official T5TokenizerFast runs; the runtime reads it with the
    `tokenizers` library alone), the release's own tokenizer files, and the same tokenizer as an
    ONNX graph (`tokenizer.onnx`: ONNX Runtime with onnxruntime-extensions, from any language)."""
    if text_folder is None:
        return {"files": []}
    dst = folder / "tokenizer"
    dst.mkdir()
    for name in TOKENIZER_FILES:
        src = text_folder / name
        if src.is_file():
            shutil.copyfile(src, dst / name)
    if not (dst / "tokenizer.json").is_file():  # a sentencepiece-only folder: convert once, here
        from ..model.text import load_tokenizer

        load_tokenizer(text_folder).backend_tokenizer.save(str(dst / "tokenizer.json"))
    graph, said = write_tokenizer_graph(folder, dst / "tokenizer.json")
    progress(said)
    records = [file_record(folder, p) for p in sorted(dst.iterdir())]
    return {"files": sorted(records, key=lambda r: r["path"] != "tokenizer/tokenizer.json"),
            "main": "tokenizer/tokenizer.json", "max_tokens": 512, **({"graph": graph} if graph else {})}
