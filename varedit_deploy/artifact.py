"""The artifact folder contract between `export` and the runtimes: manifest.json and its checks.

An artifact is self-describing: the model config, the schedule, every graph's file(s) with
content hashes and I/O (names, dtypes, symbolic shapes, and concrete shapes per scale for the
step), the tokenizer files and the versions that made it. Runtimes read names and shapes from
here and never re-derive them; they refuse an artifact that is incomplete, altered or of a
schema they do not know, saying what is wrong and which command rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Files up to this size are hashed on every load; larger ones (external weights) are checked by
# size on load and hashed in full by `varedit-deploy inspect`.
HASH_ON_LOAD_LIMIT = 256 * 2**20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(folder: Path, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


@dataclass
class Manifest:
    folder: Path
    data: dict[str, Any]

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.data["model"])

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        return self.data["graphs"]

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise ArtifactError(f"artifact {self.folder} has no graph {name!r} (it has {sorted(self.graphs)})")
        return self.folder / self.graphs[name]["files"][0]["path"]

    def has_graph(self, name: str) -> bool:
        return name in self.graphs

    @property
    def quantization(self) -> dict[str, Any] | None:
        """What `varedit-deploy quantize` recorded (mode, method, exclusions, ...); None for exported artifacts."""
        return self.data.get("quantization")

    @property
    def kv_cache_dtype(self) -> np.dtype:
        """Element type of the KV caches the graphs read and write (int8 for an 8-bit-cache artifact)."""
        return np.dtype(self.data.get("kv_cache", {}).get("dtype", "float32"))

    @property
    def tokenizer_file(self) -> Path | None:
        main = self.data.get("tokenizer", {}).get("main")
        return self.folder / main if main else None

    def all_files(self) -> list[dict[str, Any]]:
        files = [f for g in self.graphs.values() for f in g["files"]]
        return files + self.data.get("tokenizer", {}).get("files", [])

    def verify(self, full: bool = False) -> list[str]:
        """Problems with the files on disk (missing, resized, altered); empty when intact."""
        problems = []
        for rec in self.all_files():
            path = self.folder / rec["path"]
            if not path.is_file():
                problems.append(f"missing file {rec['path']}")
            elif path.stat().st_size != rec["bytes"]:
                problems.append(f"{rec['path']} has {path.stat().st_size} bytes, the manifest says {rec['bytes']}")
            elif (full or rec["bytes"] <= HASH_ON_LOAD_LIMIT) and sha256_file(path) != rec["sha256"]:
                problems.append(f"{rec['path']} was altered (sha256 differs from the manifest)")
        return problems


def rebuild_hint(data: dict[str, Any] | None) -> str:
    source = (data or {}).get("source", {})
    if source.get("command"):
        return f"re-export it: {source['command']}"
    return "re-export it with `varedit-deploy export`"


def read_manifest(folder: str | Path, verify: bool = True, full: bool = False) -> Manifest:
    """Load and check an artifact's manifest; raise ArtifactError naming every problem."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"artifact {folder}: no such folder")
    if not path.is_file():
        raise ArtifactError(f"artifact {folder} has no {MANIFEST}; it is not an exported artifact "
                            "(create one with `varedit-deploy export`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"artifact {folder}: {MANIFEST} is not valid JSON ({e}); {rebuild_hint(None)}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"artifact {folder}: manifest schema version {version!r} is not supported "
                            f"(this varedit-deploy reads version {SCHEMA_VERSION}); {rebuild_hint(data)}")
    manifest = Manifest(folder, data)
    try:
        manifest.config
    except Exception as e:
        raise ArtifactError(f"artifact {folder}: the model section of {MANIFEST} is invalid ({e})") from None
    if verify:
        problems = manifest.verify(full)
        if problems:
            raise ArtifactError(f"artifact {folder} is damaged: " + "; ".join(problems) + f"; {rebuild_hint(data)}")
    return manifest


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=1))
