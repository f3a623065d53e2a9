"""`varedit-deploy export`: a model -> a self-describing artifact folder of ONNX graphs.

`--precision fp16|bf16` stores half-precision graphs (weights and matrix work in 16 bits;
norms, softmax, reductions and all graph I/O in fp32); fp32 artifacts can also be lowered at
engine build time instead.

The folder is written under a temporary name and renamed when complete, so an interrupted
export never leaves something that looks like an artifact.
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifact import file_record, write_manifest
from ..build.precision import graph_precision
from ..errors import ConfigError
from ..fileio import atomic_dir
from ..model.loaded import VAREditModel
from .graphs import graph_specs
from .onnx_export import EXTERNAL_DATA_BYTES, compare_with_module, convert_graph, export_graph

PRECISIONS = ("fp32", "fp16", "bf16")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _fp32_t5(model: VAREditModel):
    """The export traces an fp32 copy of T5 (engines pick their precision later)."""
    if model.text_encoder is None:
        return None
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(str(model.text_encoder.folder)).float().eval()


def schedule_record(model: VAREditModel) -> dict[str, Any]:
    sched, tcfg = model.config.schedule, model.config.transformer
    return {
        "sides": list(sched.sides),
        "tokens": list(sched.tokens),
        "starts": list(sched.starts),
        "source_tokens": sched.source_tokens,
        "latent_side": sched.latent_side,
        "image_size": model.config.image_size,
        "per_scale": [
            {"scale": s, "tokens": n, "past_targets": start, "past_len": sched.source_tokens + start,
             "sample_rows": n * tcfg.d_tok}
            for s, (n, start) in enumerate(zip(sched.tokens, sched.starts))
        ],
        # The source pass is a run of the step graph: the source tokens, no SAR, an empty past.
        "source_pass": {"tokens": sched.source_tokens, "sar_tokens": 0, "past_targets": 0, "past_len": 0},
    }


def export_artifacts(
    model: VAREditModel,
    out: str | Path,
    precision: str = "fp32",
    source: dict[str, Any] | None = None,
    progress: Callable[[str], None] = print,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    validate: bool = True,
) -> Path:
    """Export every graph of `model` into the artifact folder `out` (replaced atomically)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    import onnx
    import torch

    out = Path(out)
    specs = graph_specs(model, _fp32_t5(model))
    graphs: dict[str, dict[str, Any]] = {}
    with atomic_dir(out) as tmp:
        (tmp / "graphs").mkdir()
        for i, spec in enumerate(specs, 1):
            t0 = time.perf_counter()
            entry = export_graph(spec, tmp / "graphs", external_data_bytes)
            lowered = graph_precision(spec.name, precision)
            if lowered != "fp32":
                convert_graph(tmp / "graphs" / entry["files"][0], lowered, external_data_bytes)
            entry["precision"] = lowered
            if validate and lowered != "bf16":  # ONNX Runtime's CPU provider has no bf16 kernels
                entry["max_abs_error_vs_torch"] = compare_with_module(spec, tmp / "graphs" / entry["files"][0])
            entry["files"] = [file_record(tmp, tmp / "graphs" / f) for f in entry.pop("files")]
            graphs[spec.name] = entry
            worst = max(entry.get("max_abs_error_vs_torch", {}).values(), default=0.0)
            flag = f"; not supported by TensorRT: {entry['tensorrt_unsupported_ops']}" if entry[
                "tensorrt_unsupported_ops"] else ""
            progress(f"[{i:>2}/{len(specs)}] {spec.name:<14} {len(entry['ops']):>3} op types, "
                     f"max |ORT - torch| {worst:.1e}, {time.perf_counter() - t0:.1f} s{flag}")
        tokenizer = _copy_tokenizer(model, tmp)
        write_manifest(tmp, {
            "model": model.config.to_dict(),
            "precision": precision,
            "schedule": schedule_record(model),
            "graphs": graphs,
            "tokenizer": tokenizer,
            "source": source or {},
            "exporter": {"varedit_deploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "python": platform.python_version()},
        })
    progress(f"wrote {out}")
    return out


def _copy_tokenizer(model: VAREditModel, folder: Path) -> dict[str, Any]:
    """Ship `tokenizer.json` (what the official T5TokenizerFast runs; the runtime reads it with the
    `tokenizers` library alone) and the release's own tokenizer files."""
    if model.text_encoder is None:
        return {"files": []}
    dst = folder / "tokenizer"
    dst.mkdir()
    for name in TOKENIZER_FILES:
        src = model.text_encoder.folder / name
        if src.is_file():
            shutil.copyfile(src, dst / name)
    if not (dst / "tokenizer.json").is_file():  # a sentencepiece-only folder: convert once, here
        model.text_encoder.tokenizer.backend_tokenizer.save(str(dst / "tokenizer.json"))
    records = [file_record(folder, p) for p in sorted(dst.iterdir())]
    return {"files": sorted(records, key=lambda r: r["path"] != "tokenizer/tokenizer.json"),
            "main": "tokenizer/tokenizer.json", "max_tokens": 512}
