"""`varedit-deploy inspect`: what an artifact holds, and whether every file is what its manifest says.

Graphs and tokenizer files are checked against the artifact manifest, each built engine set
against its engine manifest (size and sha256 of every file, in full), and each engine set
against the artifact: engines built from another export of it cannot run and are reported.
"""

from __future__ import annotations

from pathlib import Path

from .artifact import MANIFEST, Manifest, read_manifest, refuse_external_data, sha256_file
from .engine_set import describe_engine_set, engine_sets, read_engine_manifest, verify_engine_set
from .errors import ArtifactError, UnsafeArtifactError


def inspect_artifact(folder: str | Path) -> tuple[list[str], bool]:
    """Readable lines describing the artifact in `folder`, and whether everything is intact."""
    # Every file the manifests name is checked to lie inside the artifact before anything is read; the
    # graphs' external-data references once their files are known intact (a damaged file is listed instead).
    manifest = read_manifest(folder, verify="none", scan_graphs=False)
    cfg, sched = manifest.config, manifest.schedule
    lines = [
        f"artifact {manifest.folder}",
        f"  model {cfg.name}: depth {cfg.transformer.depth}, width {cfg.transformer.dim}, "
        f"{cfg.transformer.heads} heads, {cfg.transformer.d_tok} bits/token, {sched['image_size']} px, "
        f"{len(sched['sides'])} scales {sched['sides']}",
        f"  precision {manifest.precision}; exported by {_exported_by(manifest.exporter)}",
    ]
    quant = manifest.quantization
    if quant is not None:
        groups = len(quant["quantized_groups"]) + len(quant["kept_in_high_precision"]) + len(quant["excluded_groups"])
        lines.append(f"  quantised {quant['mode']} ({quant['method']}), {quant['high_precision']} elsewhere, KV cache "
                     f"{manifest.kv_cache_dtype}: {len(quant['quantized_groups'])} of {groups} layer "
                     f"groups; accuracy report {quant['report']}")
    lines.append(f"  {'graph':<14} {'MB':>9} {'ops':>5}  TensorRT-unsupported")
    for name, g in manifest.graphs.items():
        mb = manifest.graph_bytes(name) / 1e6
        needs = [f"{op} (TensorRT >= {v})" for op, v in g.get("tensorrt_needs", {}).items()]
        unsupported = ", ".join([*g["tensorrt_unsupported_ops"], *needs]) or "-"
        lines.append(f"  {name:<14} {mb:>9.2f} {sum(g['ops'].values()):>5}  {unsupported}")
    tok = ", ".join(f["path"] for f in manifest.tokenizer_files)
    lines.append(f"  tokenizer: {tok or 'none (fixture export: starts at text_cond)'}")
    problems = [f"damaged: {p}" for p in manifest.verify("full")]
    if not problems:
        refuse_external_data(manifest)
    checked = len(manifest.all_files())
    sets = engine_sets(manifest.folder)
    for engine_dir in sets:
        line, engine_problems, files = _engine_set(engine_dir, manifest)
        lines.append(line)
        if not engine_problems:  # what each engine computes in and what TensorRT parsed
            lines += ["  " + detail for detail in describe_engine_set(engine_dir)[1:]]
        problems += engine_problems
        checked += files
    if not sets:
        lines.append("  engines: none built (see `varedit-deploy build`)")
    if problems:
        lines += [f"PROBLEM {p}" for p in problems]
    else:
        lines.append(f"complete and intact ({checked} files, sizes and sha256 verified)")
    return lines, not problems


def _exported_by(exporter: dict[str, str]) -> str:
    names = {"varedit_deploy": "varedit-deploy", "python": "Python"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in exporter.items()) or "unknown"


def _engine_set(engine_dir: Path, manifest: Manifest) -> tuple[str, list[str], int]:
    """One line about an engine set, its problems, and how many of its files were checked."""
    where = engine_dir.relative_to(manifest.folder).as_posix()
    try:
        data = read_engine_manifest(engine_dir)
    except UnsafeArtifactError:
        raise  # refused, not listed: a set that names files elsewhere is no one's to describe
    except ArtifactError as e:
        return f"  {where}: unreadable", [str(e)], 0
    records = data["engines"]
    mb = sum(r["bytes"] for r in records.values()) / 1e6
    problems = [f"damaged: {where}/{p}" for p in verify_engine_set(engine_dir, data, "full")]
    if data.get("artifact_manifest_sha256") != sha256_file(manifest.folder / MANIFEST):
        problems.append(f"stale: {where} was built from another export of this artifact; rebuild it: "
                        f"{data.get('rebuild', 'varedit-deploy build')}")
    lacking = sorted(set(manifest.graphs) - set(records))
    if lacking:
        problems.append(f"incomplete: {where} has no engine for {', '.join(lacking)}")
    line = (f"  {where}: {len(records)} engines, {mb:.2f} MB, {data.get('flavour')} "
            f"{data.get('tensorrt_version')} for {data.get('target')}, {data.get('precision')}")
    return line, problems, len(records)
