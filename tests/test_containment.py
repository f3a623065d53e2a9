"""Artifacts and engine folders are a trust boundary: every file their manifests or graphs name stays inside.

Each kind of escape (an absolute path, `..`, a symbolic link that leaves, an unlisted or out-of-range
external-data reference, an impossible size) is planted in a copy of the tiny artifact whose hashes
are rewritten to match, as a hostile artifact's would be; every command that reads artifacts must
refuse it in one `error:` line naming the entry, change nothing, and open nothing outside.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from varedit_deploy.artifact import read_manifest
from varedit_deploy.cli import main
from varedit_deploy.containment import MalformedModel, external_data_problems, external_tensors, inside
from varedit_deploy.engine_set import check_engines, engine_dir_name, read_engine_manifest
from varedit_deploy.errors import UnsafeArtifactError

from test_cli_errors import snapshot


# ------------------------------------------------------------------ building hostile artifacts
def _record(folder: Path, rel: str) -> dict:
    data = (folder / rel).read_bytes()
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _replace(path: Path, data: bytes | str) -> None:
    """Write a new file in place of `path` (the copies share the original's files through hard links)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _edit_manifest(art: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((art / "manifest.json").read_text())
    change(data)
    _replace(art / "manifest.json", json.dumps(data, indent=1))


def _externalise(art: Path, graph: str = "source_embed", tamper: Callable[[onnx.TensorProto], None] | None = None
                 ) -> None:
    """Store `graph`'s weights in `graphs/<graph>.onnx.data`, as export does for large graphs, then let
    `tamper` rewrite the first external tensor's entries; the manifest records what is on disk."""
    onnx_path = art / "graphs" / f"{graph}.onnx"
    model = onnx.load(str(onnx_path))
    onnx_path.unlink()
    onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{graph}.onnx.data", size_threshold=0)
    if tamper is not None:
        stored = onnx.load(str(onnx_path), load_external_data=False)
        tamper(next(t for t in stored.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL))
        _replace(onnx_path, stored.SerializeToString())
    names = [f"graphs/{graph}.onnx", f"graphs/{graph}.onnx.data"]
    _edit_manifest(art, lambda d: d["graphs"][graph].update(files=[_record(art, n) for n in names]))


def _set_location(value: str) -> Callable[[onnx.TensorProto], None]:
    def tamper(tensor: onnx.TensorProto) -> None:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = value
    return tamper


def _set_entry(key: str, value: str) -> Callable[[onnx.TensorProto], None]:
    def tamper(tensor: onnx.TensorProto) -> None:
        for entry in tensor.external_data:
            if entry.key == key:
                entry.value = value
                return
        tensor.external_data.add(key=key, value=value)
    return tamper


def _fake_engine_set(art: Path, change: Callable[[dict, Path], None], name: str | None = None) -> Path:
    """An engine set folder with one engine file and an engines.json recording it (as `build` writes),
    named as the default `build` of this artifact would name it; `change` edits the manifest."""
    import tensorrt_rtx

    folder = art / "engines" / (name or engine_dir_name("tensorrt-rtx", tensorrt_rtx.__version__, "sm89", "fp16"))
    folder.mkdir(parents=True)
    (folder / "step.engine").write_bytes(b"engine bytes")
    data = {"schema_version": 2, "flavour": "tensorrt-rtx", "tensorrt_version": tensorrt_rtx.__version__,
            "target": "sm89", "precision": "fp16", "engines": {"step": {**_record(folder, "step.engine"),
                                                                        "profiles": []}},
            "timing_cache": None}
    change(data, folder)
    (folder / "engines.json").write_text(json.dumps(data))
    return folder


def _outside(art: Path) -> Path:
    folder = art.parent / "outside"
    folder.mkdir(exist_ok=True)
    return folder


def _move_out(art: Path, rel: str) -> Path:
    """Move one of the artifact's files out of it (same bytes: its hash still matches)."""
    target = _outside(art) / Path(rel).name
    shutil.copyfile(art / rel, target)
    (art / rel).unlink()
    return target


def _link_out(art: Path, rel: str) -> None:
    """Replace one of the artifact's files by a link to an identical file outside it."""
    os.symlink(_move_out(art, rel), art / rel)


def _graph_absolute(art):
    target = _move_out(art, "graphs/sample.onnx")
    _edit_manifest(art, lambda d: d["graphs"]["sample"]["files"][0].update(path=str(target)))


def _graph_dotdot(art):
    _move_out(art, "graphs/sample.onnx")
    _edit_manifest(art, lambda d: d["graphs"]["sample"]["files"][0].update(path="../outside/sample.onnx"))


def _graph_not_normalised(art):
    _edit_manifest(art, lambda d: d["graphs"]["sample"]["files"][0].update(path="graphs/./sample.onnx"))


def _graphs_folder_link(art):
    shutil.copytree(art / "graphs", _outside(art) / "graphs")
    shutil.rmtree(art / "graphs")
    os.symlink(_outside(art) / "graphs", art / "graphs")


def _tokenizer_dotdot(art):
    _move_out(art, "tokenizer/tokenizer.json")
    def change(d):
        d["tokenizer"]["files"][0]["path"] = d["tokenizer"]["main"] = "tokenizer/../../outside/tokenizer.json"
    _edit_manifest(art, change)


def _tokenizer_main_unlisted(art):
    _edit_manifest(art, lambda d: d["tokenizer"].update(main="tokenizer/other.json"))


def _quantization_report_absolute(art):
    target = _outside(art) / "report.json"
    target.write_text("{}")
    _edit_manifest(art, lambda d: d.update(quantization={"files": [{**_record(target.parent, "report.json"),
                                                                    "path": str(target)}]}))


def _size(value):
    def plant(art):
        _edit_manifest(art, lambda d: d["graphs"]["sample"]["files"][0].update(bytes=value))
    return plant


def _sha256_not_hex(art):
    _edit_manifest(art, lambda d: d["graphs"]["sample"]["files"][0].update(sha256="../" * 21 + "x"))


def _engines_folder_link(art):
    os.symlink(_outside(art), art / "engines")


def _engine_set_link(art):
    (art / "engines").mkdir()
    os.symlink(_outside(art), art / "engines" / "tensorrt-rtx-1.0-sm89-fp16")


def _engine_path(path: str):
    def plant(art):
        _fake_engine_set(art, lambda data, folder: data["engines"]["step"].update(path=path))
    return plant


def _engine_file_link(art):
    def change(data, folder):
        outside = _outside(art) / "step.engine"
        shutil.move(folder / "step.engine", outside)
        os.symlink(outside, folder / "step.engine")
    _fake_engine_set(art, change)


def _timing_cache(art):
    _fake_engine_set(art, lambda data, folder: data.update(timing_cache="../../../outside/timing.cache"))


def _external(tamper: Callable[[Path], Callable[[onnx.TensorProto], None]]):
    """An escape planted inside a graph: `tamper(art)` rewrites the first external tensor's entries."""
    def plant(art):
        _externalise(art, tamper=tamper(art))
    return plant


def _outside_weights(art: Path) -> Path:
    target = _outside(art) / "weights.data"
    target.write_bytes(b"\0" * 4096)
    return target


def _unlisted_weights(art: Path) -> str:
    (art / "graphs" / "unlisted.data").write_bytes(b"\0" * 4096)
    return "unlisted.data"


def _linked_weights(art: Path) -> str:
    os.symlink(_outside_weights(art), art / "graphs" / "linked.data")
    return "linked.data"


# (id, plant, words the error line must hold: the entry it names); external-data escapes last.
ESCAPES = [
    ("graph-absolute-path", _graph_absolute, "graphs.sample.files[0].path is '/"),
    ("graph-dotdot-path", _graph_dotdot, "graphs.sample.files[0].path is '../outside/sample.onnx': a path that climbs"),
    ("graph-path-not-normalised", _graph_not_normalised, "graphs.sample.files[0].path is 'graphs/./sample.onnx'"),
    ("graph-file-link", lambda a: _link_out(a, "graphs/sample.onnx"), "graphs.sample.files[0].path is "
                                                                      "'graphs/sample.onnx', which leads through a "
                                                                      "symbolic link"),
    ("graphs-folder-link", _graphs_folder_link, "files[0].path is 'graphs/"),
    ("tokenizer-dotdot-path", _tokenizer_dotdot, "tokenizer.files[0].path"),
    ("tokenizer-main-unlisted", _tokenizer_main_unlisted, "tokenizer.main is 'tokenizer/other.json'"),
    ("preview-link", lambda a: _link_out(a, "preview/projection.npy"), "preview.file.path"),
    ("report-absolute-path", _quantization_report_absolute, "quantization.files[0].path is '/"),
    ("size-negative", _size(-1), "graphs.sample.files[0].bytes is -1"),
    ("size-absurd", _size(2**60), f"graphs.sample.files[0].bytes is {2**60}"),
    ("size-not-a-number", _size("2769"), "graphs.sample.files[0].bytes is '2769'"),
    ("sha256-not-a-digest", _sha256_not_hex, "graphs.sample.files[0].sha256"),
    ("engines-folder-link", _engines_folder_link, "the engines folder is 'engines', which leads through"),
    ("engine-set-link", _engine_set_link, "an engine folder is 'engines/tensorrt-rtx-1.0-sm89-fp16', which leads"),
    ("engine-dotdot-path", _engine_path("../../graphs/step.onnx"), "engines.json engines.step.path is '../../graphs"),
    ("engine-absolute-path", _engine_path("/etc/hostname"), "engines.json engines.step.path is '/etc/hostname'"),
    ("engine-file-link", _engine_file_link, "engines.json engines.step.path is 'step.engine', which leads"),
    ("timing-cache-dotdot", _timing_cache, "engines.json timing_cache is '../../../outside/timing.cache'"),
    ("external-absolute", _external(lambda a: _set_location(str(_outside_weights(a)))),
     "graphs/source_embed.onnx: the external-data location of tensor"),
    ("external-dotdot", _external(lambda a: _set_location(f"../../outside/{_outside_weights(a).name}")),
     "is '../../outside/weights.data': a path that climbs"),
    ("external-link", _external(lambda a: _set_location(_linked_weights(a))),
     "is 'linked.data', which leads through a symbolic link"),
    ("external-unlisted-file", _external(lambda a: _set_location(_unlisted_weights(a))),
     "keeps its data in 'unlisted.data', which is not one of the graph's files"),
    ("external-past-the-end", _external(lambda a: _set_entry("offset", str(2**40))), "which has"),
    ("external-offset-not-a-number", _external(lambda a: _set_entry("offset", "-8")),
     "declares external-data offset '-8'"),
    ("external-unknown-key", _external(lambda a: _set_entry("basepath", "/")), "external-data keys ['basepath']"),
]


@pytest.fixture(scope="module")
def hostile(tiny_artifact, tmp_path_factory) -> dict[str, Path]:
    """One hostile copy of the tiny artifact per escape (hard links: only replaced files are new)."""
    made = {}
    for name, plant, _ in ESCAPES:
        art = tmp_path_factory.mktemp(name) / "art"
        shutil.copytree(tiny_artifact, art, copy_function=os.link)
        plant(art)
        made[name] = art
    return made


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


COMMANDS = {
    "inspect": ["inspect", "{art}"],
    "edit": ["edit", "--artifacts", "{art}", "--image", "{photo}", "--instruction", "x", "--out", "{ws}/o.png"],
    "build": ["build", "--artifacts", "{art}"],
    "quantize": ["quantize", "--artifacts", "{art}", "--out", "{ws}/q", "--mode", "int8"],
    "plan": ["plan", "--artifacts", "{art}"],
    "serve": ["serve", "--artifacts", "{art}", "--port", "0"],
    "export-overwrite": ["export", "--random-weights", "--model", "tiny-2b", "--out", "{art}", "--overwrite"],
}


# export --overwrite opens no graph, so it replaces an artifact whose graphs' external data is unsound
# (re-exporting is the remedy); it refuses every other escape, which would have it list or carry files.
CASES = [(escape, words, command) for escape, _, words in ESCAPES for command in COMMANDS
         if not (command == "export-overwrite" and escape.startswith("external-"))]


@pytest.mark.parametrize("escape, words, command", CASES, ids=[f"{e}-{c}" for e, _, c in CASES])
def test_every_command_refuses_an_artifact_that_reaches_outside(hostile, photo, tmp_path, capsys, escape, words,
                                                                command):
    art = hostile[escape]
    before = snapshot(str(art.parent))
    argv = [a.format(art=art, photo=photo, ws=tmp_path) for a in COMMANDS[command]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "refused" in err and words in err, err
    assert snapshot(str(art.parent)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def test_a_sound_artifact_with_external_data_loads_and_edits(tiny_artifact, tmp_path, photo):
    """The control: weights in a listed `.data` file beside their graph are what export writes."""
    from varedit_deploy.runtime.pipeline import EditPipeline

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art, copy_function=os.link)
    _externalise(art)
    assert read_manifest(art).external_data_problems() == []
    assert main(["inspect", str(art)]) == 0
    image = Image.open(photo)
    got = EditPipeline.from_artifacts(art).edit(image, "x", seed=3).image
    assert np.array_equal(np.asarray(got), np.asarray(EditPipeline.from_artifacts(tiny_artifact).edit(image, "x",
                                                                                                      seed=3).image))


def test_a_refused_engine_set_is_refused_by_the_tensorrt_runtime_checks_too(hostile, tiny_artifact):
    art = hostile["engine-dotdot-path"]
    folder = next((art / "engines").iterdir())
    with pytest.raises(UnsafeArtifactError, match=r"engines.step.path is '../../graphs/step.onnx'"):
        read_engine_manifest(folder)
    with pytest.raises(UnsafeArtifactError, match="refused"):
        check_engines(folder, read_manifest(tiny_artifact), "1.0", None)


def test_engine_manifests_with_impossible_sizes_are_refused(tmp_path):
    folder = tmp_path / "engines" / "set"
    folder.mkdir(parents=True)
    (folder / "step.engine").write_bytes(b"x")
    for size in (-1, 2**41, "1", True):
        rec = {**_record(folder, "step.engine"), "bytes": size, "profiles": []}
        (folder / "engines.json").write_text(json.dumps({"engines": {"step": rec}}))
        with pytest.raises(UnsafeArtifactError, match=r"engines.step.bytes is"):
            read_engine_manifest(folder)


# ------------------------------------------------------------------ the path rule and the ONNX reader
@pytest.mark.parametrize("relative, problem", [
    ("/etc/passwd", "absolute"), ("C:/x", "absolute"), ("a\\b", "backslash"), ("a/../../b", "climbs out"),
    ("..", "climbs out"), ("a//b", "not a normalised"), ("./a", "not a normalised"), ("a/", "not a normalised"),
    ("a\0b", "NUL"), ("", "not a file name"),
])
def test_paths_must_be_plain_relative_names(tmp_path, relative, problem):
    with pytest.raises(UnsafeArtifactError, match=problem):
        inside(tmp_path, relative, "entry")
    assert inside(tmp_path, "a/b.onnx", "entry") == tmp_path / "a" / "b.onnx"
    (tmp_path / "in").symlink_to(tmp_path / "a")  # a link that stays inside is fine
    assert inside(tmp_path, "in/b.onnx", "entry") == tmp_path / "in" / "b.onnx"
    (tmp_path / "in").unlink()


def _model_with_tensors_everywhere() -> onnx.ModelProto:
    """External tensors in every place ONNX allows one: an initializer, a Constant node's value, a sparse
    initializer, a subgraph's initializer (If), a function's Constant and a training graph."""
    from onnx import TensorProto, helper

    def ext(name: str) -> TensorProto:
        t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=f"{name}.bin")
        return t

    branch = helper.make_graph([helper.make_node("Identity", ["sub"], ["y1"])], "then", [],
                               [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1])], [ext("sub")])
    nodes = [helper.make_node("Constant", [], ["c"], value=ext("const")),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    sparse = helper.make_sparse_tensor(ext("sparse_values"), helper.make_tensor("sparse_idx", TensorProto.INT64, [1],
                                                                                 [0]), [4])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [ext("init")],
                              sparse_initializer=[sparse])
    function = helper.make_function("local", "f", [], ["o"], [helper.make_node("Constant", [], ["o"],
                                                                               value=ext("in_function"))],
                                    [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 17)])
    model.training_info.add().initialization.CopyFrom(helper.make_graph([], "init", [], [], [ext("training")]))
    return model


def test_the_reader_finds_every_external_tensor_onnx_itself_finds():
    from onnx.external_data_helper import _get_all_tensors

    model = _model_with_tensors_everywhere()
    found = {t.name for t in external_tensors(model.SerializeToString())}
    expected = {t.name for t in _get_all_tensors(model) if t.external_data}
    assert found >= expected and {"init", "const", "sub", "sparse_values", "in_function", "training"} <= found


def _field(number: int, body: bytes) -> bytes:
    """One length-delimited protobuf field."""
    length, size = b"", len(body)
    while True:
        length += bytes([size & 0x7F | (0x80 if size > 0x7F else 0)])
        size >>= 7
        if not size:
            return bytes([number << 3 | 2]) + length + body


def test_a_tensor_given_twice_is_read_merged_as_protobuf_merges_it(tmp_path):
    """A singular field repeated on the wire is one merged message whose repeated fields are joined: two
    occurrences of a Constant's tensor, each sound alone, merge into one whose last-given location and
    first-given length disagree. The reader sees the merged tensor, and it is refused."""
    from onnx import TensorProto

    whole, short = TensorProto(name="w", data_location=TensorProto.EXTERNAL), TensorProto()
    for key, value in (("location", "big.data"), ("offset", "0"), ("length", "4096")):
        whole.external_data.add(key=key, value=value)
    short.external_data.add(key="location", value="small.data")
    attribute = onnx.AttributeProto(name="value", type=onnx.AttributeProto.TENSOR).SerializeToString()
    attribute += _field(5, whole.SerializeToString()) + _field(5, short.SerializeToString())
    node = onnx.NodeProto(op_type="Constant", output=["c"]).SerializeToString() + _field(5, attribute)
    data = onnx.ModelProto(ir_version=10).SerializeToString() + _field(7, _field(1, node))
    merged = onnx.ModelProto.FromString(data).graph.node[0].attribute[0].t
    assert [(e.key, e.value) for e in merged.external_data][-1] == ("location", "small.data")
    (tensor,) = external_tensors(data)
    assert tensor.entries == [(e.key, e.value) for e in merged.external_data]
    (tmp_path / "m.onnx").write_bytes(data)
    (tmp_path / "big.data").write_bytes(b"\0" * 4096)
    (tmp_path / "small.data").write_bytes(b"\0" * 8)
    (problem,) = external_data_problems(tmp_path, "m.onnx", ["m.onnx", "big.data", "small.data"])
    assert "['location'] given twice" in problem


@pytest.mark.parametrize("data", [b"\x78", b"\x3a\x05ab", b"\x0f", b"\x00\x01", b"\x3b\x08\x01"],
                         ids=["truncated-number", "field-past-the-end", "wire-type-7", "field-number-0",
                              "unclosed-group"])
def test_malformed_models_are_refused_not_skipped(data):
    with pytest.raises(MalformedModel):
        external_tensors(data)
    with pytest.raises(Exception):  # noqa: B017 - protobuf refuses them too
        onnx.ModelProto.FromString(data)


def test_an_unreadable_graph_is_one_line_before_onnx_runtime_opens_it(tiny_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art, copy_function=os.link)
    _replace(art / "graphs" / "sample.onnx", b"\x78")
    _edit_manifest(art, lambda d: d["graphs"]["sample"].update(files=[_record(art, "graphs/sample.onnx")]))
    assert main(["plan", "--artifacts", str(art)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "graphs/sample.onnx is not a well-formed ONNX model" in err
