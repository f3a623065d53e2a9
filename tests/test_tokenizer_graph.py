"""The tokenizer graph gives the ids T5TokenizerFast gives (tokenizer.json run by `tokenizers`), and an
edit needs no tokenizer library at all where onnxruntime-extensions is installed."""

import base64
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from tokenizer_corpus import corpus, tricky, write_tokenizer_folders
from varedit_deploy.artifact import read_manifest
from varedit_deploy.errors import ArtifactError, InputError, VareditError
from varedit_deploy.export import tokenizer_graph as tg
from varedit_deploy.runtime.tokenizer import GraphTokenizer, Tokenizer, load_tokenizer

ort = pytest.importorskip("onnxruntime")
extensions = pytest.importorskip("onnxruntime_extensions")
from tokenizers import Tokenizer as FastTokenizer  # noqa: E402


def _session(model):
    options = ort.SessionOptions()
    options.register_custom_ops_library(extensions.get_library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    return write_tokenizer_folders(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def graphs(tokenizer_files):
    """{layout name: (graph session, reference tokenizer)}."""
    return {name: (_session(tg.build_tokenizer_graph(path.read_text())), FastTokenizer.from_file(str(path)))
            for name, path in tokenizer_files.items()}


def _differences(session, reference, texts):
    out = []
    for text in texts:
        got = session.run(None, {"text": np.array([text], dtype=object)})[0]
        want = reference.encode(text, add_special_tokens=True).ids
        assert got.dtype == np.int64 and got.shape == (1, len(got[0]))
        if got[0].tolist() != want:
            out.append((text, got[0].tolist()[:12], want[:12]))
    return out


@pytest.mark.parametrize("layout", ["tiny-transformers5", "tiny-released", "wide-transformers5", "wide-released"])
def test_graph_equals_the_fast_tokenizer_on_the_wide_corpus(graphs, layout):
    session, reference = graphs[layout]
    texts = corpus()
    assert len(texts) > 500 and {"special-token literals", "whitespace runs", "empty", "very long"} <= {k for k, _ in texts}
    assert _differences(session, reference, [t for _, t in texts]) == []


@pytest.mark.parametrize("layout", ["wide-transformers5", "wide-released"])
def test_graph_equals_the_fast_tokenizer_on_random_hard_strings(graphs, layout):
    session, reference = graphs[layout]
    assert _differences(session, reference, tricky(1000)) == []


def test_each_difference_class_needs_its_fix(tokenizer_files, graphs):
    """onnxruntime-extensions' sentencepiece op alone (what its own T5 export, gen_processing_models,
    makes: the model file and add_eos) differs on each class the graph fixes, so the corpus would
    catch a fix that stopped working."""
    from onnx import TensorProto, helper, numpy_helper

    folder = tokenizer_files["wide-released"].parent
    flags = [numpy_helper.from_array(np.array(v), n) for n, v in
             (("nbest", np.int64(0)), ("alpha", np.float32(0)), ("bos", False), ("eos", True), ("reverse", False))]
    node = helper.make_node("SentencepieceTokenizer", ["text", "nbest", "alpha", "bos", "eos", "reverse"],
                            ["tokens", "rows"], domain=tg.CONTRIB, model=(folder / "spiece.model").read_bytes())
    raw = _session(helper.make_model(
        helper.make_graph([node], "raw", [helper.make_tensor_value_info("text", TensorProto.STRING, [1])],
                          [helper.make_tensor_value_info("tokens", TensorProto.INT32, None)], flags),
        opset_imports=[helper.make_opsetid(d, v) for d, v in tg.OPSETS.items()], ir_version=10))
    session, reference = graphs["wide-released"]
    for text in ["a </s> b", "trailing  ", "a\x00b", "＜/s＞", "e\u0301\u0302 x", "ｶﾞ x"]:
        want = reference.encode(text).ids
        assert raw.run(None, {"text": np.array([text], dtype=object)})[0].tolist() != want, text
        assert session.run(None, {"text": np.array([text], dtype=object)})[0][0].tolist() == want, text


def test_normaliser_equals_tokenizers_on_every_rule_character(tokenizer_files):
    """The in-graph normaliser against tokenizers' own, one code point at a time: every character of
    every rule, every White_Space character, every 7th code point, and random clusters of rule keys
    and combining marks (tokenizers works per grapheme cluster, sentencepiece per character)."""
    from onnx import TensorProto, helper

    text = tokenizer_files["wide-transformers5"].read_text()
    rules = tg.charsmap_rules(base64.b64decode(json.loads(text)["normalizer"]["precompiled_charsmap"]))
    g = tg._Graph()
    tg._normalise_nodes(g, rules, "x", "y", tg.CLUSTER_FILE.read_text().strip())
    model = helper.make_model(helper.make_graph(g.nodes, "normalise", [helper.make_tensor_value_info("x", TensorProto.STRING, ["n"])],
                                                [helper.make_tensor_value_info("y", TensorProto.STRING, None)], g.constants),
                              opset_imports=[helper.make_opsetid(d, v) for d, v in tg.OPSETS.items()], ir_version=10)
    session, reference = _session(model), FastTokenizer.from_str(text).normalizer
    in_rules = {ord(c) for key, value in rules.items() for c in key + value}
    points = sorted(in_rules | set(tg.WHITE_SPACE) | set(range(1, 0x110000, 7)))
    singles = [chr(c) for c in points if not 0xD800 <= c <= 0xDFFF and chr(c) not in (tg.SEGMENT_END, "\x00")]
    rng = random.Random(3)
    marks = [chr(c) for c in [*range(0x300, 0x370), *range(0x1DC0, 0x1E00), *range(0x20D0, 0x20F1), 0x200D, 0x3099,
                              0xFF9E, 0xFF9F]]
    keys = list(rules)
    clusters = [rng.choice(keys) + "".join(rng.choice(marks) for _ in range(rng.randint(0, 2)))
                + rng.choice(["", " ", "a", "\r\n", rng.choice(marks)]) for _ in range(20000)]
    texts = singles + clusters
    wrong = []
    for i in range(0, len(texts), 8192):
        batch = texts[i:i + 8192]
        out = session.run(None, {"x": np.array(batch, dtype=object)})[0].tolist()
        wrong += [t for t, o in zip(batch, out) if o != reference.normalize_str(t)]
    assert len(singles) > 150_000 and wrong == []


def test_grapheme_cluster_pattern_is_current():
    """The shipped pattern is what today's Unicode data (the `regex` module's) gives: a Unicode update
    that changes a cluster class shows up here."""
    regex = pytest.importorskip("regex")
    assert tg.CLUSTER_FILE.read_text().strip() == tg.grapheme_cluster_pattern(regex)


def test_charsmap_rules_are_the_normalisers(tokenizer_files):
    """The trie reader finds the nmt_nfkc rules tokenizers applies (single characters and short keys)."""
    tok = json.loads(tokenizer_files["tiny-transformers5"].read_text())
    rules = tg.charsmap_rules(base64.b64decode(tok["normalizer"]["precompiled_charsmap"]))
    assert rules["ｶ"] == "カ" and rules["\u2126"] == "Ω" and rules["ﬁ"] == "fi" and rules["A\u0301"] == "Á"
    assert all(len(key.encode()) < tg.WHOLE_CLUSTER_BYTES for key in rules) and len(rules) > 5000


@pytest.mark.parametrize("change, message", [
    (lambda t: t["model"].update(type="BPE"), "model BPE is not a Unigram"),
    (lambda t: t.update(pre_tokenizer={"type": "ByteLevel"}), r"pre_tokenizer \['ByteLevel'\]"),
    (lambda t: t.update(normalizer={"type": "NFKC"}), r"normalizer \['NFKC'\]"),
    (lambda t: t["post_processor"].update(single=[{"Sequence": {"id": "A", "type_id": 0}}]), "one </s>"),
    (lambda t: t["added_tokens"][0].update(lstrip=True), "added tokens with options"),
])
def test_layouts_the_graph_does_not_reproduce_are_refused(tokenizer_files, change, message):
    tok = json.loads(tokenizer_files["tiny-transformers5"].read_text())
    change(tok)
    with pytest.raises(tg.TokenizerGraphError, match=message):
        tg.build_tokenizer_graph(json.dumps(tok))


def test_export_ships_the_graph_in_the_manifest(tiny_artifact):
    m = read_manifest(tiny_artifact)
    record = m.tokenizer_graph
    assert m.tokenizer_graph_file == tiny_artifact / "tokenizer" / "tokenizer.onnx"
    assert record["files"][0] in m.tokenizer_files  # verified like every file of the artifact
    assert record["inputs"] == [{"name": "text", "dtype": "string", "shape": [1]}]
    assert record["outputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [1, "tokens"]}]
    assert record["ops"]["ai.onnx.contrib::SentencepieceTokenizer"] == 1 and record["opset"]["ai.onnx"] == 20
    assert record["check"] == {"texts": len(tg.CHECK_TEXTS), "differ": 0}
    graph_ids = GraphTokenizer(m.tokenizer_graph_file).encode("make the <extra_id_3> sky ＜/s＞  ")
    assert graph_ids.tolist() == Tokenizer(m.tokenizer_file).encode("make the <extra_id_3> sky ＜/s＞  ").tolist()


def test_a_graph_that_disagrees_with_tokenizer_json_is_left_out(tmp_path, tokenizer_files, monkeypatch):
    """The export checks the graph against tokenizer.json and ships it only when every check text agrees."""
    folder = tmp_path / "art"
    (folder / "tokenizer").mkdir(parents=True)
    json_file = folder / "tokenizer" / "tokenizer.json"
    json_file.write_text(tokenizer_files["tiny-transformers5"].read_text())
    record, said = tg.write_tokenizer_graph(folder, json_file)
    assert record is not None and "ids equal tokenizer.json's on" in said
    monkeypatch.setattr(tg, "CHECK_TEXTS", ("make it red", "<pad>"))
    monkeypatch.setattr(tg, "check_against_json", lambda graph, tokenizer: ["<pad>"])
    record, said = tg.write_tokenizer_graph(folder, json_file)
    assert record is None and not (folder / "tokenizer" / "tokenizer.onnx").exists()
    assert "left out, it gives other ids than tokenizer.json for 1 of 2 check texts" in said


def test_the_runtime_takes_the_graph_and_falls_back_to_tokenizer_json(tiny_artifact, monkeypatch):
    m = read_manifest(tiny_artifact)
    assert isinstance(load_tokenizer(m), GraphTokenizer) and isinstance(load_tokenizer(m, "json"), Tokenizer)
    assert "onnxruntime-extensions" in load_tokenizer(m, "graph").source
    with pytest.raises(InputError, match="at most 512"):
        load_tokenizer(m, "graph").encode("sky " * 600)
    with pytest.raises(InputError, match="empty"):
        load_tokenizer(m, "graph").encode("  ")
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # as if it were not installed
    assert isinstance(load_tokenizer(m), Tokenizer)
    with pytest.raises(VareditError, match=r"onnxruntime-extensions"):
        load_tokenizer(m, "graph")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(VareditError, match="needs onnxruntime-extensions .* or tokenizers .* neither is installed; "
                                           "install one: pip install onnxruntime-extensions"):
        load_tokenizer(m)
    older = m.replaced(tokenizer={k: v for k, v in m.data["tokenizer"].items() if k != "graph"})
    with pytest.raises(ArtifactError, match="has no tokenizer graph"):
        load_tokenizer(older, "graph")
    with pytest.raises(InputError, match="unknown tokenizer 'spm'"):
        load_tokenizer(m, "spm")


# Run in a fresh interpreter where these packages cannot be imported, as in a venv without them.
_WITHOUT = """
import sys, importlib.abc
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tokenizers", "sentencepiece", "torch", "transformers"}:
            raise ImportError(f"No module named {name!r} (blocked)")
sys.meta_path.insert(0, Absent())
from varedit_deploy.cli import main
code = main(sys.argv[1:])
assert not {"tokenizers", "sentencepiece", "torch", "transformers"} & set(sys.modules)
sys.exit(code)
"""


def test_a_pure_onnx_edit_gives_the_same_bits(tiny_artifact, tmp_path):
    """`edit --backend onnxruntime` with neither tokenizers nor sentencepiece (nor torch) importable: the
    tokenizer graph runs, and the picture is byte for byte the one the tokenizers path makes (.ci/run
    does the same in a venv that has only onnxruntime, onnxruntime-extensions, numpy and Pillow)."""
    from varedit_deploy.cli import main
    from varedit_deploy.imaging import SAMPLE_PHOTO

    args = ["edit", "--artifacts", str(tiny_artifact), "--backend", "onnxruntime", "--image", str(SAMPLE_PHOTO),
            "--instruction", "make the sky <extra_id_0> purple  ", "--seed", "5"]
    assert main(args + ["--tokenizer", "json", "--out", str(tmp_path / "json.png")]) == 0
    run = subprocess.run([sys.executable, "-c", _WITHOUT, *args, "--out", str(tmp_path / "graph.png")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "tokenizer: tokenizer.onnx (ONNX Runtime + onnxruntime-extensions)" in run.stdout
    assert (tmp_path / "graph.png").read_bytes() == (tmp_path / "json.png").read_bytes()
