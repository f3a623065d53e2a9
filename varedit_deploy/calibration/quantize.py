"""`varedit-deploy quantize`: an fp32 artifact -> a quantised artifact with its accuracy report.

Artifacts whose graphs one protobuf cannot hold (release sizes), or whose weights are 16-bit, take
the streamed path instead (streamed.py: bounded memory, no search). The in-memory path:

1. Calibration: the calibration edits run on the fp32 graphs (ONNX Runtime) through a backend
   that records every graph call's inputs. 2. References: the held-out edits run on fp32.
3. Quantisation: ModelOpt quantises every candidate layer group once (fp32 elsewhere); keeping
   only some groups quantised needs no new calibration (`ptq.keep_quantized`). 4. Sensitivity:
   groups are scored alone and in growing sets on the held-out edits; the search picks what stays
   in high precision. 5. The artifact: the chosen groups quantised, everything lowered to
   `--high-precision` as `export --precision` lowers graphs; optionally an int8 KV cache.
6. The report: the artifact and an fp16 artifact against fp32 on the held-out edits.
The output folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..artifact import MANIFEST, SCHEMA_VERSION, Manifest, file_record, read_manifest, sha256_file, write_manifest
from ..errors import ArtifactError, InputError, OutputError
from ..export.precision import LOWERED_GRAPHS, graph_precision, lower
from ..fileio import atomic_dir
from ..runtime.onnxruntime_backend import OnnxRuntimeBackend
from ..runtime.pipeline import EditPipeline
from . import kv_cache, report
from .backends import Recording, RecordingBackend, SwappedBackend
from .dataset import CalibrationSet, load_set
from .evaluate import EditRun, TextSource, image_scores, reference_runs, run_edit, teacher_forced, text_source
from .graph_files import copy_files, graph_entry, save_graph
from .groups import LayerGroup, default_exclusions, excluded, find_groups
from .ptq import check_mode, keep_quantized, modelopt, quantize_graph, stored_bytes, versions
from .sensitivity import SearchResult, search
from .streamed import (CALIBRATION_EDITS, FILES, HELD_OUT, METHOD, StreamedQuantization, check_streamed, finish,
                       markdown, streamed_manifest, streaming_reason)

KV_CACHE_MODES = ("int8",)


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str
    method: str | None = None  # None: the mode's default (int8 entropy, fp8 max, int4 awq_clip; streamed: rtn_dq, max)
    high_precision: str | None = None  # None: fp16 from fp32 sources, else the source's own precision
    exclude: tuple[str, ...] | None = None  # group-name patterns kept in high precision; None: the recipe's
    min_bit_agreement: float = 0.99
    search: bool = True  # False: quantise every candidate group
    calibration: Path | None = None  # folder or CSV; None: the default set
    calibration_edits: int | None = None  # use only the first N calibration pairs
    held_out: int | None = None  # use only the first N held-out pairs
    fixture: Path | None = None  # text features for artifacts exported from a fixture (no text encoder)
    kv_cache: str | None = None  # "int8": an 8-bit KV cache
    samples_per_scale: int = 8  # recorded inputs per graph and input shape
    stream: bool | None = None  # None: streamed where the artifact needs it (streamed.streaming_reason)
    calibration_scales: int | None = None  # streamed: calibrate on the first N scales of each edit (None: all)
    report_scales: int | None = None  # streamed: compare the first N scales (None: all; 0: no comparison)


def quantize_artifacts(artifacts: str | Path, out: str | Path, opts: QuantizeOptions, command: str = "",
                       progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the quantised artifact `out`; return its report. Everything is checked before work starts."""
    out = Path(out)
    manifest = read_manifest(artifacts, verify="full")
    reason = streaming_reason(manifest)
    high = opts.high_precision or ("fp16" if manifest.precision == "fp32" else manifest.precision)
    if opts.stream or (opts.stream is None and reason is not None):
        return _quantize_streamed(manifest, out, opts, high, reason or "asked for (--stream)", command, progress)
    method = check_mode(opts.mode, opts.method, high)
    _check(manifest, out, opts)
    if manifest.precision != "fp32":
        raise ArtifactError(f"artifact {manifest.folder} holds {manifest.precision} graphs; --mode "
                            f"{opts.mode} with ModelOpt calibrates fp32 graphs: export with --precision fp32 and "
                            "quantise that, or pass --stream")
    modelopt()  # a missing ModelOpt fails here, before any work
    calib = load_set(opts.calibration).limited(opts.calibration_edits, opts.held_out)
    run = _Quantization(manifest, replace(opts, high_precision=high), method, calib,
                        text_source(manifest, opts.fixture), command, progress)
    try:
        with tempfile.TemporaryDirectory(prefix="varedit-quantize-") as work, atomic_dir(out) as tmp:
            run.work = Path(work)
            run.calibrate()
            run.references()
            run.quantize()
            found = run.sensitivity()
            result = run.write(tmp, found)
            rep = run.report(result, found)
            result.quantization["files"] = [file_record(tmp, tmp / name) for name in report.FILES]
            write_manifest(tmp, {k: v for k, v in result.data.items() if k != "schema_version"})
    finally:
        run.backend.close()
    progress(report.table(rep))
    progress(f"wrote {out} ({', '.join(report.FILES)})")
    return rep


def _quantize_streamed(manifest: Manifest, out: Path, opts: QuantizeOptions, high: str, reason: str, command: str,
                       progress: Callable[[str], None]) -> dict[str, Any]:
    """The release-size path (streamed.py): no protobuf holds a whole graph, one weight in memory at a time."""
    if opts.mode not in METHOD:
        check_mode(opts.mode, None, "fp16")  # the unknown-mode error
    check_streamed(manifest, opts.mode, opts.method, high, opts.kv_cache)
    _check(manifest, out, opts)
    calib = load_set(opts.calibration).limited(opts.calibration_edits or CALIBRATION_EDITS, opts.held_out or HELD_OUT)
    text = text_source(manifest, opts.fixture)
    groups, removed, candidates, patterns = choose_groups(manifest, opts.mode, opts.exclude)
    t0 = time.perf_counter()
    run = StreamedQuantization(manifest, opts.mode, high, candidates, opts.kv_cache, calib, text,
                               opts.calibration_scales, opts.report_scales,
                               lambda m: progress(m if m.startswith(" ") else f"{m} [{time.perf_counter() - t0:.0f} s]"))
    graphs = sorted({g for c in candidates for g in c.nodes})
    run.progress(f"{opts.mode} ({METHOD[opts.mode]}, streamed: {reason}) of {manifest.folder}: {len(candidates)} "
                 f"layer groups in {', '.join(graphs)} ({len(removed)} excluded), {high} elsewhere"
                 f"{', int8 KV cache' if opts.kv_cache else ''}")
    with atomic_dir(out) as tmp:
        amax, cache_scales = run.statistics()
        run.progress(f"[2/3] writing the {opts.mode} artifact, one weight at a time")
        result = streamed_manifest(run, tmp, run.write_graphs(tmp, amax, cache_scales), patterns, removed, command)
        write_manifest(tmp, {k: v for k, v in result.data.items() if k != "schema_version"})  # the report reads it
        rep = run.report(result, command)
        finish(result, rep)
    progress(markdown(rep))
    progress(f"wrote {out} ({', '.join(FILES)}) in {time.perf_counter() - t0:.0f} s")
    return rep


def choose_groups(manifest: Manifest, mode: str, exclude: tuple[str, ...] | None):
    """(every layer group, those excluded, the candidates, the exclusion patterns), from the graphs' structure."""
    import onnx

    structure = {n: onnx.load(str(manifest.graph_path(n)), load_external_data=False) for n in manifest.graphs}
    groups = find_groups(structure)
    patterns = list(exclude) if exclude is not None else default_exclusions(mode, manifest.config.transformer.depth)
    removed = excluded(groups, patterns)
    unmatched = [p for p in exclude or () if not excluded(groups, [p])]
    if unmatched:  # a typo would exclude nothing and still be recorded as an exclusion
        names = ", ".join(g.name for g in groups[:4])
        raise InputError(f"--exclude {', '.join(map(repr, unmatched))} matches no layer group (names such as "
                         f"{names}, ...; a pattern must match a whole name)")
    candidates = [g for g in groups if g not in removed]
    if not candidates:
        raise InputError(f"nothing to quantise: all {len(groups)} layer groups of {manifest.folder} match "
                         f"the exclusions {patterns}")
    return groups, removed, candidates, patterns


def _check(manifest: Manifest, out: Path, opts: QuantizeOptions) -> None:
    quant = manifest.quantization
    if quant is not None:
        raise ArtifactError(f"artifact {manifest.folder} is already quantised ({quant['mode']}, {quant['method']}); "
                            f"quantise its fp32 source instead ({quant['source_artifact']})")
    if out.resolve() == manifest.folder.resolve():
        raise InputError(f"--out {out} is the artifact being quantised; write the quantised artifact elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"--out {out} exists and is not an empty folder; choose a new folder (nothing is replaced)")
    if not 0.0 < opts.min_bit_agreement <= 1.0:
        raise InputError(f"--min-bit-agreement must be in (0, 1], got {opts.min_bit_agreement}")
    if opts.kv_cache is not None and opts.kv_cache not in KV_CACHE_MODES:
        raise InputError(f"--kv-cache {opts.kv_cache!r} is not available; choose {', '.join(KV_CACHE_MODES)} "
                         "(an fp8 cache needs fp8 buffers, which the numpy-based runtimes do not have)")
    for name, value, least in (("--samples-per-scale", opts.samples_per_scale, 1),
                               ("--calibration-scales", opts.calibration_scales, 1), ("--report-scales", opts.report_scales, 0)):
        if value is not None and value < least:
            raise InputError(f"{name} must be at least {least}, got {value}")
    scales = manifest.config.schedule.num_scales
    for name, value in (("--calibration-scales", opts.calibration_scales), ("--report-scales", opts.report_scales)):
        if value is not None and value > scales:
            raise InputError(f"{name} {value}: {manifest.config.name} has {scales} scales")
    for pattern in opts.exclude or ():
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"--exclude {pattern!r} is not a regular expression ({e})") from None


def _nodes(groups: list[LayerGroup], graph: str) -> list[str]:
    return [n for g in groups for n in g.nodes.get(graph, ())]


class _Quantization:
    """One `quantize` run: what it has measured so far, stage by stage."""

    def __init__(self, manifest: Manifest, opts: QuantizeOptions, method: str, calib: CalibrationSet,
                 text: TextSource, command: str, progress: Callable[[str], None]):
        self.manifest, self.opts, self.method, self.calib, self.text = manifest, opts, method, calib, text
        self.command, self._progress, self._t0 = command, progress, time.perf_counter()
        self.groups, self.excluded, self.candidates, self.patterns = choose_groups(manifest, opts.mode, opts.exclude)
        self.graphs = sorted({graph for g in self.candidates for graph in g.nodes})
        self.views = kv_cache.CacheViews.of(manifest.step_io, manifest.config.transformer.depth)
        self.ranges = manifest.ranges or {}  # an fp16 high precision keeps out-of-range nodes fp32
        self.backend = OnnxRuntimeBackend(manifest)
        # Up to `samples_per_scale` calls per input shape, and room for every scale at two instruction lengths.
        scales = manifest.config.schedule.num_scales
        self.recording = Recording(per_shape=opts.samples_per_scale, per_graph=opts.samples_per_scale * 2 * scales)
        self.refs: list[EditRun] = []
        self.sources: dict[str, Any] = {}  # graph -> fp32 ModelProto
        self.full: dict[str, Any] = {}  # graph -> every candidate group quantised, fp32 elsewhere
        self.work = Path()
        self.progress(f"{opts.mode} ({method}) of {manifest.folder}: {len(self.candidates)} layer groups in "
                      f"{', '.join(self.graphs)} ({len(self.excluded)} excluded by "
                      f"{'--exclude' if opts.exclude is not None else 'the recipe'}); {calib.describe()}")

    def progress(self, message: str) -> None:
        """Stage lines get the seconds since the start; indented detail lines do not."""
        self._progress(message if message.startswith(" ") else f"{message} [{time.perf_counter() - self._t0:.0f} s]")

    def calibrate(self) -> None:
        self.progress(f"[1/6] calibration: {len(self.calib.calibration)} edits on the fp32 graphs (ONNX Runtime)")
        recorder = EditPipeline(self.manifest, RecordingBackend(self.backend, self.recording))
        for i, pair in enumerate(self.calib.calibration):
            run_edit(recorder, self.text, pair, seed=10_000 + i, decode=False)
        self.progress("      recorded " + ", ".join(f"{g}: {len(self.recording.samples.get(g, []))} calls, "
                                                    f"{self.recording.shapes(g)} input shapes" for g in self.graphs))

    def references(self) -> None:
        self.progress(f"[2/6] references: {len(self.calib.held_out)} held-out edits on fp32")
        self.refs = reference_runs(EditPipeline(self.manifest, self.backend), self.text, self.calib.held_out)

    def quantize(self) -> None:
        import onnx

        self.progress(f"[3/6] {self.opts.mode} Q/DQ of {len(self.candidates)} layer groups with ModelOpt "
                      f"({self.method} calibration on the CPU)")
        for g in self.graphs:
            self.sources[g] = onnx.load(str(self.manifest.graph_path(g)))
            self.full[g] = quantize_graph(self.sources[g], self.opts.mode, self.method,
                                          self.recording.samples.get(g, []), _nodes(self.candidates, g), g)

    def _variant(self, graph: str, quantised: list[LayerGroup]):
        """`graph` with only the groups `quantised` quantised (same scales as the full quantisation)."""
        return keep_quantized(self.full[graph], self.sources[graph], set(_nodes(quantised, graph)))

    def _agreement(self, swaps: dict[str, Path], manifest: Manifest | None = None) -> float:
        """Teacher-forced agreement of the fp32 artifact with some graphs swapped (and its manifest's cache type)."""
        variant = SwappedBackend(self.backend, swaps)
        try:
            pipe = EditPipeline(manifest or self.manifest, variant)
            return teacher_forced(pipe, self.text, self.refs, reuse_inputs=True).overall
        finally:
            variant.close()

    def sensitivity(self) -> SearchResult:
        names = [c.name for c in self.candidates]
        if not self.opts.search:
            self.progress("[4/6] sensitivity search skipped (--no-search)")
            return SearchResult(self.opts.min_bit_agreement, [])
        self.progress(f"[4/6] sensitivity of {len(names)} layer groups, scored on the held-out edits (fp32 elsewhere)")

        def evaluate(quantised: set[str]) -> float:
            chosen = [c for c in self.candidates if c.name in quantised]
            swaps = {}
            for g in self.graphs:
                swaps[g] = self.work / f"{g}.variant.onnx"
                save_graph(self._variant(g, chosen), swaps[g])
            return self._agreement(swaps)

        found = search(names, evaluate, self.opts.min_bit_agreement, self.progress)
        self.progress(found.table())
        return found

    def write(self, folder: Path, found: SearchResult) -> Manifest:
        """Write every graph, the tokenizer and the quantisation record into `folder`."""
        opts = self.opts
        chosen = [c for c in self.candidates if c.name not in found.kept]
        self.progress(f"[5/6] writing the {opts.mode} artifact ({opts.high_precision} elsewhere"
                      f"{', int8 KV cache' if opts.kv_cache else ''})")
        scales = kv_cache.calibrate_scales(self.recording.samples, self.views) if opts.kv_cache else {}
        graphs = {name: self._write_graph(name, entry, folder, chosen, scales)
                  for name, entry in self.manifest.graphs.items()}
        copy_files(self.manifest, self.manifest.companion_files(), folder)
        data = {**self.manifest.data, "precision": opts.high_precision, "graphs": graphs}
        data["quantization"] = {
            "mode": opts.mode, "method": self.method, "high_precision": opts.high_precision,
            "exclusions": self.patterns, "excluded_groups": [g.name for g in self.excluded],
            "kept_in_high_precision": found.kept, "quantized_groups": [g.name for g in chosen],
            "search": found.to_json(),
            "calibration_set": {"source": self.calib.source, "sha256": self.calib.sha256(),
                                "edits": len(self.calib.calibration), "held_out": len(self.calib.held_out),
                                "text": self.text.origin},
            "versions": versions(), "report": report.REPORT, "source_artifact": str(self.manifest.folder),
            "source_manifest_sha256": sha256_file(self.manifest.folder / MANIFEST), "command": self.command,
        }
        if opts.kv_cache:
            data["kv_cache"] = {"dtype": kv_cache.DTYPE, "scales": "per channel (heads x head_dim), max calibration"}
        return Manifest(folder, {**data, "schema_version": SCHEMA_VERSION})

    def _write_graph(self, name: str, entry: dict[str, Any], folder: Path, chosen, scales) -> dict[str, Any]:
        import onnx

        opts = self.opts
        target = folder / entry["files"][0]["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        nodes = _nodes(chosen, name)
        lowered = graph_precision(name, opts.high_precision)
        cache_io = bool(scales) and self._has_cache_io(entry)
        quantized = None
        if nodes:
            model = self._variant(name, chosen)
            quantized = {"mode": opts.mode, "nodes": len(nodes)}
        elif (opts.high_precision != "fp32" and name in LOWERED_GRAPHS) or cache_io:
            model = onnx.load(str(self.manifest.graph_path(name)))
        else:
            return {**entry, "files": copy_files(self.manifest, entry["files"], folder)}
        model = lower(model, name, opts.high_precision, self.manifest.step_io, self.ranges.get(name))
        if cache_io:
            kv_cache.rewrite(model, scales, self.views)
        return graph_entry(folder, save_graph(model, target), entry, model, lowered, quantized)

    def _kv_cache_alone(self) -> float:
        """Agreement of the fp32 graphs with only the 8-bit KV cache (what the cache costs by itself)."""
        import onnx

        scales = kv_cache.calibrate_scales(self.recording.samples, self.views)
        swaps = {}
        for name, entry in self.manifest.graphs.items():
            if self._has_cache_io(entry):
                model = onnx.load(str(self.manifest.graph_path(name)))
                kv_cache.rewrite(model, scales, self.views)
                swaps[name] = self.work / f"{name}.kv8.onnx"
                save_graph(model, swaps[name])
        with_kv = self.manifest.replaced(kv_cache={"dtype": kv_cache.DTYPE})
        return self._agreement(swaps, with_kv)

    def _has_cache_io(self, entry: dict[str, Any]) -> bool:
        return any(self.views.cache_of(v["name"], output=False) for v in entry["inputs"]) or any(
            self.views.cache_of(v["name"], output=True) for v in entry["outputs"])

    def report(self, result: Manifest, found: SearchResult) -> dict[str, Any]:
        import onnx

        self.progress("[6/6] accuracy report: the artifact and an fp16 artifact against fp32 on the held-out edits")
        fp16 = loweredcopy_files(self.manifest, self.work / "fp16", "fp16")
        runs = {}
        for label, art in (("quantized", result), ("fp16", fp16)):
            with OnnxRuntimeBackend(art) as be:
                pipe = EditPipeline(art, be)
                agreement = teacher_forced(pipe, self.text, self.refs, reuse_inputs=False)
                images = [run_edit(pipe, self.text, r.pair, r.seed).image for r in self.refs]
            runs[label] = (agreement, images)
        (q_agree, q_images), (h_agree, h_images) = runs["quantized"], runs["fp16"]
        ref_images = [r.image for r in self.refs]
        weights = {}
        for name in self.manifest.graphs:
            b32, b16, bq = (stored_bytes(onnx.load(str(art.graph_path(name)))) for art in (self.manifest, fp16, result))
            weights[name] = {"fp32": b32["weights"], "fp16": b16["weights"], "artifact": bq["weights"],
                             "ratio_to_fp16": bq["weights"] / b16["weights"] if b16["weights"] else None,
                             "tables": bq["tables"], "quantized": "quantized" in result.graphs[name]}
        quant = result.quantization
        if not found.skipped:  # the budget is judged on what the artifact computes (16-bit elsewhere, its KV
            # cache), not on the search's fp32-elsewhere variants: the manifest written after this says the same
            quant["search"].update(reached=q_agree.overall >= self.opts.min_bit_agreement,
                                   search_estimate=found.agreement)
        rep = {
            "mode": self.opts.mode, "method": self.method, "high_precision": self.opts.high_precision,
            "kv_cache": self.opts.kv_cache or "float32", "model": self.manifest.config.name,
            "weights_made_on": report.weights_made_on(self.manifest.source),
            "calibration_set": {**quant["calibration_set"], "description": self.calib.describe()},
            "per_scale_bit_agreement": q_agree.per_scale, "bit_agreement": q_agree.overall,
            "per_scale_logit_kl": q_agree.per_scale_kl, "bits_compared": sum(q_agree.bits),
            "fp16_per_scale_bit_agreement": h_agree.per_scale, "fp16_bit_agreement": h_agree.overall,
            "image_psnr_db": image_scores(q_images, ref_images)["psnr_db"],
            "image_ssim": image_scores(q_images, ref_images)["ssim"],
            "image_vs_fp16": image_scores(q_images, h_images), "fp16_image_vs_fp32": image_scores(h_images, ref_images),
            "weight_bytes": weights,
            "layer_groups": {"all": [g.name for g in self.groups], "excluded": [g.name for g in self.excluded],
                             "candidates": [g.name for g in self.candidates],
                             "quantized": quant["quantized_groups"]},
            "sensitivity": quant["search"],
            "versions": {**quant["versions"], "varedit_deploy": __version__}, "command": self.command,
        }
        if self.opts.kv_cache:
            rep["kv_cache_alone_bit_agreement"] = self._kv_cache_alone()
        rows = [(r.pair.load(), r.image, h, q) for r, h, q in zip(self.refs, h_images, q_images)]
        report.write(result.folder, rep, rows)
        return rep


def loweredcopy_files(manifest: Manifest, folder: Path, precision: str) -> Manifest:
    """The artifact with its graphs lowered to `precision` as `export --precision` writes them
    (an in-memory manifest over `folder`): the report's fp16 comparison."""
    import onnx

    graphs = {}
    for name, entry in manifest.graphs.items():
        lowered = graph_precision(name, precision)
        if name not in LOWERED_GRAPHS:
            graphs[name] = {**entry, "files": copy_files(manifest, entry["files"], folder)}
            continue
        target = folder / entry["files"][0]["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        model = lower(onnx.load(str(manifest.graph_path(name))), name, precision, manifest.step_io,
                      (manifest.ranges or {}).get(name))
        graphs[name] = graph_entry(folder, save_graph(model, target), entry, model, lowered, None)
    copy_files(manifest, manifest.companion_files(), folder)
    return Manifest(folder, {**manifest.data, "precision": precision, "graphs": graphs})
