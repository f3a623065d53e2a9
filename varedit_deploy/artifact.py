"""The artifact folder contract between `export` and the runtimes: manifest.json and its checks.

An artifact is self-describing: the model config, the schedule, every graph's file(s) with
content hashes and I/O (names, dtypes, symbolic shapes, and concrete shapes per scale for the
step), the tokenizer files and the versions that made it. Runtimes read names and shapes from
here and never re-derive them; they refuse an artifact that is incomplete, altered or of a
schema they do not know, saying what is wrong and which command rebuilds it.

Verification is honest but fast at release size: every file's size always; small files'
sha256 on every load; a large file's sha256 once, recorded next to the artifact in
`verified.json` with the file's size and modification time, and trusted while both are
unchanged (`export` records it as it writes). `full` re-hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .config import ModelConfig
from .containment import ENGINE_MANIFEST, check_engine_paths, check_record, external_data_problems, inside
from .errors import ArtifactError, InputError, UnsafeArtifactError
from .fileio import write_text
from .graph_io import StepIO

SCHEMA_VERSION = 3  # 2: the source pass runs the step graph (source_embed, sar_pool); 3: step_io names
MANIFEST = "manifest.json"
STAMP = "verified.json"
# Files up to this size are hashed on every load; larger ones (external weights) once, then
# trusted through the stamp while their size and modification time are unchanged.
HASH_ON_LOAD_LIMIT = 16 * 2**20
VERIFY_MODES = ("none", "size", "quick", "full")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(folder: Path, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify_files(folder: Path, records: list[dict[str, Any]], mode: str = "quick") -> list[str]:
    """Problems with recorded files on disk (missing, resized, altered); empty when intact.

    'size': sizes only; 'quick': sizes, then sha256 of small files and of large files not
    stamped (in `folder`/verified.json) as verified at their current size and mtime; 'full':
    every sha256 now; 'none': nothing."""
    if mode not in VERIFY_MODES:
        raise InputError(f"unknown verification {mode!r}; choose one of {', '.join(VERIFY_MODES)}")
    if mode == "none":
        return []
    stamp = read_stamp(folder) if mode == "quick" else {}
    problems, hashed = [], []
    for rec in {r["path"]: r for r in records}.values():
        path = folder / rec["path"]
        if not path.is_file():
            problems.append(f"missing file {rec['path']}")
            continue
        stat = path.stat()
        if stat.st_size != rec["bytes"]:
            problems.append(f"{rec['path']} has {stat.st_size} bytes, the manifest says {rec['bytes']}")
        elif mode == "size" or (mode == "quick" and rec["bytes"] > HASH_ON_LOAD_LIMIT
                                and stamp.get(rec["path"]) == _stamp_entry(stat, rec["sha256"])):
            continue
        elif sha256_file(path) != rec["sha256"]:
            problems.append(f"{rec['path']} was altered (sha256 differs from the manifest)")
        elif rec["bytes"] > HASH_ON_LOAD_LIMIT:
            hashed.append(rec)
    if hashed and not problems:
        write_stamp(folder, hashed)
    return problems


@dataclass
class Manifest:
    """An artifact's manifest.json, read through typed properties (the runtimes' only view of it)."""

    folder: Path
    data: dict[str, Any]

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.data["model"])

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        return self.data["graphs"]

    @property
    def schedule(self) -> dict[str, Any]:
        """The schedule section (`schedule_record`): tokens, starts and shapes per scale and source pass."""
        return self.data["schedule"]

    @property
    def precision(self) -> str:
        """What the graphs store: fp32, fp16 or bf16 (a quantised artifact: its high precision)."""
        return self.data["precision"]

    @property
    def attention(self) -> str:
        """How the step's attentions were exported: fused, decomposed or plugin."""
        return self.data.get("attention", "decomposed")

    @property
    def step_io(self) -> StepIO:
        """The step graph's tensor names (graph_io.py), as the export wrote them."""
        return StepIO.from_json(self.data["step_io"])

    @property
    def preview(self) -> dict[str, Any] | None:
        """The stored preview projection's record (its file and fit report); None where there is none."""
        return self.data.get("preview")

    @property
    def weights(self) -> dict[str, Any]:
        """Per model part: its parameters and the graphs that store them."""
        return self.data.get("weights", {})

    @property
    def source(self) -> dict[str, Any]:
        """What the artifact was made from (the export command, or the fixture)."""
        return self.data.get("source", {})

    @property
    def exporter(self) -> dict[str, str]:
        """The versions that wrote the artifact."""
        return self.data.get("exporter", {})

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise ArtifactError(f"artifact {self.folder} has no graph {name!r} (it has {sorted(self.graphs)})")
        return self.folder / self.graphs[name]["files"][0]["path"]

    def has_graph(self, name: str) -> bool:
        return name in self.graphs

    def graph_bytes(self, name: str) -> int:
        """A graph's bytes on disk: its ONNX file and external data."""
        return sum(f["bytes"] for f in self.graphs[name]["files"])

    @property
    def quantization(self) -> dict[str, Any] | None:
        """What `varedit-deploy quantize` recorded (mode, method, exclusions, ...); None for exported artifacts."""
        return self.data.get("quantization")

    @property
    def kv_cache_dtype(self) -> str:
        """Element type of the KV caches as the step graph takes them: float32, the 16-bit type of a 16-bit
        artifact, or int8 (`quantize --kv-cache int8`)."""
        past = self.step_io.past(0)[0]
        return next(v["dtype"] for v in self.graphs["step"]["inputs"] if v["name"] == past)

    @property
    def tokenizer_file(self) -> Path | None:
        """The tokenizer the runtime reads (`tokenizer.json`); None for a fixture export (no text encoder)."""
        main = self.data.get("tokenizer", {}).get("main")
        return self.folder / main if main else None

    @property
    def tokenizer_graph(self) -> dict[str, Any] | None:
        """The tokenizer graph's record (its file, I/O, operators, the export's check against
        tokenizer.json); None for artifacts without one (older exports, unknown tokenizer layouts)."""
        return self.data.get("tokenizer", {}).get("graph")

    @property
    def tokenizer_graph_file(self) -> Path | None:
        """`tokenizer/tokenizer.onnx`: one string in, the ids tokenizer.json gives out; None where absent."""
        graph = self.tokenizer_graph
        return self.folder / graph["files"][0]["path"] if graph else None

    @property
    def max_tokens(self) -> int:
        """The longest instruction the text encoder takes, in tokens (the end token included)."""
        return int(self.data.get("tokenizer", {}).get("max_tokens", 512))

    @property
    def tokenizer_files(self) -> list[dict[str, Any]]:
        """The records of every tokenizer file shipped (the release's own files and `tokenizer.json`)."""
        return self.data.get("tokenizer", {}).get("files", [])

    @property
    def ranges(self) -> dict[str, dict[str, float]] | None:
        """The range record (`varedit-deploy ranges`): per graph, each tensor's largest absolute value in
        fp32 on real edits; None where none was recorded."""
        record = self.data.get("ranges")
        if record is None:
            return None
        data = json.loads((self.folder / record["file"]["path"]).read_text())
        return {graph: entry["values"] for graph, entry in data["graphs"].items()}

    def companion_files(self) -> list[dict[str, Any]]:
        """The records of the files besides the graphs that travel with them: tokenizer, preview
        projection, range record."""
        return (self.tokenizer_files + ([self.preview["file"]] if self.preview else [])
                + ([self.data["ranges"]["file"]] if "ranges" in self.data else []))

    def all_files(self) -> list[dict[str, Any]]:
        files = [f for g in self.graphs.values() for f in g["files"]]
        reports = (self.quantization or {}).get("files", [])  # a quantised artifact's accuracy report
        return files + self.companion_files() + reports

    def replaced(self, **sections: Any) -> "Manifest":
        """This manifest with whole sections replaced (in memory: a derived artifact being written)."""
        return Manifest(self.folder, {**self.data, **sections})

    def verify(self, mode: str = "quick") -> list[str]:
        """Problems with the files on disk (missing, resized, altered); empty when intact (see `verify_files`)."""
        return verify_files(self.folder, self.all_files(), mode)

    def external_data_problems(self) -> list[str]:
        """External-data references inside the graph files that leave the artifact, name a file the graph's
        record does not list, or point past a file's end (containment.py); empty when all are sound.
        A missing graph file is skipped: the verification reports it."""
        problems = []
        for graph in self.graphs.values():
            names = [f["path"] for f in graph["files"]]
            if (self.folder / names[0]).is_file():
                problems += external_data_problems(self.folder, names[0], names)
        return problems


def _stamp_entry(stat, sha256: str) -> dict[str, Any]:
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def read_stamp(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / STAMP).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_stamp(folder: Path, records: list[dict[str, Any]]) -> None:
    """Record that these files (whose sha256 was just checked or written) match the manifest.
    A read-only artifact simply stays unstamped: it is then hashed on every load."""
    stamp = read_stamp(folder)
    for rec in records:
        stamp[rec["path"]] = _stamp_entry((folder / rec["path"]).stat(), rec["sha256"])
    try:
        write_text(folder / STAMP, json.dumps(stamp, indent=1))
    except OSError:
        pass


def rebuild_hint(data: dict[str, Any], folder: Path) -> str:
    """How to rewrite the artifact in `folder` (the folder being read, wherever it was exported to)."""
    command = data.get("source", {}).get("command")
    if not command:
        return f"re-export it with `varedit-deploy export ... --out {shlex.quote(str(folder))} --overwrite`"
    args = shlex.split(command)
    if args[1:2] == ["export"] and "--out" in args[:-1]:
        args[args.index("--out") + 1] = str(folder)
        return "re-export it: " + shlex.join(args + ([] if "--overwrite" in args else ["--overwrite"]))
    return f"it was written by `{command}`: run that again"


def required_graphs(config: ModelConfig) -> list[str]:
    """The graphs every artifact of `config` has (a text encoder is optional: fixture exports lack one)."""
    return ["text_cond", "vae_encoder", "vae_decoder", "source_embed", "sar_pool", "step", "sample",
            *(f"next_input_{s}" for s in range(config.schedule.num_scales))]


def schedule_record(config: ModelConfig) -> dict[str, Any]:
    """The manifest's schedule section: what the loop sizes its buffers and views from."""
    sched, tcfg = config.schedule, config.transformer
    return {
        "sides": list(sched.sides),
        "tokens": list(sched.tokens),
        "starts": list(sched.starts),
        "source_tokens": sched.source_tokens,
        "latent_side": sched.latent_side,
        "image_size": config.image_size,
        "per_scale": [
            {"scale": s, "tokens": n, "past_targets": start, "past_len": sched.source_tokens + start,
             "sample_rows": n * tcfg.d_tok}
            for s, (n, start) in enumerate(zip(sched.tokens, sched.starts))
        ],
        # The source pass is a run of the step graph: the source tokens, no SAR, an empty past.
        "source_pass": {"tokens": sched.source_tokens, "sar_tokens": 0, "past_targets": 0, "past_len": 0},
    }


def structure_problems(data: dict[str, Any], config: ModelConfig) -> list[str]:
    """What a truncated or hand-edited manifest lacks, found before anything is loaded from it."""
    graphs = data.get("graphs")
    if not isinstance(graphs, dict):
        return ["it has no table of graphs"]
    problems = []
    for section, lists in (("tokenizer", "files"), ("quantization", "files"), ("preview", None)):
        value = data.get(section)
        if value is not None and not (isinstance(value, dict) and (
                isinstance(value.get(lists, []), list) if lists else isinstance(value.get("file"), dict))):
            problems.append(f"its {section} section is not a valid record")
    missing = [name for name in required_graphs(config) if name not in graphs]
    if missing:
        problems.append(f"graphs missing: {', '.join(missing)}")
    for name, graph in graphs.items():
        files = graph.get("files") if isinstance(graph, dict) else None
        if not (isinstance(files, list) and files and isinstance(graph.get("ops"), dict)
                and all(isinstance(f, dict) and {"path", "bytes", "sha256"} <= set(f) for f in files)):
            problems.append(f"graph {name!r} has no valid record of its files and operators")
    if not isinstance(data.get("precision"), str):
        problems.append("it does not say the graphs' precision")
    if data.get("schedule") != schedule_record(config):
        problems.append("its schedule does not match its model section")
    try:
        StepIO.from_json(data.get("step_io"))
    except ArtifactError as e:
        problems.append(str(e).removeprefix("the manifest's "))
    return problems


def check_contained(manifest: Manifest) -> None:
    """Refuse an artifact whose manifest names a file outside its folder (an absolute or `..` path, a
    symbolic link that leaves it) or declares an impossible size, and one whose engine folders or
    engine manifests lead elsewhere: UnsafeArtifactError naming the entry, whichever command reads
    it. Nothing is opened but the manifests (see containment.py)."""
    root = manifest.folder
    data = manifest.data
    try:
        for name, graph in manifest.graphs.items():
            for i, record in enumerate(graph["files"]):
                check_record(root, record, f"graphs.{name}.files[{i}]")
        for i, record in enumerate(manifest.tokenizer_files):
            check_record(root, record, f"tokenizer.files[{i}]")
        main = data.get("tokenizer", {}).get("main")
        if main is not None and main not in {f["path"] for f in manifest.tokenizer_files}:
            raise UnsafeArtifactError(f"tokenizer.main is {main!r}, which is not one of the tokenizer files it lists "
                                      "(and so is not verified)")
        if manifest.preview is not None:
            check_record(root, manifest.preview["file"], "preview.file")
        for i, record in enumerate((manifest.quantization or {}).get("files", [])):
            check_record(root, record, f"quantization.files[{i}]")
        engines = root / "engines"
        if engines.is_symlink() or engines.is_dir():
            inside(root, "engines", "the engines folder")
            for entry in sorted(engines.iterdir()) if engines.is_dir() else []:
                if entry.is_symlink() or entry.is_dir():
                    inside(root, f"engines/{entry.name}", "an engine folder")
                    check_engine_paths(entry, f"engines/{entry.name}/{ENGINE_MANIFEST}")
    except UnsafeArtifactError as e:
        raise UnsafeArtifactError(f"artifact {root} refused: {e}; an artifact may name only files inside its own "
                                  "folder, so nothing in it was opened") from None


def read_manifest(folder: str | Path, verify: str = "quick", scan_graphs: bool = True) -> Manifest:
    """Load and check an artifact's manifest (`verify`: see `Manifest.verify`); raise
    ArtifactError naming every problem. Every file it names must lie inside `folder`
    (`check_contained`), and, with `scan_graphs`, every external-data reference inside its
    graphs too (`Manifest.external_data_problems`: read before any loader opens them)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"artifact {folder}: no such folder")
    if not path.is_file():
        raise ArtifactError(f"artifact {folder} has no {MANIFEST}; it is not an exported artifact "
                            "(create one with `varedit-deploy export`)")
    try:
        inside(folder, MANIFEST, MANIFEST)
    except UnsafeArtifactError as e:
        raise UnsafeArtifactError(f"artifact {folder} refused: {e}") from None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"artifact {folder}: {MANIFEST} is not valid JSON ({e}); "
                            "delete the folder and export it again") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"artifact {folder}: manifest schema version {version!r} is not supported (this "
                            f"varedit-deploy reads version {SCHEMA_VERSION}); delete the folder and export it again")
    manifest = Manifest(folder, data)
    try:
        manifest.config
    except Exception as e:
        raise ArtifactError(f"artifact {folder}: the model section of {MANIFEST} is invalid ({e})") from None
    problems = structure_problems(data, manifest.config)
    if problems:
        raise ArtifactError(f"artifact {folder}: {MANIFEST} is incomplete: {'; '.join(problems)}; "
                            f"{rebuild_hint(data, folder)}")
    check_contained(manifest)
    problems = manifest.verify(verify)
    if problems:
        raise ArtifactError(f"artifact {folder} is damaged: {'; '.join(problems)}; {rebuild_hint(data, folder)}")
    if scan_graphs:
        refuse_external_data(manifest)
    return manifest


def refuse_external_data(manifest: Manifest) -> None:
    """Raise UnsafeArtifactError, in one line, if a graph's external data is not sound (see
    `Manifest.external_data_problems`)."""
    problems = manifest.external_data_problems()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UnsafeArtifactError(f"artifact {manifest.folder} refused: {problems[0]}{more}; a graph may read only "
                                  "its own files of the artifact, so none was opened")


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    """Write (or replace) the manifest whole or not at all."""
    write_text(folder / MANIFEST, json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=1))
