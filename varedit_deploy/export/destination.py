"""Where an export may write, and which built engines survive a re-export.

An export never deletes what it did not write. `--out` may be a new or empty folder; an
existing artifact is replaced only when asked (`--overwrite`) and only if it holds nothing
its manifests do not list. Engine sets whose every engine was built from a graph the new export
reproduces byte for byte (same model and schedule) are carried into the new artifact; the
others are dropped, and both are reported.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..artifact import MANIFEST, STAMP, Manifest, read_manifest, sha256_file
from ..engine_set import ENGINE_MANIFEST, engine_set_files, engine_sets, read_engine_manifest, verify_engine_set
from ..errors import ArtifactError, OutputError, UnsafeArtifactError
from ..fileio import check_writable, unlisted_files


def check_export_target(out: str | Path, overwrite: bool) -> Manifest | None:
    """Refuse an `out` an export must not write to; return the artifact it will replace, if any."""
    out = Path(out)
    if out.is_symlink():  # the artifact is replaced by renaming folders, which would replace the link itself
        raise OutputError(f"--out {out} is a symbolic link; give the folder it points to ({out.resolve()})")
    check_writable(out, "--out")
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the artifact")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    if MANIFEST not in entries:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} in all)" if len(entries) > 5 else "")
        raise OutputError(f"--out {out} is a folder of other files ({shown}), not an artifact; "
                          "export into a new or empty folder")
    if not overwrite:
        raise OutputError(f"--out {out} already holds an artifact; add --overwrite to replace it "
                          "(built engines whose graphs do not change are kept)")
    try:
        previous = read_manifest(out, verify="none", scan_graphs=False)  # nothing in it is opened, only listed
    except ArtifactError as e:
        raise OutputError(f"{e}; an export replaces only an artifact whose files it can list") from None
    foreign = unlisted_files(out, _artifact_files(previous))
    if foreign:
        raise OutputError(f"--out {out} holds files its manifest does not list ({', '.join(foreign)}); "
                          "move them away first: an export deletes only what it wrote")
    return previous


def _artifact_files(manifest: Manifest) -> list[str]:
    files = [MANIFEST, STAMP, *(rec["path"] for rec in manifest.all_files())]
    for folder in engine_sets(manifest.folder):
        try:
            listed = engine_set_files(read_engine_manifest(folder))
        except UnsafeArtifactError as e:
            raise OutputError(f"{e}; an export replaces only an artifact whose files it can list") from None
        except ArtifactError:
            continue  # an engine folder we cannot read is not known to be ours
        prefix = folder.relative_to(manifest.folder).as_posix()
        files += [f"{prefix}/{name}" for name in listed]
    return files


def carry_engines(previous: Manifest | None, new_folder: Path, progress: Callable[[str], None]) -> None:
    """Link the previous artifact's still-valid engine sets into `new_folder` (manifest written).

    Engine files are hard-linked (copied across file systems), so the previous artifact stays
    intact until the new one replaces it; each engines.json is rewritten for the new manifest.
    """
    if previous is None:
        return
    new = read_manifest(new_folder, verify="none")
    for folder in engine_sets(previous.folder):
        reason = _stale_reason(folder, previous, new)
        if reason:
            progress(f"dropped engines/{folder.name}: {reason}; rebuild it with `varedit-deploy build`")
            continue
        data = read_engine_manifest(folder)
        target = new_folder / "engines" / folder.name
        target.mkdir(parents=True)
        for name in engine_set_files(data):
            if name != ENGINE_MANIFEST and (folder / name).is_file():  # the verified stamp may not exist
                _link_or_copy(folder / name, target / name)
        data["artifact_manifest_sha256"] = sha256_file(new_folder / MANIFEST)
        (target / ENGINE_MANIFEST).write_text(json.dumps(data, indent=1))
        progress(f"kept engines/{folder.name}: built from graphs this export reproduces byte for byte")


def _stale_reason(folder: Path, previous: Manifest, new: Manifest) -> str | None:
    """Why an engine set cannot serve the new artifact, or None when it can."""
    try:
        data = read_engine_manifest(folder)
    except ArtifactError as e:
        return str(e)
    damage = verify_engine_set(folder, data, "quick")
    if damage:
        return "damaged: " + "; ".join(damage)
    if data.get("artifact_manifest_sha256") != sha256_file(previous.folder / MANIFEST):
        return "it was already stale (built from an earlier export)"
    if new.config != previous.config or new.schedule != previous.schedule:
        return "the model or its schedule changed"

    def files(manifest: Manifest, name: str) -> list[tuple[str, str]]:
        return [(f["path"], f["sha256"]) for f in manifest.graphs.get(name, {}).get("files", [])]

    # The .onnx of a graph with external weights names them only: its weights file must be the same too.
    changed = [name for name, rec in data["engines"].items()
               if name not in new.graphs or new.graphs[name]["files"][0]["sha256"] != rec["source_sha256"]
               or files(new, name) != files(previous, name)]
    return f"graphs changed: {', '.join(changed)}" if changed else None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
