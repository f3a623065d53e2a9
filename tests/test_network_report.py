"""What TensorRT-RTX's ONNX parser makes of an attention, on hand-built ONNX graphs: a
MatMul-Softmax-MatMul chain (opset 17, as exported today) and one ONNX `Attention` (opset 23);
and that fp32 builds are fp32 (TF32 off) with decomposable attention."""

import onnx
import pytest
import tensorrt_rtx as trt  # the [rtx] extra; its builds need no GPU
from onnx import TensorProto, helper

from varedit_deploy.builder.engines import BuildOptions, _configure, parse_file
from varedit_deploy.builder.network_report import (MAX_HOPS, Layer, attention_chains, mark_attentions_decomposable,
                                                 network_record)
from varedit_deploy.export.precision import to_half
from varedit_deploy.builder.tensorrt_api import make_logger

B, H, L, C = 2, 2, 8, 16


def _io(name: str, shape: list[int]):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def chain_model(scale_before_softmax: bool = True) -> onnx.ModelProto:
    """softmax(q @ k^T * s) @ v, spelled out the way the opset-17 export does."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"])]
    scores = "qk"
    if scale_before_softmax:
        nodes.append(helper.make_node("Mul", ["qk", "scale"], ["qks"]))
        scores = "qks"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [_io(n, [B, H, L, C]) for n in "qkv"], [_io("y", [B, H, L, C])],
                              initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [C ** -0.5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def attention_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["y"])], "attention",
                              [_io(n, [B, H, L, C]) for n in "qkv"], [_io("y", [B, H, L, C])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def softmax_only_model() -> onnx.ModelProto:
    """A softmax that is no attention (the sampler's): nothing multiplies into or out of it."""
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["p"], axis=-1),
                               helper.make_node("Add", ["p", "x"], ["y"])], "softmax",
                              [_io("x", [B, L])], [_io("y", [B, L])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def builder():
    logger = make_logger(trt, gpu_less=True)
    return trt.Builder(logger), logger


def parse(builder, model: onnx.ModelProto, tmp_path, name: str = "graph"):
    b, logger = builder
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(model, str(path))
    network, parser = parse_file(trt, b, logger, path, name)
    return network, parser


def test_a_matmul_softmax_matmul_attention_is_one_chain(builder, tmp_path):
    network, _ = parse(builder, chain_model(), tmp_path)
    record = network_record(network)
    assert record["attention_chains"] == 1 and record["fused_attentions"] == 0
    assert record["layers"]["MATRIX_MULTIPLY"] == 2 and record["layers"]["SOFTMAX"] == 1


def test_half_precision_casts_around_the_softmax_do_not_hide_the_chain(builder, tmp_path):
    half = to_half(chain_model(), "fp16")  # softmax stays fp32: Cast layers sit on both sides
    assert {n.op_type for n in half.graph.node} >= {"Cast"}
    network, _ = parse(builder, half, tmp_path)
    record = network_record(network)
    assert record["layers"]["CAST"] >= 2 and record["attention_chains"] == 1


def test_a_softmax_between_no_matrix_products_is_no_chain(builder, tmp_path):
    network, _ = parse(builder, softmax_only_model(), tmp_path)
    assert network_record(network)["attention_chains"] == 0


def test_an_onnx_attention_parses_to_one_fused_attention(builder, tmp_path):
    network, _ = parse(builder, attention_model(), tmp_path)
    record = network_record(network)
    assert record["fused_attentions"] == 1 and record["attention_chains"] == 0
    assert record["layers"]["ATTENTION_INPUT"] == record["layers"]["ATTENTION_OUTPUT"] == 1
    assert "MATRIX_MULTIPLY" not in record["layers"] and "SOFTMAX" not in record["layers"]


def test_chains_are_followed_through_at_most_max_hops_pass_through_layers():
    def chain(hops: int) -> list[Layer]:
        layers = [Layer("MATRIX_MULTIPLY", ("q", "k"), ("t0",))]
        layers += [Layer("CAST", (f"t{i}",), (f"t{i + 1}",)) for i in range(hops)]
        return layers + [Layer("SOFTMAX", (f"t{hops}",), ("p",)), Layer("MATRIX_MULTIPLY", ("p", "v"), ("y",))]

    assert attention_chains(chain(MAX_HOPS)) == 1
    assert attention_chains(chain(MAX_HOPS + 1)) == 0
    # A softmax feeding a matrix product but fed by a reduction is no attention.
    assert attention_chains([Layer("REDUCE", ("x",), ("r",)), Layer("SOFTMAX", ("r",), ("p",)),
                             Layer("MATRIX_MULTIPLY", ("p", "v"), ("y",))]) == 0


def test_fp32_attention_builds_because_it_is_marked_decomposable_and_without_tf32(builder, tmp_path):
    b, _ = builder
    opts = BuildOptions(flavour="tensorrt-rtx", precision="fp32", target="sm89")
    assert b.create_builder_config().get_flag(trt.BuilderFlag.TF32)  # on by default: why we clear it
    network, _parser = parse(builder, attention_model(), tmp_path, "plain")
    config = _configure(trt, b, opts, "sm89", None)
    assert not config.get_flag(trt.BuilderFlag.TF32) and config.get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    assert b.build_serialized_network(network, config) is None  # no fused fp32 kernel: it must decompose

    network, _parser = parse(builder, attention_model(), tmp_path, "marked")
    assert mark_attentions_decomposable(trt, network) == 1
    layer = next(network.get_layer(i) for i in range(network.num_layers)
                 if network.get_layer(i).type == trt.LayerType.ATTENTION_INPUT)
    layer.__class__ = trt.IAttentionInputLayer
    assert layer.attention.decomposable
    plan = b.build_serialized_network(network, _configure(trt, b, opts, "sm89", None))
    assert plan is not None and len(bytes(memoryview(plan))) > 1000
