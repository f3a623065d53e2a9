"""16-bit graphs that survive trained-like ranges: T5 lowered as the official fp16 load runs it, and a
range record that keeps out-of-range nodes fp32 in fp16 builds.

Random tiny weights never leave fp16's range; the oracles here scale a tiny model's weights so that
T5's FFN output, the VAE decoder's activations and the step's residual stream pass 65,504 in fp32.
The naive lowering (every matrix product fp16) then overflows, while the lowering a build does with
the range record stays finite and close to fp32.
"""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from varedit_deploy.artifact import read_manifest
from varedit_deploy.calibration.ranges import RANGES_FILE, record_ranges
from varedit_deploy.config import from_name
from varedit_deploy.errors import ArtifactError
from varedit_deploy.export.artifacts import export_artifacts
from varedit_deploy.export.external_data import lower_graph
from varedit_deploy.export.precision import FP16_SAFE_MAX, t5_fp32_nodes, to_half
from varedit_deploy.model.loaded import VAREditModel
from varedit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from varedit_deploy.runtime.pipeline import EditPipeline
from varedit_deploy.sampling import NumpyNoise

SCALE = 3e6  # on weights of order 0.01-0.1: outputs of order 1e5-1e6, past fp16's 65,504


def export_wide_artifact(t5_source, folder):
    """tiny-2b with trained-like ranges in T5's FFN output, the VAE decoder and the step's residual
    stream, exported in fp32 into `folder` with its range record (one edit)."""
    from transformers import T5EncoderModel

    shutil.copytree(t5_source, folder / "t5")
    t5 = T5EncoderModel.from_pretrained(str(folder / "t5"))
    model = VAREditModel.random(from_name("tiny-2b"), seed=0)
    with torch.no_grad():
        for block in t5.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(SCALE)
        model.transformer.blocks[0].ffn.fc2.weight.mul_(SCALE)
        model.vae.decoder.conv_in.weight.mul_(SCALE)
    t5.save_pretrained(str(folder / "t5"))  # the export reads T5 from its folder
    model.attach_text_encoder(folder / "t5", "fp32")
    art = export_artifacts(model, folder / "art", validate=False, progress=lambda _: None)
    record_ranges(art, edits=1, progress=lambda _: None)
    return art


def record_calls(art):
    """What the step (its last scale) and the VAE decoder read in an fp32 edit of `art`."""
    from varedit_deploy.calibration.backends import Recording, RecordingBackend

    m = read_manifest(art)
    recording = Recording(per_shape=1)
    with OnnxRuntimeBackend(m) as inner:
        photo = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
        EditPipeline(m, RecordingBackend(inner, recording)).generate("make the sky purple", photo, noise=NumpyNoise(1))
    last = max((s for s in recording.samples["step"] if s["x"].shape[1] < m.schedule["source_tokens"]),
               key=lambda s: s["x"].shape[1])
    return {"step": last, "vae_decoder": recording.samples["vae_decoder"][0]}


@pytest.fixture(scope="module")
def wide_artifact(tiny_text_dir, tmp_path_factory):
    return export_wide_artifact(tiny_text_dir, tmp_path_factory.mktemp("wide"))


def _run(graph_path, feeds):
    """fp32 graphs on ONNX Runtime."""
    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _run_fp16(graph_path, feeds):
    """16-bit graphs in onnx's reference evaluator: numpy stores every fp16 value in fp16, as a GPU does,
    where ONNX Runtime's CPU provider runs the fp16 nodes it has no kernel for in fp32 (and cannot overflow)."""
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(graph_path))
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return ReferenceEvaluator(model).run(None, {k: np.asarray(v).astype(types[k]) for k, v in feeds.items()})


def test_fp16_text_encoder_keeps_wo_and_the_residual_stream_fp32(tiny_model, tmp_path):
    """As the official fp16 load: every `wo` product and every residual Add but the first fp32; the
    attention and `wi` products fp16. bf16 (fp32's range) lowers them all."""
    art = export_artifacts(tiny_model, tmp_path / "fp16", precision="fp16", validate=False, progress=lambda _: None)
    m = read_manifest(art)
    graph = onnx.load(str(m.graph_path("text_encoder")))
    types = {v.name: v.type.tensor_type.elem_type
             for v in onnx.shape_inference.infer_shapes(graph).graph.value_info}
    out = {n.name: types.get(n.output[0]) for n in graph.graph.node}
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    blocks = range(len(tiny_model.text_encoder.model.encoder.block))
    assert all(out[f"/t5/encoder/block.{b}/layer.1/DenseReluDense/wo/MatMul"] == f32 for b in blocks)
    assert all(out[f"/t5/encoder/block.{b}/layer.1/Add"] == f32 for b in blocks)
    assert all(out[f"/t5/encoder/block.{b}/layer.0/Add"] == f32 for b in blocks if b > 0)
    assert out["/t5/encoder/block.0/layer.0/Add"] == f16  # before the first FFN the stream is still fp16
    assert out["/t5/encoder/block.1/layer.1/DenseReluDense/wi_0/MatMul"] == f16
    assert out["/t5/encoder/block.0/layer.0/SelfAttention/q/MatMul"] == f16
    assert "wo" in m.graphs["text_encoder"]["mixed_precision"] and m.graphs["step"]["mixed_precision"].startswith("fp16")
    assert not t5_fp32_nodes(onnx.load(str(m.graph_path("step"))))  # the rule names T5's nodes only
    art = export_artifacts(tiny_model, tmp_path / "bf16", precision="bf16", validate=False, progress=lambda _: None)
    graph = onnx.load(str(read_manifest(art).graph_path("text_encoder")), load_external_data=False)
    wo = [n for n in graph.graph.node if n.name.endswith("/DenseReluDense/wo/MatMul")]
    weights = {t.name: t.data_type for t in graph.graph.initializer}
    assert wo and all(weights.get(n.input[1]) == onnx.TensorProto.BFLOAT16 for n in wo)


def test_the_official_t5_mixed_precision_survives_an_fp16_overflow(wide_artifact, tmp_path):
    """T5's FFN output passes fp16's range: the naive fp16 lowering returns inf/nan, the official mixed
    precision (wo and the residual stream fp32) stays finite and within fp16's error of fp32."""
    m = read_manifest(wide_artifact)
    ids = {"input_ids": np.array([[5, 9, 7, 12, 30, 1]], np.int64)}
    (reference,) = _run(m.graph_path("text_encoder"), ids)
    assert np.isfinite(reference).all()
    assert m.ranges["text_encoder"][max(m.ranges["text_encoder"], key=m.ranges["text_encoder"].get)] > 65504
    naive = to_half(onnx.load(str(m.graph_path("text_encoder"))), "fp16")
    onnx.save(naive, str(tmp_path / "naive.onnx"))
    (overflowed,) = _run_fp16(tmp_path / "naive.onnx", ids)
    assert not np.isfinite(overflowed).all()
    lower_graph(m.graph_path("text_encoder"), "text_encoder", "fp16", m.step_io, tmp_path / "official.onnx")
    (official,) = _run_fp16(tmp_path / "official.onnx", ids)
    assert np.isfinite(official).all()
    assert np.max(np.abs(official - reference)) / np.max(np.abs(reference)) < 2e-2


def test_the_range_record_lists_every_lowered_graph_and_travels_with_the_artifact(wide_artifact, tmp_path):
    m = read_manifest(wide_artifact)
    record = json.loads((wide_artifact / RANGES_FILE).read_text())
    assert sorted(record["graphs"]) == sorted(g for g in ("text_encoder", "text_cond", "vae_encoder", "vae_decoder",
                                                             "step") if m.has_graph(g))
    step = m.ranges["step"]
    assert step["x"] > 0 and all(v >= 0 and np.isfinite(v) for v in step.values())
    assert max(step.values()) > 65504 and max(m.ranges["vae_decoder"].values()) > 65504
    assert max(m.ranges["vae_encoder"].values()) < FP16_SAFE_MAX  # nothing was scaled there
    assert any(s.startswith("/blocks.0/ffn") for s in record["graphs"]["step"]["scopes"])
    copy = tmp_path / "art"
    shutil.copytree(wide_artifact, copy)
    (copy / RANGES_FILE).write_text((copy / RANGES_FILE).read_text().replace("1", "2", 1))
    with pytest.raises(ArtifactError, match=f"{RANGES_FILE} was altered"):
        read_manifest(copy)


@pytest.fixture(scope="module")
def recorded_calls(wide_artifact):
    return record_calls(wide_artifact)


@pytest.mark.parametrize("graph", ["step", "vae_decoder"])
@pytest.mark.parametrize("with_record", [True, False])
def test_fp16_graphs_built_with_the_range_record_stay_finite_and_close(wide_artifact, recorded_calls, tmp_path,
                                                                       graph, with_record):
    """The step (residual stream past 65,504) and the VAE decoder (activations past it), lowered to fp16 as
    `build --precision fp16` lowers them (cache I/O in 16 bits), on the inputs of a real fp32 edit: with
    the range record the outputs stay finite and within fp16's error of fp32; without it they overflow."""
    m = read_manifest(wide_artifact)
    feeds = recorded_calls[graph]
    reference = _run(m.graph_path(graph), feeds)
    lower_graph(m.graph_path(graph), graph, "fp16", m.step_io, tmp_path / f"{graph}.onnx",
                m.ranges[graph] if with_record else None)
    lowered = _run_fp16(tmp_path / f"{graph}.onnx", feeds)
    first = lowered[0].astype(np.float32)  # logits, or the decoded image
    if not with_record:
        assert not np.isfinite(first).all()
        return
    assert all(np.isfinite(x.astype(np.float32)).all() for x in lowered)
    error = np.max(np.abs(first - reference[0])) / np.max(np.abs(reference[0]))
    assert error < 2e-2, error


def test_build_says_what_the_record_keeps_fp32_and_strict_fp16_refuses(wide_artifact, tmp_path, capsys):
    from varedit_deploy.builder.engines import BuildOptions, build_engines
    from varedit_deploy.errors import VareditError

    with pytest.raises(VareditError, match=r"--strict-fp16: the range record has values beyond fp16's safe range "
                                           r"\(16384\) at .*step: .*nodes\)"):
        build_engines(wide_artifact, BuildOptions(precision="fp16", strict_fp16=True, target="sm89"),
                      graphs=["step"])
    lines = []
    with pytest.raises(VareditError):  # stop before the TensorRT work: the record's lines come first
        build_engines(wide_artifact, BuildOptions(precision="fp16", target="sm75"), graphs=["vae_decoder"],
                      progress=lambda line: (lines.append(line), (_ for _ in ()).throw(VareditError("stop")))[1])
    assert lines[0].startswith("range record: vae_decoder keeps") and "nodes fp32" in lines[0]


def test_each_measurement_runs_right_after_what_it_measures(tiny_artifact, tmp_path):
    """Each measurement is listed right after the node that makes its tensor, so that, run about as listed
    (`measuring_backend`), no measured activation outlives its last use by the graph itself."""
    from varedit_deploy.calibration.statistics import float_tensors, instrumented

    path = read_manifest(tiny_artifact).graph_path("step")
    stats = float_tensors(path)
    nodes = list(onnx.load(str(instrumented(path, tmp_path, stats)), load_external_data=False).graph.node)
    assert sum(n.name.endswith("/Abs") and n.name.startswith("/max_abs/") for n in nodes) == len(stats)
    made_by = {out: i for i, n in enumerate(nodes) for out in n.output}
    for i, node in enumerate(nodes):
        if node.name.startswith("/max_abs/") and node.op_type == "Abs":
            producer = made_by.get(node.input[0], -1)  # a graph input: -1, measured first
            between = nodes[producer + 1:i]
            assert all(n.name.startswith("/max_abs/") for n in between), (node.input[0], [n.name for n in between][:3])


def test_measuring_runs_in_priority_order_without_weight_copies(tiny_artifact):
    """ONNX Runtime's default order runs side branches last: measured tensors would all stay alive."""
    import onnxruntime

    from varedit_deploy.calibration.statistics import measuring_backend

    with measuring_backend(read_manifest(tiny_artifact)) as backend:
        options = backend._session_options()
    assert options.execution_order == onnxruntime.ExecutionOrder.PRIORITY_BASED
    assert not options.enable_cpu_mem_arena and options.get_session_config_entry("session.disable_prepacking") == "1"
