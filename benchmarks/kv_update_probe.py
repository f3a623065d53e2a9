"""Can TensorRT-RTX append a scale's K/V into the cache in place (IKVCacheUpdateLayer) from our ONNX?

    python benchmarks/kv_update_probe.py

Builds small graphs ahead of time for sm89 (no GPU needed) with ONNX `TensorScatter` (opset 24,
`mode="linear"`), which TensorRT's ONNX parser turns into an in-place KV-cache update: on the layout
the layer requires, [B, H, S, D] with the sequence on axis -2 and a static cache length, and on the
layout our step graph and runtime use, [L, 2, H, c] per layer with the tokens first (what the loop
binds as contiguous prefix and slot views, and what the fused kernels read), plus an 8-bit cache.
Prints and writes benchmarks/results/kv_update_probe.md: what parsed, what built, and TensorRT's words.
"""

from __future__ import annotations

import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def scatter_graph(cache_shape: list, update_shape: list, axis: int, elem: int):
    """cache, update, write_indices -> present (the updated cache, a graph output), then Relu of it."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("TensorScatter", ["cache", "update", "write_indices"], ["present"], mode="linear",
                              axis=axis, name="append")]
    inputs = [helper.make_tensor_value_info("cache", elem, cache_shape),
              helper.make_tensor_value_info("update", elem, update_shape),
              helper.make_tensor_value_info("write_indices", TensorProto.INT64, [cache_shape[0]])]
    outputs = [helper.make_tensor_value_info("present", elem, cache_shape)]
    graph = helper.make_graph(nodes, "kv_update", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])


def build(model, profile: dict[str, tuple]) -> tuple[str, str]:
    """(what happened, TensorRT's words or the layers it made)."""
    from varedit_deploy.builder.tensorrt_api import make_logger, strongly_typed_network
    from varedit_deploy.runtime.tensorrt_import import import_tensorrt

    trt = import_tensorrt("tensorrt-rtx")
    logger = make_logger(trt, gpu_less=True)
    builder = trt.Builder(logger)
    network = strongly_typed_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        words = [line for i in range(parser.num_errors) for line in parser.get_error(i).desc().splitlines()
                 if "Error Code" in line or "Assertion" in line]
        return "refused by the parser", "; ".join(w for w in words if "cudaError 35" not in w)
    layers = sorted({network.get_layer(i).type.name for i in range(network.num_layers)})
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM89, 0)
    p = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        p.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(p)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        return "parsed, build failed", f"layers {', '.join(layers)}"
    return f"built ({len(memoryview(plan)):,} bytes)", f"layers {', '.join(layers)}"


def main() -> None:
    from onnx import TensorProto

    half, int8 = TensorProto.FLOAT16, TensorProto.INT8
    cases = [
        ("[B, H, S, D] = [2, 4, 64, 32], fp16, axis -2 (the layer's layout)",
         scatter_graph([2, 4, 64, 32], [2, 4, "s", 32], -2, half), {"update": ((2, 4, 1, 32), (2, 4, 16, 32), (2, 4, 64, 32))}),
        ("[L, 2, H, c] = [64, 2, 4, 32], fp16, axis 0 (our per-layer cache: tokens first)",
         scatter_graph([64, 2, 4, 32], ["s", 2, 4, 32], 0, half), {"update": ((1, 2, 4, 32), (16, 2, 4, 32), (64, 2, 4, 32))}),
        ("[B, H, S, D] = [2, 4, 64, 32], int8 (an 8-bit cache)",
         scatter_graph([2, 4, 64, 32], [2, 4, "s", 32], -2, int8), {"update": ((2, 4, 1, 32), (2, 4, 16, 32), (2, 4, 64, 32))}),
    ]
    rows = []
    for label, model, profile in cases:
        outcome, words = build(model, profile)
        rows.append((label, outcome, words))
        print(f"{label}: {outcome}; {words}")
    lines = ["# In-place KV-cache update with TensorRT-RTX (ONNX TensorScatter -> IKVCacheUpdateLayer), sm89",
             "", f"`python benchmarks/kv_update_probe.py` on {platform.machine()}, no GPU (ahead-of-time builds).", "",
             "| cache | outcome | TensorRT |", "|---|---|---|"]
    lines += [f"| {label} | {outcome} | {words.replace('|', '/')} |" for label, outcome, words in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kv_update_probe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
