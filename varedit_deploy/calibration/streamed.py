"""`quantize` at release size: graph by graph, weight by weight, calibrated by statistics recorded in the graphs.

The in-memory path (quantize.py) loads each graph into one protobuf for ModelOpt and records
calibration inputs in memory; a release `step` graph (2B-512 bf16: 3.8 GB) fits neither. Here:
1. Statistics, only where the mode needs them (int8/fp8 activations, an 8-bit KV cache): the
   calibration edits run on the source graphs with each wanted tensor's running maximum recorded
   inside a copy of its graph (statistics.py): per tensor for activations, per channel for caches.
   Nothing is stored per call, so neither the graph's size nor the edit's caps what is recorded;
   `calibration_scales` stops each edit after its first scales where whole edits cost too much.
2. Each graph is read without its weights, lowered to the high precision, given Q/DQ nodes in
   ModelOpt's formats (streaming.py) and written tensor by tensor: one weight in memory at a time.
3. The report: teacher-forced bit agreement and logit KL against the source on the held-out edits
   (their first `report_scales` scales), where ONNX Runtime's CPU provider can run both artifacts.
Methods are the ones that need no stored inputs: INT4 round-to-nearest, INT8/FP8 max; there is no
sensitivity search (each trial would rewrite the whole graph): `--exclude` chooses what stays.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..artifact import MANIFEST, SCHEMA_VERSION, Manifest, file_record, sha256_file, write_manifest
from ..errors import InputError
from ..export.precision import LOWERED_GRAPHS, graph_precision, lower
from ..fileio import write_text
from ..runtime.pipeline import EditPipeline
from . import kv_cache
from .dataset import CalibrationSet
from .evaluate import Agreement, TextSource, run_edit
from .graph_files import copy_files, graph_entry
from .groups import LayerGroup
from .statistics import Statistic, measuring_backend, record_statistics
from .streaming import GraphWeights, as_stubs, insert_qdq, write_quantized

IN_MEMORY_LIMIT = 2**31 - 2**20  # a graph this large cannot be one protobuf message (what ModelOpt loads)
# Release edits take minutes each on a CPU (benchmarks/RESULTS.md): fewer than the in-memory path's
# defaults. Maxima need few edits to settle; --calibration-edits and --held-out choose more.
CALIBRATION_EDITS, HELD_OUT = 4, 2
METHOD = {"int4": "rtn_dq", "int8": "max", "fp8": "max"}
REPORT = "quantization_report.json"
FILES = (REPORT, "quantization_report.md")


def streaming_reason(manifest: Manifest) -> str | None:
    """Why `manifest` must be quantised by streaming (its largest graph, its 16-bit weights), or None."""
    largest = max(manifest.graphs, key=manifest.graph_bytes)
    size = manifest.graph_bytes(largest)
    if size >= IN_MEMORY_LIMIT:
        return f"graph {largest} holds {size / 2**30:.1f} GiB, more than one protobuf can"
    if manifest.precision != "fp32":
        return f"its graphs are {manifest.precision} (ModelOpt calibrates fp32 graphs)"
    return None


def needs_statistics(mode: str, kv_cache_mode: str | None) -> bool:
    return mode in ("int8", "fp8") or kv_cache_mode is not None


@dataclass
class StreamedQuantization:
    """One streamed `quantize` run. `groups`: the candidate layer groups (exclusions applied)."""

    manifest: Manifest
    mode: str
    high_precision: str
    groups: list[LayerGroup]
    kv_cache: str | None
    calib: CalibrationSet
    text: TextSource
    calibration_scales: int | None
    report_scales: int | None
    progress: Callable[[str], None]

    def __post_init__(self):
        self.views = kv_cache.CacheViews.of(self.manifest.step_io, self.manifest.config.transformer.depth)
        self.nodes = {g: [n for group in self.groups for n in group.nodes.get(g, ())] for g in self.manifest.graphs}

    # ------------------------------------------------------------ 1. statistics
    def statistics(self) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
        """(per graph, each quantised node's activation maximum; the KV cache scales), from the calibration edits."""
        import onnx

        if not needs_statistics(self.mode, self.kv_cache):
            return {}, {}
        wanted: dict[str, list[Statistic]] = {}
        activation_of: dict[str, dict[str, str]] = {}  # graph -> node -> its activation tensor
        for name in self.manifest.graphs:
            model = onnx.load(str(self.manifest.graph_path(name)), load_external_data=False)
            stats: dict[str, Statistic] = {}
            if self.mode in ("int8", "fp8") and self.nodes[name]:
                chosen = set(self.nodes[name])
                activation_of[name] = {n.name: n.input[0] for n in model.graph.node if n.name in chosen}
                stats.update((t, Statistic(t)) for t in activation_of[name].values())
            if self.kv_cache:
                stats.update((i.name, Statistic(i.name, keep=2)) for i in model.graph.input
                             if self.views.cache_of(i.name, output=False) is not None)
            if stats:
                wanted[name] = list(stats.values())
        scales = f", the first {self.calibration_scales} scales of each" if self.calibration_scales else ""
        self.progress(f"[1/3] statistics of {sum(map(len, wanted.values()))} tensors in {', '.join(wanted)} on "
                      f"{len(self.calib.calibration)} calibration edits{scales} (ONNX Runtime, weights memory-mapped)")
        with measuring_backend(self.manifest) as inner:
            found = record_statistics(self.manifest, inner, wanted, self.calib.calibration, self.text,
                                      self.calibration_scales, progress=self.progress)
        amax = {g: {node: float(found[g][t][0]) for node, t in nodes.items()} for g, nodes in activation_of.items()}
        cache_max: dict[str, np.ndarray] = {}
        for g, values in found.items():
            for tensor, m in values.items():
                cache = self.views.cache_of(tensor, output=False)
                if cache is not None and m.size > 1:
                    cache_max[cache] = np.maximum(cache_max[cache], m) if cache in cache_max else m
        return amax, {k: (np.maximum(v, 1e-8) / kv_cache.QMAX).astype(np.float32) for k, v in cache_max.items()}

    # ------------------------------------------------------------ 2. the graphs
    def write_graphs(self, folder: Path, amax: Mapping[str, Mapping[str, float]],
                     cache_scales: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Every graph of the artifact into `folder`: quantised, lowered or copied, as each needs."""
        graphs = {}
        total = len(self.manifest.graphs)
        for i, (name, entry) in enumerate(self.manifest.graphs.items(), 1):
            t0 = time.perf_counter()
            graphs[name], what = self._write_graph(name, entry, folder, amax.get(name, {}), cache_scales,
                                                   _graph_progress(f"  [{i:>2}/{total}] {name:<13}", self.progress))
            mb = sum(f["bytes"] for f in graphs[name]["files"]) / 1e6
            self.progress(f"  [{i:>2}/{total}] {name:<13} {what}, {mb:,.1f} MB, {time.perf_counter() - t0:.1f} s")
        return graphs

    def _write_graph(self, name: str, entry: dict[str, Any], folder: Path, amax: Mapping[str, float],
                     cache_scales: Mapping[str, np.ndarray], progress) -> tuple[dict[str, Any], str]:
        import onnx

        nodes = self.nodes[name]
        source = self.manifest.precision
        lowers = source == "fp32" and self.high_precision != "fp32" and name in LOWERED_GRAPHS
        caches = bool(cache_scales) and _has_cache_io(entry, self.views)
        if not (nodes or lowers or caches):
            return {**entry, "files": copy_files(self.manifest, entry["files"], folder)}, "copied"
        path = self.manifest.graph_path(name)
        model = onnx.load(str(path), load_external_data=False)
        weights = GraphWeights(path, model)
        as_stubs(model)
        precision = self.high_precision if source == "fp32" else source
        if lowers:
            model = lower(model, name, precision, self.manifest.step_io, (self.manifest.ranges or {}).get(name))
        plan = insert_qdq(model, nodes, self.mode, amax, weights)
        if caches:
            kv_cache.rewrite(model, dict(cache_scales), self.views, check=False)
        target = folder / entry["files"][0]["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        records = write_quantized(model, plan, weights, target, progress)
        files = [{**r, "path": str(Path(entry["files"][0]["path"]).parent / r["path"])} for r in records]
        quantized = {"mode": self.mode, "nodes": len(plan.quantized_nodes)} if nodes else None
        written = graph_entry(folder, [folder / f["path"] for f in files], entry, model, graph_precision(name, precision),
                         quantized)
        what = ", ".join(x for x in (f"{len(nodes)} nodes {self.mode}" if nodes else "",
                                     f"lowered to {precision}" if lowers else "", "int8 cache I/O" if caches else "") if x)
        return written, what

    # ------------------------------------------------------------ 3. the report
    def report(self, result: Manifest, command: str) -> dict[str, Any]:
        """Teacher-forced agreement of `result` with the source on the held-out edits, where both run here."""
        from .report import weights_made_on

        weights = {name: {"source": self.manifest.graph_bytes(name), "artifact": result.graph_bytes(name),
                          "quantized": "quantized" in result.graphs[name]} for name in self.manifest.graphs}
        rep: dict[str, Any] = {
            "mode": self.mode, "method": METHOD[self.mode], "streamed": True,
            "source_precision": self.manifest.precision, "high_precision": result.precision,
            "kv_cache": self.kv_cache or self.manifest.data.get("kv_cache", {}).get("dtype", "as the source's"),
            "model": self.manifest.config.name, "weights_made_on": weights_made_on(self.manifest.source),
            "calibration_set": {"source": self.calib.source, "edits": len(self.calib.calibration),
                                "scales": self.calibration_scales, "description": self.calib.describe()}
            if needs_statistics(self.mode, self.kv_cache) else None,
            "weight_bytes": weights, "versions": {"varedit_deploy": __version__}, "command": command,
        }
        unrunnable = [p for p in (self.manifest.precision, result.precision) if p == "bf16"]
        if unrunnable or self.report_scales == 0:
            rep["agreement"] = None
            rep["not_measured"] = ("ONNX Runtime's CPU provider has no bf16 kernels: compare the engines built from "
                                   "both artifacts on a GPU" if unrunnable else "--report-scales 0")
            return rep
        scales = self.report_scales
        self.progress(f"[3/3] agreement with the {self.manifest.precision} source on {len(self.calib.held_out)} held-out "
                      f"edits{f', the first {scales} scales' if scales else ''} (teacher-forced)")
        t0, total = time.perf_counter(), len(self.calib.held_out)
        refs, agreement = [], Agreement()
        with measuring_backend(self.manifest) as source:
            pipe = EditPipeline(self.manifest, source)
            for seed, pair in enumerate(self.calib.held_out):
                refs.append(run_edit(pipe, self.text, pair, seed, scales=scales))
                self.progress(f"  source edit {seed + 1}/{total} [{time.perf_counter() - t0:.0f} s]")
        with measuring_backend(result) as tested:
            pipe = EditPipeline(result, tested)
            for i, ref in enumerate(refs, 1):
                agreement.add(ref, run_edit(pipe, self.text, ref.pair, ref.seed, teacher=ref, decode=False, scales=scales))
                self.progress(f"  quantised edit {i}/{total}, teacher-forced [{time.perf_counter() - t0:.0f} s]")
        rep["agreement"] = _agreement_record(agreement, len(refs))
        return rep


def _agreement_record(agreement: Agreement, edits: int) -> dict[str, Any]:
    return {"held_out_edits": edits, "per_scale_bit_agreement": agreement.per_scale,
            "bit_agreement": agreement.overall, "per_scale_logit_kl": agreement.per_scale_kl,
            "bits_compared": sum(agreement.bits)}


def _has_cache_io(entry: dict[str, Any], views: kv_cache.CacheViews) -> bool:
    return any(views.cache_of(v["name"], output=False) for v in entry["inputs"]) or any(
        views.cache_of(v["name"], output=True) for v in entry["outputs"])


def _graph_progress(label: str, progress: Callable[[str], None], every: int = 2**30) -> Callable[[int, int, str], None]:
    """Per-tensor write callbacks -> a line per `every` bytes written (long graphs only)."""
    state = {"next": every}

    def report(done: int, total: int, name: str) -> None:
        if done >= state["next"] and total > every:
            state["next"] = done + every
            progress(f"{label} {done / 1e9:6.2f} / {total / 1e9:.2f} GB")

    return report


def markdown(r: dict[str, Any]) -> str:
    """The report as a page people read."""
    lines = [f"# Quantisation report: {r['mode']} ({r['method']}, streamed) of a {r['source_precision']} "
             f"{r['model']} artifact; {r['high_precision']} elsewhere, KV cache {r['kv_cache']}", "",
             f"Weights: **{r['weights_made_on']['weights']}**.", ""]
    if r["calibration_set"]:
        c = r["calibration_set"]
        lines += [f"Calibration: {c['description']}" + (f", the first {c['scales']} scales of each edit." if c["scales"]
                                                          else ", whole edits."), ""]
    a = r["agreement"]
    if a is None:
        lines += [f"Agreement not measured here: {r['not_measured']}.", ""]
    else:
        scales = range(len(a["per_scale_bit_agreement"]))
        lines += [f"## Teacher-forced agreement with the {r['source_precision']} source ({a['held_out_edits']} held-out "
                  f"edits, {a['bits_compared']:,} bits)", "",
                  "| scale | " + " | ".join(str(s) for s in scales) + " | all |", "|---" * (len(scales) + 2) + "|",
                  "| bits | " + " | ".join(f"{x:.4f}" for x in a["per_scale_bit_agreement"])
                  + f" | {a['bit_agreement']:.4f} |",
                  "| logit KL (nats/bit) | " + " | ".join(f"{k:.1e}" for k in a["per_scale_logit_kl"]) + " | |", ""]
    lines += ["## Bytes per graph", "", "| graph | source | this artifact | ratio |", "|---|---:|---:|---:|"]
    for graph, w in r["weight_bytes"].items():
        lines.append(f"| {graph}{' (quantised)' if w['quantized'] else ''} | {w['source']:,} | {w['artifact']:,} | "
                     f"{w['artifact'] / w['source']:.3f} |" if w["source"] else f"| {graph} | 0 | {w['artifact']:,} | - |")
    return "\n".join(lines + [""])


def write_report(folder: Path, rep: dict[str, Any]) -> list[dict[str, Any]]:
    write_text(folder / REPORT, json.dumps(rep, indent=1))
    write_text(folder / FILES[1], markdown(rep))
    return [file_record(folder, folder / name) for name in FILES]


def check_streamed(manifest: Manifest, mode: str, method: str | None, high_precision: str,
                   kv_cache_mode: str | None) -> None:
    """What a streamed run cannot do, refused before any work."""
    if method is not None and method != METHOD[mode]:
        raise InputError(f"--method {method} needs the calibration inputs stored, which a streamed quantisation "
                         f"does not keep; {mode} is streamed with {METHOD[mode]}")
    if manifest.precision != "fp32" and high_precision != manifest.precision:
        raise InputError(f"--high-precision {high_precision}: artifact {manifest.folder} holds {manifest.precision} "
                         f"weights, which its unquantised parts keep; pass --high-precision {manifest.precision} "
                         "or quantise an fp32 export")
    if manifest.precision == "bf16" and needs_statistics(mode, kv_cache_mode):
        what = "an 8-bit KV cache" if kv_cache_mode else f"{mode} activations"
        raise InputError(f"{what} need calibration edits run on the source graphs, and ONNX Runtime's CPU provider "
                         f"has no bf16 kernels: quantise an fp32 or fp16 export of the same weights (int4 weights "
                         "alone need no calibration and stream from bf16)")


def streamed_manifest(q: StreamedQuantization, folder: Path, graphs: dict[str, dict[str, Any]],
                      patterns: list[str], excluded: list[LayerGroup], command: str) -> Manifest:
    """The quantised artifact's manifest (written by the caller once the report is in)."""
    m = q.manifest
    precision = q.high_precision if m.precision == "fp32" else m.precision
    for rec in m.companion_files():
        (folder / rec["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(m.folder / rec["path"], folder / rec["path"])
    data = {k: v for k, v in m.data.items() if k != "schema_version"}
    data.update(precision=precision, graphs=graphs)
    data["quantization"] = {
        "mode": q.mode, "method": METHOD[q.mode], "high_precision": precision, "streamed": True,
        "exclusions": patterns, "excluded_groups": [g.name for g in excluded],
        "kept_in_high_precision": [], "quantized_groups": [g.name for g in q.groups],
        "search": {"skipped": True, "why": "streamed: each trial would rewrite the release-size graphs"},
        "calibration_set": ({"source": q.calib.source, "sha256": q.calib.sha256(), "edits": len(q.calib.calibration),
                             "held_out": len(q.calib.held_out), "scales": q.calibration_scales, "text": q.text.origin}
                            if needs_statistics(q.mode, q.kv_cache) else None),
        "versions": {"varedit_deploy": __version__}, "report": REPORT, "source_artifact": str(m.folder),
        "source_manifest_sha256": sha256_file(m.folder / MANIFEST), "command": command,
    }
    if q.kv_cache:
        data["kv_cache"] = {"dtype": kv_cache.DTYPE, "scales": "per channel (heads x head_dim), max calibration"}
    return Manifest(folder, {**data, "schema_version": SCHEMA_VERSION})


def finish(result: Manifest, rep: dict[str, Any]) -> None:
    """Write the report and the manifest that lists it."""
    result.data["quantization"]["files"] = write_report(result.folder, rep)
    write_manifest(result.folder, {k: v for k, v in result.data.items() if k != "schema_version"})
