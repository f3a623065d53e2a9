"""Quantisation pieces that need no ModelOpt: calibration sets, layer groups, recording, the 8-bit KV
cache rewrite, target capabilities and the memory plan's quantised rows."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from varedit_deploy.artifact import read_manifest
from varedit_deploy.builder.capabilities import check_supported, supported
from varedit_deploy.memory_plan import plan, plan_data, plan_table, transformer_bytes
from varedit_deploy.export.precision import to_half
from varedit_deploy.calibration import kv_cache
from varedit_deploy.graph_io import StepIO
from varedit_deploy.calibration.backends import Recording, RecordingBackend
from varedit_deploy.calibration.dataset import HELD_OUT_PHOTOS, default_set, load_set
from varedit_deploy.calibration.groups import default_exclusions, excluded, find_groups, group_of, node_scope
from varedit_deploy.config import from_name
from varedit_deploy.errors import InputError, VareditError
from varedit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from varedit_deploy.runtime.pipeline import EditPipeline


# --------------------------------------------------------------------------- calibration sets
def test_default_set_covers_every_edit_type_and_holds_out_unseen_photos_and_instructions():
    s = default_set()
    assert len(s.calibration) + len(s.held_out) == 32 and len(s.held_out) == 8
    kinds = {"add", "remove", "replace", "colour", "style", "background"}
    assert {p.kind for p in s.calibration} == kinds and {p.kind for p in s.held_out} == kinds
    assert not {p.instruction for p in s.calibration} & {p.instruction for p in s.held_out}
    assert not {p.image for p in s.calibration} & {p.image for p in s.held_out}
    assert {p.image for p in s.held_out} == set(HELD_OUT_PHOTOS)
    photo = s.held_out[1].load()  # the bundled VAREdit sample, a real photo
    assert isinstance(photo, Image.Image) and photo.size == (512, 512)
    assert s.sha256() == default_set().sha256() != s.limited(3, 2).sha256()


def _photo(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)


def test_a_user_folder_pairs_photos_with_instructions_and_holds_every_fourth_out(tmp_path):
    for i in range(2):
        _photo(tmp_path / f"p{i}.png", i)
    (tmp_path / "instructions.txt").write_text("add a hat\nmake it red\nremove the cup\nblur it\nturn it blue\n")
    s = load_set(tmp_path)
    assert [p.instruction for p in s.held_out] == ["blur it"]
    assert [p.image.endswith(f"p{i % 2}.png") for i, p in enumerate(s.calibration[:3])] == [True] * 3
    assert s.source == str(tmp_path)


@pytest.mark.parametrize("case, message", [
    ("empty", "has no photos"),
    ("blank", "blank lines (2)"),
    ("no-list", "has no instructions.txt"),
    ("unreadable", "not a readable image"),
    ("csv-columns", "lacks the column(s) instruction"),
    ("csv-split", "split must be calibration or held_out"),
    ("missing", "no such folder or CSV file"),
    ("one-pair", "needs at least one of each"),
])
def test_bad_calibration_sets_get_one_specific_error(tmp_path, case, message):
    path = tmp_path / "set"
    path.mkdir()
    if case in ("blank", "no-list", "unreadable", "one-pair"):
        _photo(path / "a.png")
    if case == "blank":
        (path / "instructions.txt").write_text("add a hat\n\nmake it red\n")
    if case == "unreadable":
        (path / "b.jpg").write_bytes(b"not a jpeg")
        (path / "instructions.txt").write_text("add a hat\n")
    if case == "one-pair":
        (path / "instructions.txt").write_text("add a hat\n")
    if case.startswith("csv"):
        _photo(tmp_path / "a.png")
        path = tmp_path / "set.csv"
        path.write_text("image,text\na.png,add a hat\n" if case == "csv-columns" else
                        "image,instruction,split\na.png,add a hat,calibration\na.png,make it red,test\n")
    if case == "missing":
        path = tmp_path / "nowhere"
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_set(path)


def test_a_csv_row_without_its_split_gets_the_default_split(tmp_path):
    _photo(tmp_path / "a.png")
    path = tmp_path / "set.csv"
    path.write_text("image,instruction,split\na.png,add a hat,calibration\na.png,make it red\n"
                    "a.png,blur it,held_out\n")  # the second row is short: csv gives None for its split
    s = load_set(path)
    assert [p.instruction for p in s.calibration] == ["add a hat", "make it red"]
    assert [p.instruction for p in s.held_out] == ["blur it"]


def test_limits_must_be_positive():
    with pytest.raises(InputError, match="--held-out must be at least 1"):
        default_set().limited(2, 0)


# ------------------------------------------------------------------------------ layer groups
def test_layer_groups_are_found_in_the_exported_graphs(tiny_artifact):
    m = read_manifest(tiny_artifact)
    models = {g: onnx.load(str(m.graph_path(g)), load_external_data=False) for g in m.graphs}
    groups = find_groups(models)
    assert [g.name for g in groups] == [f"blocks.{b}.{k}" for b in range(3)
                                        for k in ("qkv", "proj", "ca", "ca_kv", "fc1", "fc2")]
    by_name = {g.name: g for g in groups}
    assert by_name["blocks.1.fc2"].nodes == {"step": ("/blocks.1/ffn/fc2/MatMul",)}  # the source pass runs step
    assert by_name["blocks.0.ca"].nodes["step"] == ("/blocks.0/ca/mat_q/MatMul", "/blocks.0/ca/proj/MatMul")
    # The head, embeddings, attention score products and conditioning belong to no group.
    grouped = {n for g in groups for names in g.nodes.values() for n in names}
    step_matmuls = {n.name for n in models["step"].graph.node if n.op_type == "MatMul"}
    assert "/head/MatMul" in step_matmuls - grouped  # (attention products are Attention nodes, in no group)
    assert {n.name for n in models["step"].graph.node if n.op_type == "Attention"} == {
        f"/blocks.{b}/{part}Attention" for b in range(3) for part in ("", "ca/")}
    # The text's K/V projections run once per edit, in text_cond: a group of their own, found by the
    # parameter each node reads (the graph's node names, /MatMul_1, say nothing).
    assert {g.name: set(g.nodes) for g in groups if "text_cond" in g.nodes} == {
        f"blocks.{b}.ca_kv": {"text_cond"} for b in range(3)}


def test_dynamo_name_scopes_and_group_patterns():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="node_MatMul_7")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'blocks.4', 'blocks.4.ffn', "
                                                                     "'blocks.4.ffn.fc1', 'linear']")
    assert node_scope(node) == "blocks.4.ffn.fc1" and group_of("blocks.4.ffn.fc1") == (4, "fc1")
    assert group_of("blocks.2.sa.mat_qkv") == (2, "qkv") and group_of("blocks.2") == (2, "qkv")
    assert group_of("blocks.2.sa.proj") == (2, "proj") and group_of("blocks.11.ca.mat_q") == (11, "ca")
    assert group_of("head") is None and group_of("word_embed") is None


def test_default_exclusions_keep_first_and_last_blocks_only_where_activations_are_quantised():
    assert default_exclusions("int8", 32) == [r"blocks\.0\..*", r"blocks\.31\..*"]
    assert default_exclusions("fp8", 40) == [r"blocks\.0\..*", r"blocks\.39\..*"]
    assert default_exclusions("int4", 40) == [] and default_exclusions("int8", 3) == []


def test_recording_is_bounded_per_input_shape_and_per_graph(tiny_artifact):
    m = read_manifest(tiny_artifact)
    recording = Recording(per_shape=1, per_graph=5)
    pipe = EditPipeline(m, RecordingBackend(OnnxRuntimeBackend(m), recording))
    photo = Image.new("RGB", (64, 48), (200, 30, 30))
    pipe.edit(photo, "add a hat", seed=0)
    pipe.edit(photo, "add a hat", seed=1)  # same shapes again: nothing new is recorded
    assert len(recording.samples["step"]) == 5 and recording.shapes("step") == 5  # capped per graph
    assert len(recording.samples["sample"]) == 5 and len(recording.samples["vae_encoder"]) == 1
    first = recording.samples["step"][0]  # the source pass: the source tokens, an empty past
    assert first["x"].shape == (2, 256, 64) and first["past_k_0"].shape == (0, 2, 2, 32)
    assert not np.shares_memory(first["past_k_1"], pipe.loop.cache.k[1])  # copies, not views


# ----------------------------------------------------------------------------- 8-bit KV cache
def test_cache_tensors_are_found_by_name():
    views = kv_cache.CacheViews.of(StepIO(), depth=4)
    assert views.cache_of("past_k_3", output=False) == "k.3" and views.cache_of("new_v_0", output=True) == "v.0"
    assert views.cache_of("source_k", output=False) == "k.0" and views.cache_of("sar_v", output=True) == "sar_v"
    assert views.cache_of("source_k_2", output=False) is None and views.cache_of("source_k", output=True) is None
    assert views.cache_of("sar_k", output=False) == "sar_k" and views.cache_of("text_k", output=False) is None
    assert views.cache_of("past_k", output=False) is None and views.cache_of("new_k_1", output=False) is None
    assert views.cache_of("past_k_4", output=False) is None  # a layer the model does not have


def test_an_int8_cache_round_trips_within_half_a_step_per_channel():
    """past (int8) -> dequantised, halved -> new (int8): a step reading and writing its caches, on a toy graph."""
    shape = ["L", 2, 3, 4]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["past_k_0", "half"], ["new_k_0"])], "toy",
        [helper.make_tensor_value_info("past_k_0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("new_k_0", TensorProto.FLOAT, shape)],
        [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5, 2, 3, 4)) * np.linspace(0.1, 3, 12).reshape(3, 4)).astype(np.float32)
    views = kv_cache.CacheViews.of(StepIO(), depth=1)
    scales = kv_cache.calibrate_scales({"step": [{"past_k_0": x}]}, views)
    assert scales["k.0"].shape == (12,)
    assert kv_cache.rewrite(model, scales, views) == ["past_k_0", "new_k_0"]
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [TensorProto.INT8] * 2
    step = scales["k.0"].reshape(3, 4)
    q = np.clip(np.round(x / step), -127, 127).astype(np.int8)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"past_k_0": q})[0]
    assert out.dtype == np.int8
    assert np.all(np.abs(out * step - q * step * 0.5) <= step * (0.5 + 1e-5))  # within half a step, per channel
    assert np.array_equal(out, np.round(q * step * np.float32(0.5) / step).astype(np.int8))


# ------------------------------------------------------------------ capabilities and the plan
def test_each_flavour_builds_what_its_targets_support():
    assert supported("tensorrt-rtx", "sm89") == ["fp32", "fp16", "bf16", "fp8", "int4"]
    assert "fp8" not in supported("tensorrt-rtx", "sm86") and "int4" not in supported("tensorrt-rtx", "sm75")
    assert "int8" in supported("tensorrt", "sm87") and "fp8" not in supported("tensorrt", "sm87")
    assert {"int8", "fp8", "int4"} <= set(supported("tensorrt", "sm90"))
    with pytest.raises(VareditError, match=r"tensorrt-rtx cannot build int8 \(W8A8\) engines for sm89: it supports "
                                           r"fp32, fp16, bf16, fp8 \(E4M3\), int4 \(weight-only\) there"):
        check_supported("tensorrt-rtx", "sm89", "int8")
    with pytest.raises(VareditError, match="FP8 needs Ada"):
        check_supported("tensorrt", "sm87", "fp8")


def test_the_plan_marks_what_the_device_cannot_run_and_counts_quantised_weights():
    orin = plan_table(plan_data(from_name("8b-512"), "orin-agx-64", None, 1.0, 77))
    assert "no: no fp8 on sm87" in orin.splitlines()[6] and "no fp8" not in orin.splitlines()[5]
    config = from_name("8b-1024")
    fp16, int8, int4 = (transformer_bytes(config, p) for p in ("fp16", "int8", "int4"))
    assert int4 < 0.4 * fp16 and 0.5 * fp16 < int8 < 0.62 * fp16
    p16, p8 = plan(config, "int4", 1.0, 77), plan(config, "int4", 1.0, 77, kv_bytes=1)
    assert p8.kv_cache == pytest.approx(p16.kv_cache / 2) and p8.total < p16.total  # 16-bit caches at run time


def test_half_graphs_are_valid_onnx(tiny_artifact):
    """The fp16 converter appends casts after their readers; the lowered graph must be sorted again."""
    m = read_manifest(tiny_artifact)
    for name in ("text_cond", "step"):
        onnx.checker.check_model(to_half(onnx.load(str(m.graph_path(name))), "fp16"))


def test_exclusion_patterns_match_whole_group_names(tiny_artifact):
    m = read_manifest(tiny_artifact)
    groups = find_groups({"step": onnx.load(str(m.graph_path("step")), load_external_data=False)})
    assert [g.name for g in excluded(groups, [r"blocks\.2\..*", "blocks.0.fc"])] == [
        "blocks.2.qkv", "blocks.2.proj", "blocks.2.ca", "blocks.2.fc1", "blocks.2.fc2"]


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_nodes_kept_unquantised_read_what_the_fp32_graph_read():
    """Every way ModelOpt reroutes a MatMul's inputs is undone for a node left out of `keep`: Q/DQ on
    the activation, a DequantizeLinear weight, and AWQ's pre-quant scale (a Mul in front of the node)."""
    from varedit_deploy.calibration.ptq import keep_quantized

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    fp32 = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/blocks.0/ffn/fc1/MatMul")], "g", *io,
        [onnx.numpy_helper.from_array(w, "w")]), opset_imports=[helper.make_opsetid("", 19)])
    scale = np.full(4, 2.0, np.float32)
    quantized = helper.make_model(helper.make_graph([
        helper.make_node("Mul", ["x", "s"], ["x_scaled"], name="pre_quant_scale_mul"),
        helper.make_node("QuantizeLinear", ["x_scaled", "xs", "xz"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="wdq"),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="/blocks.0/ffn/fc1/MatMul")], "g", *io,
        [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(np.float32(0.05), "xs"),
         onnx.numpy_helper.from_array(np.int8(0), "xz"), onnx.numpy_helper.from_array(np.float32(0.02), "ws"),
         onnx.numpy_helper.from_array(np.int8(0), "wz"),
         onnx.numpy_helper.from_array(np.clip(np.round(w / 0.02 / 2), -128, 127).astype(np.int8), "wq")]),
        opset_imports=[helper.make_opsetid("", 19)])
    assert not np.allclose(_run(quantized, x), x @ w, atol=1e-3)
    kept_none = keep_quantized(quantized, fp32, set())
    assert np.allclose(_run(kept_none, x), x @ w, atol=1e-6)
    assert {n.op_type for n in kept_none.graph.node} == {"MatMul"}  # the scale, Q and DQ are pruned
    assert np.array_equal(_run(keep_quantized(quantized, fp32, {"/blocks.0/ffn/fc1/MatMul"}), x), _run(quantized, x))
