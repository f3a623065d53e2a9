"""The engine set contract between `build`, the TensorRT runtime, `inspect`, `plan` and `export`.

An engine set is `ART/engines/<flavour>-<version>-<target>-<precision>/`: one engine per graph,
an optional timing cache and `engines.json`, which records what each engine was built from
(the artifact manifest's and each graph's sha256), its optimisation profiles, its math mode and
what TensorRT parsed. Everything here is plain data: reading, naming, listing, verifying and
describing a set, deciding whether it can run on this TensorRT and GPU, and every graph's
optimisation profiles (also what ONNX Runtime's TensorRT providers are given); building is
`builder/`, running is `runtime/tensorrt_backend.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifact import MANIFEST, STAMP, Manifest, sha256_file, verify_files
from .containment import ENGINE_MANIFEST, check_record, inside
from .errors import ArtifactError, UnsafeArtifactError, VareditError
from .graph_io import plugin_record
from .precisions import ENGINE_PRECISIONS, QUANTIZED_MODES, default_16bit, describe_precision

ENGINE_SCHEMA = 2  # 2: per-graph math mode and parsed network; TF32 off


def engine_dir_name(flavour: str, version: str, target: str, precision: str) -> str:
    return f"{flavour}-{version}-{target}-{precision}"


def build_command(artifacts: Path, flavour: str, target: str, precision: str, strip_weights: bool = False) -> str:
    """The command that (re)builds an engine set."""
    return (f"varedit-deploy build --artifacts {artifacts} --flavour {flavour} --target {target} "
            f"--precision {precision}" + (" --strip-weights" if strip_weights else ""))


def engine_precision(manifest: Manifest, requested: str | None, target: str | None) -> str:
    """The precision engines of this artifact are built in for GPU `target` ('sm89'): a quantised
    artifact's mode, an fp16/bf16 artifact's stored precision, and for an fp32 artifact what is asked
    (`default_16bit(target)` when nothing is)."""
    quant = manifest.quantization
    stored = manifest.precision
    if requested is not None and requested not in ENGINE_PRECISIONS:
        raise VareditError(f"unknown precision {requested!r}; choose one of {', '.join(ENGINE_PRECISIONS)}")
    if quant is not None:
        if requested not in (None, quant["mode"]):
            raise VareditError(f"artifact {manifest.folder} holds {describe_precision(quant['mode'])} Q/DQ graphs "
                               f"({quant['high_precision']} elsewhere); build it with --precision {quant['mode']}, "
                               f"or build {requested} engines from its fp32 source {quant['source_artifact']}")
        return quant["mode"]
    if requested in QUANTIZED_MODES:
        raise VareditError(f"{describe_precision(requested)} engines are built from a quantised artifact: "
                           f"varedit-deploy quantize --artifacts {manifest.folder} --mode {requested} --out ART-{requested}")
    if stored != "fp32" and requested not in (None, stored):
        raise VareditError(f"artifact {manifest.folder} holds {stored} graphs; build --precision {stored}, "
                           f"or export fp32 graphs to build {requested} engines")
    return requested or (stored if stored != "fp32" else default_16bit(target))


def engine_sets(artifact: Path) -> list[Path]:
    """The engine set folders of an artifact (`engines/*/`), built or not."""
    folder = Path(artifact) / "engines"
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def read_engine_manifest(engine_dir: Path) -> dict[str, Any]:
    path = Path(engine_dir) / ENGINE_MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{engine_dir} has no {ENGINE_MANIFEST}; build engines with `varedit-deploy build`")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("engines"), dict):
            raise ValueError("no engines section")
        for name, rec in data["engines"].items():
            if not (isinstance(rec, dict) and {"path", "bytes", "sha256"} <= set(rec)
                    and isinstance(rec.get("profiles", []), list)):
                raise ValueError(f"the record of engine {name!r} lacks its path, size or sha256")
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a valid engine manifest ({e}); rebuild the engines") from None
    try:  # every file it names lies inside the engine folder (containment.py)
        for name, rec in data["engines"].items():
            check_record(Path(engine_dir), rec, f"engines.{name}")
        if data.get("timing_cache") is not None:
            inside(Path(engine_dir), data["timing_cache"], "timing_cache")
    except UnsafeArtifactError as e:
        raise UnsafeArtifactError(f"{path} refused: {e}; an engine set may name only files inside its own folder, "
                                  "so none was opened") from None
    return data


def engine_set_files(data: dict[str, Any]) -> list[str]:
    """Every file an engine set consists of, relative to its folder."""
    files = [ENGINE_MANIFEST, STAMP, *(rec["path"] for rec in data["engines"].values())]
    return files + ([data["timing_cache"]] if data.get("timing_cache") else [])


def verify_engine_set(engine_dir: Path, data: dict[str, Any], mode: str) -> list[str]:
    """Engine files missing, resized or altered (`mode`: see `artifact.verify_files`); empty when intact."""
    return verify_files(Path(engine_dir), list(data["engines"].values()), mode)


def check_engines(engine_dir: str | Path, manifest: Manifest, tensorrt_version: str,
                  compute_capability: str | None) -> list[str]:
    """What keeps these engines from running here (empty when they can): artifact, files, library, GPU."""
    engine_dir = Path(engine_dir)
    data = read_engine_manifest(engine_dir)
    problems = verify_engine_set(engine_dir, data, "quick")
    if data.get("schema_version") != ENGINE_SCHEMA:
        problems.append(f"engine manifest schema {data.get('schema_version')!r}, this runtime reads {ENGINE_SCHEMA}")
    if data.get("artifact_manifest_sha256") != sha256_file(manifest.folder / MANIFEST):
        problems.append("the engines were built from another export of this artifact (manifest hash differs)")
    for name in manifest.graphs:
        rec = data.get("engines", {}).get(name)
        if rec is None:
            problems.append(f"no engine for graph {name}")
        elif rec["source_sha256"] != manifest.graphs[name]["files"][0]["sha256"]:
            problems.append(f"engine {name} was built from a different {rec['source']}")
        elif rec.get("math", {}).get("precision") == "fp32" and rec["math"]["tf32"]:
            problems.append(f"engine {name} is meant to be fp32 but was built with TF32 ({math_summary(rec['math'])})")
    have = plugin_record()
    for record in data.get("plugins", []):
        if (record["namespace"], record["op"]) != (have["namespace"], have["op"]):
            problems.append(f"the engines need plugin {record['namespace']}::{record['op']}, which this varedit-deploy "
                            "does not provide")
        elif record["version"] != have["version"]:
            problems.append(f"the engines need plugin {record['namespace']}::{record['op']} version {record['version']}, "
                            f"this varedit-deploy has version {have['version']}")
    if data.get("tensorrt_version") != tensorrt_version:
        problems.append(f"built with {data.get('flavour')} {data.get('tensorrt_version')}, "
                        f"installed is {tensorrt_version}")
    if compute_capability is not None and data.get("target") != compute_capability:
        problems.append(f"built for {data.get('target')}, this GPU is {compute_capability}")
    return problems


# ------------------------------------------------------------------ optimisation profiles
# Every graph's profiles, as plain data computed from the artifact manifest: what `build` gives
# TensorRT and what ONNX Runtime's TensorRT providers are given at run time. `step` and `sample`
# get one fixed-shape profile per scale, and `step` one more for the source pass (source tokens,
# no SAR, empty past): the weights exist once in the engine; each call gets kernels tuned for its
# exact lengths and can be captured as a CUDA graph. Only the instruction length stays a range.
# Graphs without dynamic inputs get none.

TEXT_LEN = (1, 32, 512)  # min / opt / max instruction tokens (T5 limit 512)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: (min, opt, max) shape of every dynamic input."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def _resolve(shape: list, dims: dict[str, int]) -> Shape:
    return tuple(d if isinstance(d, int) else dims[d] for d in shape)


def _profile(name: str, inputs: list[dict], dims: dict[str, int], text_len: tuple[int, int, int]) -> Profile:
    shapes = {}
    for spec in inputs:
        if all(isinstance(d, int) for d in spec["shape"]):
            continue
        lo, opt, hi = ({**dims, "text_len": t} for t in text_len)
        shapes[spec["name"]] = (_resolve(spec["shape"], lo), _resolve(spec["shape"], opt), _resolve(spec["shape"], hi))
    return Profile(name, shapes)


def graph_profiles(manifest: Manifest, graph: str, text_len: tuple[int, int, int] = TEXT_LEN) -> list[Profile]:
    """The profiles `graph` is built with, in the order the runtime selects them."""
    inputs = manifest.graphs[graph]["inputs"]
    schedule = manifest.schedule
    if graph in ("step", "sample"):
        profiles = [
            _profile(f"scale_{p['scale']}", inputs,
                     {"tokens": p["tokens"], "sar_tokens": p["tokens"], "past_targets": p["past_targets"],
                      "past_len": p["past_len"], "rows": p["sample_rows"]}, text_len)
            for p in schedule["per_scale"]
        ]
        if graph == "step":
            src = schedule["source_pass"]
            profiles.append(_profile("source_pass", inputs, {k: src[k] for k in ("tokens", "sar_tokens", "past_targets",
                                                                                  "past_len")}, text_len))
        return profiles
    profile = _profile("default", inputs, {}, text_len)
    return [profile] if profile.shapes else []


def select_profile(profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile (engine manifest form) whose [min, max] holds every given shape."""
    for index, profile in enumerate(profiles):
        if all(tensor in shapes and len(shapes[tensor]) == len(lo)
               and all(a <= d <= b for a, d, b in zip(lo, shapes[tensor], hi))
               for tensor, (lo, _opt, hi) in profile["shapes"].items()):
            return index
    raise ValueError(f"no optimisation profile accepts shapes {shapes}")


def math_summary(math: dict[str, Any]) -> str:
    """One engine's math mode as the manifest records it, e.g. 'fp32, TF32 off, attention decomposable'."""
    parts = [math["precision"], f"TF32 {'on' if math['tf32'] else 'off'}"]
    if math["attention_decomposable"]:
        parts.append("attention decomposable")
    return ", ".join(parts)


def attention_summary(network: dict[str, Any]) -> str:
    """What TensorRT made of a graph's attentions (an engine manifest's `network` record)."""
    return f"attention: {network['fused_attentions']} fused, {network['attention_chains']} MatMul-Softmax-MatMul"


def describe_engine_set(engine_dir: str | Path) -> list[str]:
    """Lines for `inspect`: what each engine of a set computes in and what TensorRT parsed."""
    engine_dir = Path(engine_dir)
    try:
        data = json.loads((engine_dir / ENGINE_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"engines {engine_dir.name}: {ENGINE_MANIFEST} is unreadable ({e}); rebuild with `varedit-deploy build`"]
    head = f"engines {engine_dir.name}: {data['flavour']} {data['tensorrt_version']} {data['target']} {data['precision']}"
    if data.get("schema_version") != ENGINE_SCHEMA:
        return [f"{head}: engine manifest schema {data.get('schema_version')!r} records no math mode or layers; "
                f"rebuild: {data.get('rebuild', 'varedit-deploy build')}"]
    lines = [head]
    for name, rec in data["engines"].items():
        net = rec["network"]
        layers = ", ".join(f"{kind} {n}" for kind, n in sorted(net["layers"].items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"  {name:<14} {math_summary(rec['math'])}; {attention_summary(net)}; "
                     f"{sum(net['layers'].values())} layers: {layers}")
    return lines
