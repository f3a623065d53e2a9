"""Release-size artifacts on tiny models: weights stored once, exported without holding the model
(streamed graphs equal an ordinary export), one code path for every weight source, fast honest
verification, and `plan --artifacts` beside the estimate."""

import collections
import io
import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from varedit_deploy.artifact import read_manifest
from varedit_deploy.memory_plan import transformer_params
from varedit_deploy.export.precision import lower
from varedit_deploy.graph_io import StepIO
from varedit_deploy.cli import main
from varedit_deploy.config import from_name
from varedit_deploy.errors import ArtifactError
from varedit_deploy.export.artifacts import export_artifacts
from varedit_deploy.export.graphs import graph_specs
from varedit_deploy.export.onnx_export import export_graph
from varedit_deploy.export.source import ExportSource
from varedit_deploy.model.loaded import VAREditModel


def test_the_transformer_is_stored_once(tiny_artifact):
    """Every block weight lives in exactly one graph (step; the text K/V projections and AdaLN
    offsets in text_cond), and all graphs together hold the transformer about once."""
    m = read_manifest(tiny_artifact)
    holders = collections.defaultdict(list)
    for name, g in m.graphs.items():
        for param in g["weights"]["parameters"].get("transformer", []):
            holders[param].append(name)
    blocks = {p: gs for p, gs in holders.items() if p.startswith("blocks.")}
    per_block = len(list(VAREditModel.skeleton(m.config).transformer.blocks[0].parameters()))
    assert len(blocks) == 3 * per_block  # every parameter of the 3 blocks is stored...
    assert all(len(gs) == 1 for gs in blocks.values())  # ...once
    text = (".ca.mat_kv.weight", ".ca.v_bias", ".ada_gss")  # the per-edit text K/V and AdaLN offsets
    assert {gs[0] for p, gs in blocks.items() if p.endswith(text)} == {"text_cond"}
    assert {gs[0] for p, gs in blocks.items() if not p.endswith(text)} == {"step"}
    stored = sum(g["weights"]["by_module"].get("transformer", 0) for g in m.graphs.values())
    weights = transformer_params(m.config) * 4
    assert weights <= stored <= 1.05 * weights  # the word embedding is repeated in the small per-scale graphs
    assert m.weights["transformer"]["parameters"] == transformer_params(m.config)


def _ordinary_export(spec) -> bytes:
    """torch.onnx.export of the spec with the weights in memory, in the spec's attention form."""
    import onnx

    from varedit_deploy.export.weightless import FUSED_TRACE_OPSET, declare_fused_opset, trace_opset
    from varedit_deploy.export.attention_nodes import traced_attention

    f = io.BytesIO()
    opset = trace_opset(spec.attention)
    with warnings.catch_warnings(), torch.inference_mode(), traced_attention(spec.module, spec.attention):
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, spec.example, f, input_names=spec.inputs, output_names=spec.outputs,
                          dynamic_axes=spec.dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    if opset != FUSED_TRACE_OPSET:
        return f.getvalue()
    model = onnx.load_from_string(f.getvalue())
    declare_fused_opset(model)
    return model.SerializeToString()


@pytest.mark.parametrize("fixture, name", [("tiny-2b", "text_cond"), ("tiny-2b", "step"), ("tiny-8b", "step"),
                                           ("tiny-2b", "next_input_3"), ("tiny-8b", "vae_encoder")])
def test_a_streamed_graph_is_an_ordinary_export(fixture, name, tmp_path):
    """Traced without weights and written tensor by tensor, a graph has the nodes and initializers
    of torch.onnx.export with the weights in memory, and computes bit for bit the same. (torch
    also merges initializers of equal value through Identity nodes: the fixtures' zero biases.)"""
    from conftest import fixture_dir

    golden = fixture_dir(fixture)
    model = VAREditModel.from_fixture(golden)
    spec = next(s for s in graph_specs(model, None) if s.name == name)
    export_graph(spec, tmp_path, ExportSource.from_model(model), external_data_bytes=0, validate_bytes=None)
    ours, theirs = onnx.load(str(tmp_path / f"{name}.onnx")), onnx.load_from_string(_ordinary_export(spec))
    ops, theirs_ops = (collections.Counter(n.op_type for n in m.graph.node) for m in (ours, theirs))
    merged = theirs_ops.pop("Identity", 0)
    assert ops == theirs_ops and len(ours.graph.initializer) == len(theirs.graph.initializer) + merged
    assert (tmp_path / f"{name}.onnx.data").stat().st_size > 0
    feeds = {n: v.numpy() for n, v in zip(spec.inputs, spec.example)}
    a = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(_ordinary_export(spec), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_streamed_half_graphs_equal_the_converted_fp32_graph(tmp_path, precision):
    """Converted tensor by tensor as written: the same initializers and nodes as lowering the whole
    fp32 graph in memory (export/precision.py's `lower`: fp32 placement and 16-bit cache I/O)."""
    model = VAREditModel.random(from_name("tiny-8b"))
    src = ExportSource.from_model(model)
    names = ("text_cond", "step") + (("vae_encoder",) if precision == "bf16" else ())  # + Conv/InstanceNorm
    for spec in graph_specs(model, None):
        if spec.name not in names:
            continue
        (tmp_path / "a").mkdir(exist_ok=True), (tmp_path / "b").mkdir(exist_ok=True)
        export_graph(spec, tmp_path / "a", src, external_data_bytes=10_000, validate_bytes=None)
        export_graph(spec, tmp_path / "b", src, precision, external_data_bytes=10_000, validate_bytes=None)
        whole = lower(onnx.load(str(tmp_path / "a" / f"{spec.name}.onnx")), spec.name, precision, StepIO())
        streamed = onnx.load(str(tmp_path / "b" / f"{spec.name}.onnx"))
        a = {t.name: (t.data_type, onnx.numpy_helper.to_array(t).tobytes()) for t in whole.graph.initializer}
        b = {t.name: (t.data_type, onnx.numpy_helper.to_array(t).tobytes()) for t in streamed.graph.initializer}
        assert a == b, spec.name
        assert sorted(n.SerializeToString() for n in whole.graph.node) == sorted(
            n.SerializeToString() for n in streamed.graph.node)


def _write_release(folder, model, text_dir):
    import dataclasses

    from varedit_deploy.model.checkpoint import ours_to_official_transformer

    config = dataclasses.replace(model.config, transformer_file="t.pth", vae_file="v.pth", text_encoder_dir="t5")
    torch.save(ours_to_official_transformer(model.transformer.state_dict(), config.transformer.block_chunks),
               folder / "t.pth")
    torch.save({"vae": model.vae.state_dict()}, folder / "v.pth")
    (folder / "t5").symlink_to(text_dir)
    return config


def test_random_release_and_in_memory_sources_export_the_same_graphs(tmp_path, tiny_text_dir):
    """Random weights drawn per tensor, a memory-mapped release folder and the model in memory go
    through one code path and give byte-identical graphs."""
    config = from_name("tiny-2b")
    model = VAREditModel.random(config, seed=5)
    model.attach_text_encoder(tiny_text_dir, "fp32")
    (tmp_path / "release").mkdir()
    release_config = _write_release(tmp_path / "release", model, tiny_text_dir)
    sources = {"memory": ExportSource.from_model(model), "random": ExportSource.random(config, 5, tiny_text_dir),
               "release": ExportSource.from_release(tmp_path / "release", release_config)}
    written = {}
    for key, src in sources.items():
        (tmp_path / f"out-{key}").mkdir()
        for spec in graph_specs(src.model, src.t5):
            if spec.name in ("text_encoder", "text_cond", "step", "next_input_0"):  # the VAE graphs: slow to trace
                files = export_graph(spec, tmp_path / f"out-{key}", src, external_data_bytes=0,
                                     validate_bytes=None)["files"]
                written[key, spec.name] = [(f["bytes"], f["sha256"]) for f in files]
    for (key, name), files in written.items():
        assert files == written["memory", name], (key, name)
    loaded = VAREditModel.from_release(tmp_path / "release", release_config, with_text_encoder=False)
    for a, b in zip(model.transformer.parameters(), loaded.transformer.parameters()):
        assert torch.equal(a, b)


def test_release_sources_are_checked_before_anything_is_written(tmp_path, tiny_text_dir):
    model = VAREditModel.random(from_name("tiny-2b"))
    (tmp_path / "release").mkdir()
    config = _write_release(tmp_path / "release", model, tiny_text_dir)
    state = torch.load(tmp_path / "release" / "t.pth", weights_only=True)
    del state["head.weight"]
    torch.save(state, tmp_path / "release" / "t.pth")
    from varedit_deploy.errors import CheckpointError

    with pytest.raises(CheckpointError, match="missing: head.weight"):
        ExportSource.from_release(tmp_path / "release", config)


@pytest.fixture(scope="module")
def external_artifact(tmp_path_factory):
    """tiny-8b with every graph over 100 kB in external data (release artifacts' layout)."""
    return export_artifacts(VAREditModel.random(from_name("tiny-8b")), tmp_path_factory.mktemp("ext") / "a",
                            progress=lambda _: None, external_data_bytes=100_000, validate=False)


@pytest.fixture
def hashed(monkeypatch):
    """Large files are those over 100 kB here; records the name of every file hashed."""
    import varedit_deploy.artifact as artifact

    monkeypatch.setattr(artifact, "HASH_ON_LOAD_LIMIT", 100_000)
    names = []
    real = artifact.sha256_file
    monkeypatch.setattr(artifact, "sha256_file", lambda p: names.append(p.name) or real(p))
    return names


def test_verification_hashes_large_files_once(external_artifact, tmp_path, hashed):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(external_artifact, art, copy_function=shutil.copy)  # new mtimes: the stamp no longer vouches
    big = "vae_decoder.onnx.data"
    read_manifest(art)
    assert big in hashed and json.loads((art / "verified.json").read_text())["graphs/" + big]["sha256"]
    hashed.clear()
    read_manifest(art)
    assert big not in hashed and "sample.onnx" in hashed  # stamped large files are trusted, small ones hashed
    data = art / "graphs" / big
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    stat = data.stat()
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: quick cannot see it...
    read_manifest(art)
    with pytest.raises(ArtifactError, match=f"{big} was altered"):  # ...a full check does
        read_manifest(art, verify="full")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again on a quick load
    with pytest.raises(ArtifactError, match=f"{big} was altered"):
        read_manifest(art)


def test_export_stamps_what_it_wrote(external_artifact, hashed):
    read_manifest(external_artifact)
    assert "step.onnx.data" not in hashed and "vae_decoder.onnx.data" not in hashed  # hashed once: as written
    assert "sample.onnx" in hashed


def test_plan_sets_the_artifact_beside_the_estimate(tiny_artifact, capsys):
    assert main(["plan", "--artifacts", str(tiny_artifact)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert 1.0 <= float(rows["transformer"][3]) <= 1.05 and float(rows["vae"][3]) == pytest.approx(1.0)
    assert "step" in rows and "T5 released after encoding" in out


def test_text_encoder_can_be_released_after_encoding(tiny_artifact, photos):
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    keep = EditPipeline.from_artifacts(tiny_artifact).edit(photos["coffee"], "make it red", noise=NumpyNoise(4), record=True)
    pipe = EditPipeline.from_artifacts(tiny_artifact, keep_text_encoder=False)
    assert "text_encoder" not in pipe.backend._graphs
    for _ in range(2):
        freed = pipe.edit(photos["coffee"], "make it red", noise=NumpyNoise(4), record=True)
        assert "text_encoder" not in pipe.backend._graphs
        assert all(np.array_equal(a, b) for a, b in zip(keep.loop.bits, freed.loop.bits))


def test_lowering_at_build_time_streams_external_weights(external_artifact, tmp_path):
    """`build --precision fp16` on an fp32 artifact converts tensor by tensor, to what lowering
    the whole loaded graph gives."""
    from varedit_deploy.export.external_data import lower_graph

    path = read_manifest(external_artifact).graph_path("step")
    lower_graph(path, "step", "fp16", StepIO(), tmp_path / "step.onnx")
    streamed = onnx.load(str(tmp_path / "step.onnx"))
    whole = lower(onnx.load(str(path)), "step", "fp16", StepIO())
    assert (tmp_path / "step.onnx.data").is_file()
    assert ({t.name: onnx.numpy_helper.to_array(t).tobytes() for t in streamed.graph.initializer}
            == {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in whole.graph.initializer})
    onnx.checker.check_model(str(tmp_path / "step.onnx"), full_check=True)


def test_plan_offers_t5_on_the_cpu_or_released(capsys):
    from varedit_deploy.memory_plan import plan

    p = plan(from_name("8b-512"), "bf16", 1.0, 77)
    assert p.t5_on_cpu == pytest.approx(p.total - p.text_encoder_weights)
    assert p.t5_on_cpu <= p.t5_released < p.total  # freed after encoding: the larger phase, not the sum
    assert main(["plan", "--model", "8b-512", "--device", "orin-nx-16"]) == 0
    assert "T5 freed" in capsys.readouterr().out
