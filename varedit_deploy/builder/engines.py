"""`varedit-deploy build`: parse every graph with TensorRT's ONNX parser and build engines.

One builder drives `tensorrt` (on a GPU host, for that GPU) and `tensorrt_rtx` (ahead of
time, on any host, for a named SM target). Engines, the timing cache and an engine manifest
go to `ART/engines/<flavour>-<version>-<target>-<precision>/`, written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifact import MANIFEST, Manifest, file_record, read_manifest, sha256_file
from ..engine_set import (ENGINE_MANIFEST, ENGINE_SCHEMA, attention_summary, build_command, engine_dir_name,
                          engine_precision, engine_set_files, read_engine_manifest)
from ..errors import OutputError, VareditError
from ..export.external_data import lower_graph
from ..export.precision import FP16_SAFE_MAX, LOWERED_GRAPHS, graph_precision, mixed_precision, out_of_range_nodes
from ..fileio import atomic_dir, check_writable, unlisted_files, write_bytes
from ..graph_io import plugin_record
from ..plugins.trt_plugin import register_plugin
from ..precisions import default_16bit
from ..runtime.gpu import current_compute_capability, gpu_available
from ..runtime.tensorrt_import import import_tensorrt
from .capabilities import check_supported, shipped_with, sm_number
from .network_report import mark_attentions_decomposable, network_io_dtypes, network_record
from ..engine_set import graph_profiles
from .tensorrt_api import make_logger, parser_plugin_library_dir, strongly_typed_network

RTX_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")


@dataclass(frozen=True)
class BuildOptions:
    flavour: str = "tensorrt-rtx"
    precision: str | None = None  # None: the artifact's own (see engine_set.engine_precision)
    target: str = "sm89"
    workspace_gib: float | None = None
    weight_streaming: bool = False
    timing_cache: Path | None = None
    strip_weights: bool = False  # refittable engines without their weights, refitted from the artifact at load
    strict_fp16: bool = False  # refuse an fp16 build whose range record has values beyond fp16's safe range


def _target(trt, opts: BuildOptions) -> str:
    if opts.flavour == "tensorrt-rtx":
        if opts.target not in RTX_TARGETS:
            raise VareditError(f"TensorRT-RTX builds for {', '.join(RTX_TARGETS)}; not {opts.target!r} "
                               "(Jetson Orin is sm87 and Hopper sm90: build those with TensorRT on the device)")
        return opts.target
    here = current_compute_capability()  # TensorRT builds for the GPU it runs on
    if opts.target not in ("current", here):
        raise VareditError(f"TensorRT builds for the GPU of this host ({here}), not {opts.target}")
    return here


def _configure(trt, builder, opts: BuildOptions, target: str, cache_bytes: bytes | None):
    config = builder.create_builder_config()
    # TF32 is on by default in both builders; our fp32 matrix products are meant to be fp32 (the
    # half graphs have no fp32 products to speed up), so it is off everywhere.
    config.clear_flag(trt.BuilderFlag.TF32)
    if opts.flavour == "tensorrt-rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), 0)
        # The runtime captures each call as a CUDA graph; TensorRT-RTX engines allow stream capture
        # only when every allocation is the application's (its contexts use our device memory).
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    if opts.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * 2**30))
    if opts.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if opts.strip_weights:  # the plan keeps no refittable weight; the runtime refits identical ones from the
        # artifact's graph files (TensorRT's weight-stripped engines: STRIP_PLAN with REFIT_IDENTICAL)
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    if opts.flavour == "tensorrt":  # TensorRT-RTX has no timing cache (its operations are no-ops)
        if not config.set_timing_cache(config.create_timing_cache(cache_bytes or b""), ignore_mismatch=False):
            raise VareditError(f"the timing cache {opts.timing_cache} was made on another device or TensorRT "
                               "(TensorRT refused it); delete it or give a new --timing-cache path")
    return config


def _parse(trt, builder, logger, manifest: Manifest, name: str, lower_to: str, ranges: dict[str, float] | None):
    """Parse graph `name` from its file, so external data works; an fp32 graph built in 16 bits is first
    lowered as a 16-bit artifact holds it (`lower_graph`: matrix work and the cache I/O; in fp16 the
    nodes its range record puts beyond fp16's safe range stay fp32), tensor by tensor."""
    path = manifest.graph_path(name)
    with tempfile.TemporaryDirectory() as tmp:
        if lower_to != "fp32" and name in LOWERED_GRAPHS:
            lowered = Path(tmp) / path.name
            lower_graph(path, name, lower_to, manifest.step_io, lowered, ranges)
            return parse_file(trt, builder, logger, lowered, name)
    return parse_file(trt, builder, logger, path, name)


def parse_file(trt, builder, logger, path: Path, name: str):
    """(strongly typed network, parser) of the ONNX file `path`; one error naming `name` if the parser refuses it."""
    network = strongly_typed_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
    if not ok or errors:
        raise VareditError(f"TensorRT's ONNX parser rejected {name}: " + "; ".join(errors or ["unknown error"]))
    return network, parser


def _fp16_ranges(manifest: Manifest, opts: BuildOptions, lower_to: str, target: str, names: list[str],
                 progress: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """The range record an fp16 build of fp32 graphs honours, per graph (empty for other builds). Says
    once what it keeps fp32, or that there is no record to go by; `strict_fp16` refuses out-of-range nodes."""
    if opts.precision != "fp16":
        return {}
    bf16 = f" ({target} has bf16: fp32's range, --precision bf16)" if default_16bit(target) == "bf16" else ""
    ranges = manifest.ranges if lower_to == "fp16" else None
    if ranges is None:
        if opts.strict_fp16:
            raise VareditError(f"--strict-fp16 checks fp16 against a range record, and artifact {manifest.folder} has "
                               f"none: record one with `varedit-deploy ranges --artifacts {manifest.folder}`{bf16}")
        progress(f"warning: fp16 without a range record: trained weights can pass fp16's range (Flan-T5's FFN does), "
                 f"which no check here can see; record one with `varedit-deploy ranges --artifacts {manifest.folder}` "
                 f"on the fp32 artifact{bf16}")
        return {}
    import onnx

    kept = {}
    for name in names:
        if name in ranges:
            nodes = out_of_range_nodes(onnx.load(str(manifest.graph_path(name)), load_external_data=False), ranges[name])
            if nodes:
                kept[name] = nodes
    if kept and opts.strict_fp16:
        listed = "; ".join(f"{g}: {', '.join(n[:3])}{' and more' if len(n) > 3 else ''} ({len(n)} nodes)"
                           for g, n in kept.items())
        raise VareditError(f"--strict-fp16: the range record has values beyond fp16's safe range ({FP16_SAFE_MAX:g}) "
                           f"at {listed}; build without --strict-fp16 to keep them fp32{bf16}")
    progress("range record: " + (", ".join(f"{g} keeps {len(n)} nodes fp32" for g, n in kept.items())
                                 or f"every recorded value within fp16's safe range ({FP16_SAFE_MAX:g})"))
    return ranges


def _check_parser_ops(trt, flavour: str, manifest: Manifest, names: list[str]) -> None:
    """Refuse, before any work, graphs whose operators this TensorRT's parser predates."""
    if flavour != "tensorrt":  # TensorRT-RTX (1.7 on) parses every operator we export
        return

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split(".")[:2])

    for name in names:
        for op, since in manifest.graphs[name].get("tensorrt_needs", {}).items():
            if version(trt.__version__) < version(since):
                shipped = shipped_with(trt.__version__)
                raise VareditError(f"TensorRT {trt.__version__}{f' ({shipped})' if shipped else ''} cannot parse ONNX "
                                   f"{op} (added in TensorRT {since}), which graph {name} uses; export with --attention "
                                   f"decomposed (opset 17) for this TensorRT, or build with TensorRT >= {since} "
                                   "(JetPack 7.2 ships 10.16)")


def build_engines(
    artifacts: str | Path, opts: BuildOptions, progress: Callable[[str], None] = print,
    graphs: list[str] | None = None,
) -> Path:
    manifest = read_manifest(artifacts)
    trt = import_tensorrt(opts.flavour)
    target = _target(trt, opts)
    opts = dataclasses.replace(opts, precision=engine_precision(manifest, opts.precision, target))
    # Quantised and half artifacts are typed already; an fp32 one is lowered per graph while parsing.
    lower_to = opts.precision if manifest.precision == "fp32" and manifest.quantization is None else "fp32"
    if opts.strip_weights and lower_to != "fp32":
        raise VareditError(f"--strip-weights refits each engine from the artifact's own graph files, and artifact "
                           f"{manifest.folder} holds fp32 graphs, not the {opts.precision} ones the engines would be "
                           f"built from: export with --precision {opts.precision} and build that")
    names = graphs or list(manifest.graphs)
    ranges = _fp16_ranges(manifest, opts, lower_to, target, names, progress)
    _check_parser_ops(trt, opts.flavour, manifest, names)
    check_supported(opts.flavour, target, opts.precision)
    plugins = _check_plugins(manifest, names)
    library_dir = parser_plugin_library_dir(trt) if plugins else None
    if library_dir is not None:
        return _build_in_child(artifacts, opts, graphs, progress, library_dir)
    if plugins:
        register_plugin(trt, arch=sm_number(target))
    logger = make_logger(trt, gpu_less=not gpu_available())
    builder = trt.Builder(logger)
    out = manifest.folder / "engines" / engine_dir_name(opts.flavour, trt.__version__, target, opts.precision)
    check_writable(out, "engine folder")
    _check_replaceable(out)
    if opts.timing_cache:
        check_writable(opts.timing_cache, "--timing-cache")
    cache_bytes = opts.timing_cache.read_bytes() if opts.timing_cache and opts.timing_cache.is_file() else None
    records: dict[str, Any] = {}
    with atomic_dir(out, replace=True) as tmp:
        config = None
        for i, name in enumerate(names, 1):
            t0 = time.perf_counter()
            network, _parser = _parse(trt, builder, logger, manifest, name, lower_to, ranges.get(name))
            parsed = network_record(network)
            math = _math_precision(manifest, name, opts.precision)
            # fp32 has no dedicated fused attention kernel: let each attention decompose.
            decomposable = math == "fp32" and mark_attentions_decomposable(trt, network) > 0
            config = _configure(trt, builder, opts, target, cache_bytes)
            profiles = graph_profiles(manifest, name)
            for prof in profiles:
                p = builder.create_optimization_profile()
                for tensor, (lo, opt, hi) in prof.shapes.items():
                    p.set_shape(tensor, lo, opt, hi)
                config.add_optimization_profile(p)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                hint = ""
                if opts.strip_weights and not gpu_available():  # measured with TensorRT-RTX 1.7.1 (RESULTS.md)
                    hint = ("; TensorRT-RTX compiles refittable (weight-stripped) engines with the CUDA driver, and "
                            "this machine has none: build them where a driver is installed, or here without "
                            "--strip-weights")
                raise VareditError(f"TensorRT failed to build {name} for {target} {opts.precision}{hint}")
            path = tmp / f"{name}.engine"
            path.write_bytes(memoryview(plan))
            if opts.flavour == "tensorrt":
                cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
            seconds = time.perf_counter() - t0
            records[name] = {**file_record(tmp, path), "source": manifest.graphs[name]["files"][0]["path"],
                             "source_sha256": manifest.graphs[name]["files"][0]["sha256"],
                             "profiles": [p.to_json() for p in profiles], "build_seconds": round(seconds, 2),
                             "network": parsed, "io": network_io_dtypes(network),
                             "mixed_precision": mixed_precision(name, opts.precision if lower_to != "fp32" else
                                                                manifest.graphs[name].get("precision", "fp32")),
                             "math": {"precision": math, "tf32": config.get_flag(trt.BuilderFlag.TF32),
                                      "attention_decomposable": decomposable}}
            progress(f"[{i:>2}/{len(names)}] {name:<14} {path.stat().st_size / 1e6:>8.2f} MB "
                     f"{len(profiles):>2} profile(s) {seconds:>6.1f} s  {attention_summary(parsed)}")
        if cache_bytes:
            (tmp / "timing.cache").write_bytes(cache_bytes)
        data = {
            "schema_version": ENGINE_SCHEMA, "flavour": opts.flavour, "tensorrt_version": trt.__version__,
            "target": target, "precision": opts.precision, "weight_streaming": opts.weight_streaming,
            "weights_stripped": opts.strip_weights,
            "artifact_manifest_sha256": sha256_file(manifest.folder / MANIFEST),
            "engines": records, "timing_cache": "timing.cache" if cache_bytes else None, "plugins": plugins,
            "builder": {"varedit_deploy": __version__, "python": platform.python_version(), "host": platform.node()},
            "rebuild": build_command(manifest.folder, opts.flavour, opts.target, opts.precision, opts.strip_weights),
        }
        (tmp / ENGINE_MANIFEST).write_text(json.dumps(data, indent=1))
    if opts.timing_cache and cache_bytes:
        write_bytes(opts.timing_cache, cache_bytes)
    progress(f"wrote {out}")
    return out


def _check_plugins(manifest: Manifest, names: list[str]) -> list[dict[str, str]]:
    """The plugins the graphs need (export --attention plugin), checked against ours; what the engine
    manifest records. Builds register the creator before parsing: the parser maps each plugin node
    to it by op type, `plugin_version` and `plugin_namespace`."""
    wanted = [manifest.graphs[n]["plugin"] for n in names if "plugin" in manifest.graphs[n]]
    if not wanted:
        return []
    have = plugin_record()
    for record in wanted:
        if {k: record[k] for k in have} != have:
            raise VareditError(f"the artifact's graphs need plugin {record['namespace']}::{record['op']} version "
                               f"{record['version']}; this varedit-deploy provides version {have['version']}: export "
                               "the artifact again with this version")
    return [have]


def _build_in_child(artifacts: str | Path, opts: BuildOptions, graphs: list[str] | None,
                    progress: Callable[[str], None], library_dir: Path) -> Path:
    """`build_engines` in a new process whose loader searches `library_dir` (see
    `parser_plugin_library_dir`); its progress lines are passed on."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(library_dir), env.get("LD_LIBRARY_PATH")) if p)
    request = json.dumps({"artifacts": str(artifacts), "graphs": graphs,
                          "opts": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(opts).items()}})
    child = subprocess.Popen([sys.executable, "-m", __name__, request], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    out = None
    for line in child.stdout:
        if line.startswith(_CHILD_RESULT):
            out = Path(line[len(_CHILD_RESULT):].strip())
        else:
            progress(line.rstrip("\n"))
    errors = child.stderr.read()
    if child.wait() or out is None:
        last = errors.strip().splitlines()[-1] if errors.strip() else f"exit status {child.returncode}"
        raise VareditError(f"building with the attention plugin (in a process that can load it) failed: {last}")
    return out


_CHILD_RESULT = "@engines "


def _child_main(request: str) -> int:
    data = json.loads(request)
    opts = BuildOptions(**{k: Path(v) if k == "timing_cache" and v else v for k, v in data["opts"].items()})
    try:
        out = build_engines(data["artifacts"], opts, graphs=data["graphs"])
    except VareditError as e:
        print(e, file=sys.stderr)
        return 1
    print(_CHILD_RESULT + str(out), flush=True)
    return 0


def _math_precision(manifest: Manifest, name: str, precision: str) -> str:
    """What a graph's matrix work runs in: its quantisation mode, or the precision it is built in."""
    entry = manifest.graphs[name]
    if "quantized" in entry:
        return entry["quantized"]["mode"]
    return entry.get("precision", "fp32") if manifest.quantization else graph_precision(name, precision)


def _check_replaceable(engine_dir: Path) -> None:
    """A rebuild replaces an engine set folder only if it holds nothing but that set's files."""
    if not engine_dir.exists() or not any(engine_dir.iterdir()):
        return
    foreign = unlisted_files(engine_dir, engine_set_files(read_engine_manifest(engine_dir)))
    if foreign:
        raise OutputError(f"{engine_dir} holds files its {ENGINE_MANIFEST} does not list ({', '.join(foreign)}); "
                          "move them away before rebuilding: a build deletes only what it wrote")


if __name__ == "__main__":  # the child of `_build_in_child`
    sys.exit(_child_main(sys.argv[1]))
