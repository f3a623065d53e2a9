"""`quantize` at release size, proved on small models: the streamed path (forced, or chosen because a graph
is over the in-memory limit) never loads a whole graph, writes ModelOpt's formats with ModelOpt's numbers,
streams from 16-bit sources, and its artifacts run, build with TensorRT-RTX and refuse bad input in one line."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from varedit_deploy.artifact import read_manifest
from varedit_deploy.builder.engines import BuildOptions, build_engines
from varedit_deploy.calibration import streamed
from varedit_deploy.calibration.backends import Recording, RecordingBackend
from varedit_deploy.calibration.dataset import default_set
from varedit_deploy.calibration.evaluate import TextSource, run_edit
from varedit_deploy.calibration.ptq import quantize_graph
from varedit_deploy.calibration.streaming import int4_rtn
from varedit_deploy.cli import main
from varedit_deploy.config import from_name
from varedit_deploy.export.artifacts import export_artifacts
from varedit_deploy.export.source import ExportSource
from varedit_deploy.imaging import SAMPLE_PHOTO
from varedit_deploy.memory_plan import quantized_matmul_bytes
from varedit_deploy.model.tiny_text import write_tiny_text_encoder
from varedit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from varedit_deploy.runtime.pipeline import EditPipeline

from test_quantize_artifacts import _quantised_products

QUICK = ["--calibration-edits", "2", "--held-out", "1"]


def _quantize(source, out, mode, *extra):
    assert main(["quantize", "--artifacts", str(source), "--out", str(out), "--mode", mode, *QUICK, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def external_artifact(tmp_path_factory):
    """The tiny model exported with every weight in external data, as release-size graphs are."""
    return _export(tmp_path_factory.mktemp("ext") / "fp32", "fp32")


def _export(out, precision):
    config = from_name("tiny-2b")
    text = write_tiny_text_encoder(out.parent / "t5", config.transformer.text_channels)
    src = ExportSource.random(config, seed=0, text_folder=text, precision="fp32")
    export_artifacts(src, out, precision=precision, external_data_bytes=0, progress=lambda _: None,
                     source={"command": "varedit-deploy export --random-weights --model tiny-2b"})
    return out


@pytest.fixture(scope="module")
def int4(external_artifact, tmp_path_factory):
    """Chosen by size: the in-memory limit lowered below the tiny step graph."""
    mp = pytest.MonkeyPatch()
    mp.setattr(streamed, "IN_MEMORY_LIMIT", 100_000)
    try:
        return _quantize(external_artifact, tmp_path_factory.mktemp("q") / "int4", "int4")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def int8_kv8(external_artifact, tmp_path_factory):
    return _quantize(external_artifact, tmp_path_factory.mktemp("q") / "int8", "int8", "--stream", "--kv-cache", "int8")


@pytest.fixture(scope="module")
def fp8(external_artifact, tmp_path_factory):
    return _quantize(external_artifact, tmp_path_factory.mktemp("q") / "fp8", "fp8", "--stream")


def _dequantize_inputs(model):
    """MatMul name -> the initializers its weight's DequantizeLinear reads (values, scales)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            out[node.name] = (numpy_helper.to_array(inits[dq.input[0]]),
                              numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32), dict(
                                  (a.name, onnx.helper.get_attribute_value(a)) for a in dq.attribute))
    return out


def test_the_streamed_path_is_chosen_by_size_and_never_loads_a_whole_graph(external_artifact, tmp_path, monkeypatch,
                                                                          capsys):
    real_load = onnx.load

    def load(f, *args, load_external_data=True, **kwargs):
        assert not load_external_data, f"loaded whole: {f}"
        return real_load(f, *args, load_external_data=False, **kwargs)

    monkeypatch.setattr(streamed, "IN_MEMORY_LIMIT", 100_000)
    monkeypatch.setattr(onnx, "load", load)
    out = _quantize(external_artifact, tmp_path / "q", "int8", "--kv-cache", "int8", "--report-scales", "0")
    printed = capsys.readouterr().out
    assert "streamed: graph vae_decoder holds" in printed and "more than one protobuf can" in printed
    q = read_manifest(out).quantization
    assert q["streamed"] and q["method"] == "max" and q["search"]["skipped"]


def test_streamed_int4_is_modelopts_rtn_dq_bit_for_bit(int4, external_artifact):
    manifest = read_manifest(external_artifact)
    nodes = read_manifest(int4).graphs["step"]["quantized"]["nodes"]
    recording = Recording(per_shape=1, per_graph=2)
    with OnnxRuntimeBackend(manifest) as backend:
        run_edit(EditPipeline(manifest, RecordingBackend(backend, recording)), TextSource(),
                 default_set().calibration[0], seed=0, decode=False)
    source = onnx.load(str(manifest.graph_path("step")))
    ours = _dequantize_inputs(onnx.load(str(read_manifest(int4).graph_path("step"))))
    assert len(ours) == nodes > 0
    theirs = _dequantize_inputs(quantize_graph(source, "int4", "rtn_dq", recording.samples["step"], list(ours), "step"))
    assert set(theirs) == set(ours)
    for name, (q, scale, attrs) in ours.items():
        q_mo, scale_mo, attrs_mo = theirs[name]
        assert attrs == attrs_mo == {"axis": 0, "block_size": 128}
        np.testing.assert_array_equal(q, q_mo, err_msg=name)
        np.testing.assert_allclose(scale, scale_mo, rtol=1e-3, err_msg=name)  # ours stored fp16, ModelOpt's fp32


def test_int4_round_to_nearest_is_what_dequantization_undoes():
    w = np.random.default_rng(0).standard_normal((300, 5)).astype(np.float32)
    q, scale = int4_rtn(w)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and scale.shape == (3, 5)
    back = q * np.repeat(scale, 128, axis=0)[:300]
    assert np.all(np.abs(back - w) <= np.repeat(scale, 128, axis=0)[:300] / 2 + 1e-7)


@pytest.mark.parametrize("mode", ["int4", "int8_kv8", "fp8"])
def test_streamed_artifacts_store_what_the_memory_plan_counts_and_run(mode, request, tmp_path, capsys):
    folder = request.getfixturevalue(mode)
    manifest = read_manifest(folder)
    stored = "int8" if mode.startswith("int8") else mode
    quantised = [g for g, e in manifest.graphs.items() if "quantized" in e]
    assert quantised == ["text_cond", "step"]  # the text's K/V projections are a layer group too
    for graph in quantised:
        products = _quantised_products(folder, graph)
        assert products
        for (k, n), stored_bytes in products:
            assert stored_bytes == quantized_matmul_bytes(k, n, stored), (graph, k, n)
    report = json.loads((folder / "quantization_report.json").read_text())
    assert report["streamed"] and 0.5 < report["agreement"]["bit_agreement"] <= 1.0
    assert len(report["agreement"]["per_scale_bit_agreement"]) == manifest.config.schedule.num_scales
    assert manifest.data.get("kv_cache", {}).get("dtype") == ("int8" if mode == "int8_kv8" else None)
    out = tmp_path / "edited.png"
    assert main(["edit", "--artifacts", str(folder), "--image", str(SAMPLE_PHOTO), "--instruction", "add a red hat",
                 "--out", str(out)]) == 0 and out.is_file()


def test_int4_streams_from_bf16_and_builds_for_sm89(tmp_path, capsys):
    source = _export(tmp_path / "bf16", "bf16")
    out = _quantize(source, tmp_path / "int4", "int4")
    manifest = read_manifest(out)
    assert manifest.precision == "bf16" and manifest.quantization["high_precision"] == "bf16"
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["agreement"] is None and "no bf16 kernels" in report["not_measured"]
    engines = build_engines(out, BuildOptions(target="sm89"), progress=lambda _: None)
    assert (engines / "engines.json").is_file()
    refused = tmp_path / "kv8"
    assert main(["quantize", "--artifacts", str(source), "--out", str(refused), "--mode", "int4", "--kv-cache",
                 "int8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: an 8-bit KV cache need calibration edits") and "no bf16 kernels" in err
    assert not refused.exists()


def test_fp8_streamed_builds_for_sm89(fp8):
    engines = build_engines(fp8, BuildOptions(target="sm89"), progress=lambda _: None)
    assert json.loads((engines / "engines.json").read_text())


@pytest.mark.parametrize("argv, message", [
    (["--mode", "int4", "--stream", "--method", "awq_clip"], "--method awq_clip needs the calibration inputs stored"),
    (["--mode", "int8", "--stream", "--calibration-scales", "99"], "--calibration-scales 99: tiny-2b has 7 scales"),
    (["--mode", "int8", "--stream", "--report-scales", "8"], "--report-scales 8: tiny-2b has 7 scales"),
])
def test_streamed_requests_it_cannot_do_are_refused_before_any_work(external_artifact, tmp_path, capsys, argv,
                                                                     message):
    out = tmp_path / "q"
    assert main(["quantize", "--artifacts", str(external_artifact), "--out", str(out), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_truncated_weights_file_is_one_error_and_no_artifact(external_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(external_artifact, art)
    data = art / "graphs" / "step.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    out = tmp_path / "q"
    assert main(["quantize", "--artifacts", str(art), "--out", str(out), "--mode", "int4", "--stream"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "step.onnx.data" in err and err.count("\n") == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_plan_of_the_artifact_counts_the_weights_as_stored(int4, external_artifact):
    """`plan --artifacts` reads each graph's weight bytes from the manifest: a quantised graph's are what
    its files hold now, not the source's (the 16 GiB target is measured this way)."""
    from varedit_deploy.memory_plan import artifact_data

    def transformer(folder):
        return next(p["artifact_gib"] for p in artifact_data(read_manifest(folder), [])["parts"]
                    if p["part"] == "transformer")

    manifest = read_manifest(int4)
    stored = sum(f["bytes"] for g in ("step", "text_cond") for f in manifest.graphs[g]["files"])
    assert transformer(int4) < 0.6 * transformer(external_artifact)  # fp32 -> int4 + fp16; unchanged said 1.0
    assert 0 < manifest.graphs["step"]["weights"]["bytes"] + manifest.graphs["text_cond"]["weights"]["bytes"] <= stored


def test_plan_shows_an_artifacts_weights_with_an_8_bit_cache(int4, capsys):
    from varedit_deploy.memory_plan import artifact_data

    runs = artifact_data(read_manifest(int4), [], kv8=True)["runs"]
    assert [r["kv_cache_dtype"] for r in runs] == ["float16", "int8"]
    assert runs[1]["kv_cache_gib"] == pytest.approx(runs[0]["kv_cache_gib"] / 2)
    assert main(["plan", "--artifacts", str(int4), "--kv-cache", "int8"]) == 0
    assert "its weights with an 8-bit KV cache: KV cache" in capsys.readouterr().out
