"""Artifacts stay inside themselves: every file a manifest or an ONNX graph names is checked before use.

Artifacts and engine folders come from model hubs and shared drives, so what their manifests say is
input, not fact. A file they name must be a plain relative path (normalised, no `..`, not absolute,
no drive or backslash), lie inside the folder after every symbolic link on the way is followed, and
declare a plausible size. The same holds for the `location` of every external-data tensor inside an
ONNX graph, which ONNX Runtime, TensorRT's parser and `onnx.load` would otherwise open wherever it
points: those are read here from the protobuf wire format (no `onnx` package needed, weights never
loaded), every tensor of the model (initializers, Constant values, sparse tensors, subgraphs,
functions), and each must name a file of its own graph's manifest record (so it is hashed) with
its offset and length inside that file.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import UnsafeArtifactError

ENGINE_MANIFEST = "engines.json"  # an engine set's manifest (engine_set.py)
MAX_FILE_BYTES = 2**40  # 1 TiB: no file of any release comes near (8B-1024's largest is ~32 GB)
SHA256 = re.compile(r"[0-9a-f]{64}")
EXTERNAL_DATA_KEYS = ("location", "offset", "length", "checksum")  # what onnx.save_model writes
_DIGITS = re.compile(r"[0-9]+")
# protobuf's own default nesting limit (C++ and upb): deeper models are refused by the loaders too.
MAX_NESTING = 100


def inside(root: Path, relative: Any, entry: str, base: Path | None = None) -> Path:
    """`base / relative` (base: `root`), refused unless `relative` is a plain relative path whose
    target, every link followed, lies inside `root`. `entry` names what gave the path, for the error."""
    if not isinstance(relative, str) or not relative:
        raise UnsafeArtifactError(f"{entry} is {relative!r}, not a file name")
    problem = path_problem(relative)
    if problem:
        raise UnsafeArtifactError(f"{entry} is {relative!r}: {problem}")
    path = (base or root) / relative
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(path))
    if target != real_root and real_root not in target.parents:
        raise UnsafeArtifactError(f"{entry} is {relative!r}, which leads through a symbolic link to {target}, "
                                  f"outside {root}")
    return path


def path_problem(relative: str) -> str | None:
    """Why `relative` is not a plain relative POSIX path of files inside a folder; None when it is."""
    if "\0" in relative or "\\" in relative:
        return "a name with a NUL byte or a backslash"
    if relative.startswith("/") or PureWindowsPath(relative).drive:
        return "an absolute path"
    parts = relative.split("/")
    if ".." in parts:
        return "a path that climbs out with '..'"
    if any(part in ("", ".") for part in parts) or PurePosixPath(relative).as_posix() != relative:
        return "not a normalised path (empty or '.' parts)"
    return None


def check_record(root: Path, record: Any, entry: str) -> Path:
    """A manifest's file record ({path, bytes, sha256}): its path inside `root`, its size plausible,
    its hash well formed. Returns the file's path."""
    if not isinstance(record, dict):
        raise UnsafeArtifactError(f"{entry} is {record!r}, not a file record")
    size = record.get("bytes")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
        raise UnsafeArtifactError(f"{entry}.bytes is {size!r}; a file size is a whole number from 0 to "
                                  f"{MAX_FILE_BYTES} (1 TiB)")
    if not (isinstance(record.get("sha256"), str) and SHA256.fullmatch(record["sha256"])):
        raise UnsafeArtifactError(f"{entry}.sha256 is {record.get('sha256')!r}, not a sha256 digest (64 hex digits)")
    return inside(root, record.get("path"), f"{entry}.path")


def check_engine_paths(engine_dir: Path, where: str) -> None:
    """The files an engine set's manifest (`where`, for errors) names, engines and timing cache, lie
    inside `engine_dir`; a manifest that cannot be read is left to `engine_set.read_engine_manifest`."""
    try:
        data = json.loads((engine_dir / ENGINE_MANIFEST).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(data, dict):
        return
    engines = data.get("engines")
    for name, rec in engines.items() if isinstance(engines, dict) else ():
        if isinstance(rec, dict) and "path" in rec:
            inside(engine_dir, rec["path"], f"{where} engines.{name}.path")
    if data.get("timing_cache") is not None:
        inside(engine_dir, data["timing_cache"], f"{where} timing_cache")


# ------------------------------------------------------------------ external data in ONNX graphs
@dataclass
class ExternalTensor:
    """One tensor of an ONNX model that has external-data entries (key, value), in file order."""

    name: str
    entries: list[tuple[str, str]] = field(default_factory=list)


class MalformedModel(Exception):
    """The bytes are not a well-formed protobuf message (so no ONNX loader would read them either)."""


# Message fields that hold tensors, directly or further down (onnx.proto; field number -> message kind).
# Every other field is skipped by its wire type, as protobuf skips unknown fields.
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
# Singular message fields: protobuf merges repeated occurrences into one message (repeated fields
# concatenated), so their occurrences are read as one.
_SINGULAR = {("model", 7), ("training", 1), ("training", 2), ("attribute", 5), ("attribute", 6),
             ("sparse", 1), ("sparse", 2)}
_TENSOR_NAME, _TENSOR_EXTERNAL = 8, 13


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise MalformedModel("a number runs past the end of its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise MalformedModel("a number longer than 10 bytes")


def _fields(buf, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of every length-delimited field of a message (its byte ranges,
    several for merged occurrences); other fields are skipped, groups included."""
    for pos, end in ranges:
        while pos < end:
            key, pos = _varint(buf, pos, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise MalformedModel("field number 0")
            if wire == 2:
                length, pos = _varint(buf, pos, end)
                if length > end - pos:
                    raise MalformedModel("a field runs past the end of its message")
                yield number, pos, pos + length
                pos += length
            else:
                pos = _skip(buf, pos, end, number, wire, 0)


def _skip(buf, pos: int, end: int, number: int, wire: int, depth: int) -> int:
    """The position after a field that is not length-delimited (varint, fixed, or a whole group)."""
    if wire == 0:
        return _varint(buf, pos, end)[1]
    if wire in (1, 5):
        size = 8 if wire == 1 else 4
        if size > end - pos:
            raise MalformedModel("a fixed-size field runs past the end of its message")
        return pos + size
    if wire == 3:  # a group: fields up to its matching end
        if depth >= MAX_NESTING:
            raise MalformedModel(f"groups nested more than {MAX_NESTING} deep")
        while True:
            if pos >= end:
                raise MalformedModel("a group without its end")
            key, pos = _varint(buf, pos, end)
            inner, inner_wire = key >> 3, key & 7
            if inner_wire == 4:
                if inner != number:
                    raise MalformedModel("a group closed by another group's end")
                return pos
            if inner_wire == 2:
                length, pos = _varint(buf, pos, end)
                if length > end - pos:
                    raise MalformedModel("a field runs past the end of its message")
                pos += length
            else:
                pos = _skip(buf, pos, end, inner, inner_wire, depth + 1)
    raise MalformedModel(f"wire type {wire}" + (" (a group's end without its start)" if wire == 4 else ""))


def _text(buf, start: int, end: int) -> str:
    return os.fsdecode(bytes(buf[start:end]))  # bytes that are not UTF-8 survive as surrogates


def _entry(buf, ranges: list[tuple[int, int]]) -> tuple[str, str]:
    key = value = ""
    for number, start, end in _fields(buf, ranges):
        if number == 1:
            key = _text(buf, start, end)
        elif number == 2:
            value = _text(buf, start, end)
    return key, value


def external_tensors(buf) -> list[ExternalTensor]:
    """Every tensor of a serialised ONNX ModelProto that carries external-data entries, wherever it
    lies in the model; raises MalformedModel for bytes protobuf would refuse."""
    found: list[ExternalTensor] = []
    stack: list[tuple[str, list[tuple[int, int]], int]] = [("model", [(0, len(buf))], 0)]
    while stack:
        kind, ranges, depth = stack.pop()
        if depth > MAX_NESTING:
            raise MalformedModel(f"messages nested more than {MAX_NESTING} deep")
        if kind == "tensor":
            tensor = ExternalTensor("")
            for number, start, end in _fields(buf, ranges):
                if number == _TENSOR_NAME:
                    tensor.name = _text(buf, start, end)
                elif number == _TENSOR_EXTERNAL:
                    tensor.entries.append(_entry(buf, [(start, end)]))
            if tensor.entries:
                found.append(tensor)
            continue
        children = _CHILDREN[kind]
        merged: dict[int, list[tuple[int, int]]] = {}
        for number, start, end in _fields(buf, ranges):
            if number not in children:
                continue
            if (kind, number) in _SINGULAR:
                merged.setdefault(number, []).append((start, end))
            else:
                stack.append((children[number], [(start, end)], depth + 1))
        stack.extend((children[number], parts, depth + 1) for number, parts in merged.items())
    return found


def read_external_tensors(path: Path) -> list[ExternalTensor]:
    """`external_tensors` of the ONNX file at `path` (memory-mapped: inline weights are skipped, not read)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            return external_tensors(view)


def external_data_problems(root: Path, graph_file: str, listed: list[str]) -> list[str]:
    """What is wrong with the external data the graph `root/graph_file` names: a location outside
    `root`, a file not among `listed` (the graph's own manifest records), a key or number no loader
    should be handed, a range past the end of its file. Empty when every reference is sound."""
    path = root / graph_file
    try:
        tensors = read_external_tensors(path)
    except MalformedModel as e:
        return [f"{graph_file} is not a well-formed ONNX model ({e})"]
    except OSError as e:
        return [f"{graph_file} cannot be read ({e.strerror or e})"]
    own = {os.path.realpath(root / name): name for name in listed}
    problems = []
    for tensor in tensors:
        where = f"{graph_file}: tensor {tensor.name!r}"
        keys = [key for key, _ in tensor.entries]
        unknown = sorted({k for k in keys if k not in EXTERNAL_DATA_KEYS})
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if unknown or repeated:
            problems.append(f"{where} has external-data keys " + (f"{unknown} no loader should be given"
                            if unknown else f"{repeated} given twice"))
            continue
        info = dict(tensor.entries)
        try:
            target = inside(root, info.get("location"), f"{graph_file}: the external-data location of tensor "
                            f"{tensor.name!r}", base=path.parent)
        except UnsafeArtifactError as e:
            problems.append(str(e))
            continue
        name = own.get(os.path.realpath(target))
        if name is None:
            problems.append(f"{where} keeps its data in {info['location']!r}, which is not one of the graph's "
                            f"files in the manifest ({', '.join(listed)})")
            continue
        numbers = {k: info[k] for k in ("offset", "length") if k in info}
        bad = [f"{k} {v!r}" for k, v in numbers.items() if not _DIGITS.fullmatch(v)]
        if bad:
            problems.append(f"{where} declares external-data {' and '.join(bad)}: not a whole number of bytes")
            continue
        size = target.stat().st_size if target.is_file() else None  # a missing file: the verification says so
        offset, length = int(numbers.get("offset", "0")), int(numbers.get("length", "0"))
        if size is not None and offset + length > size:
            problems.append(f"{where} declares external data at bytes {offset} to {offset + length} of {name}, "
                            f"which has {size} bytes")
    return problems
