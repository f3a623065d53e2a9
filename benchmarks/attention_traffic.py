"""Bytes one `step` moves to get its past into attention, read from the exported graphs themselves.

    python benchmarks/attention_traffic.py [--model 8b-1024] [--scale -1]

Traces the `step` graph of `--model` in both attention forms (`fused`: ONNX `Attention` over the
cache as it lies; `decomposed`: the opset-17 MatMul-Softmax-MatMul form), with the model's width,
heads and schedule but two blocks (block 0 with the SAR and a block like every later one; the
trace holds no weights). ONNX shape inference then gives every tensor's shape at the asked
scale, and for each block the script sums what the nodes between the cache inputs (`past_*`,
`sar_*`) and the attention read and write: data-moving nodes (Transpose, Concat, ...) in
full, views (Reshape, Shape, ...) as free, and the attention's own read of K and V. The step's
total is block 0 plus (depth - 1) times block 1. Float32 graphs; a 16-bit engine moves half.
Writes benchmarks/results/attention_traffic-<model>.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather", "Slice", "Constant"}
ATTENTION_READERS = {"Attention", "MatMul"}


def trace_step(config, form: str):
    """The weightless `step` graph of a two-block `config` in attention `form`, shapes unset."""
    from varedit_deploy.export.graphs import graph_specs
    from varedit_deploy.export.weightless import trace
    from varedit_deploy.model.loaded import VAREditModel

    two = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, depth=2, block_chunks=1))
    model = VAREditModel.skeleton(two)
    spec = next(s for s in graph_specs(model, None, form) if s.name == "step")
    return trace(spec).model


def with_shapes(model, shapes: dict[str, tuple[int, ...]]):
    """`model` with its inputs and outputs fixed to `shapes`, shape-inferred."""
    import onnx

    for value in [*model.graph.input, *model.graph.output]:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for d, n in zip(dims, shapes[value.name]):
                d.Clear()
                d.dim_value = n
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def block_traffic(model, block: int) -> dict[str, int]:
    """Bytes read + written by the nodes on the path from block `block`'s cache inputs to its attention."""
    graph = model.graph
    sizes = {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            sizes[v.name] = int(np.prod([d.dim_value for d in t.shape.dim], dtype=np.int64)) * 4
    sources = {f"past_k_{block}", f"past_v_{block}"} | ({"sar_k", "sar_v"} if block == 0 else set())
    reached, out = set(sources), {"layout": 0, "attention_kv_read": 0}
    for node in graph.node:  # topological order; sizes inference left open follow from the inputs
        for o in node.output:
            if o not in sizes and node.input and node.input[0] in sizes:
                sizes[o] = sum(sizes[i] for i in node.input) if node.op_type == "Concat" else sizes[node.input[0]]
        fed = [i for i in node.input if i in reached]
        if not fed:
            continue
        if node.op_type == "Shape":  # metadata only (the RoPE offset): nothing of the past flows on
            continue
        if node.op_type in ATTENTION_READERS:
            out["attention_kv_read"] += sum(sizes[i] for i in fed)
            continue  # the attention consumes it: the path ends here
        reached.update(node.output)
        if node.op_type not in VIEWS:
            out["layout"] += sum(sizes.get(i, 0) for i in node.input if i) + sum(sizes[o] for o in node.output)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="8b-1024")
    ap.add_argument("--scale", type=int, default=-1, help="the scale to measure (default: the last, largest)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from varedit_deploy.config import from_name

    config = from_name(args.model)
    t, sched = config.transformer, config.schedule
    s = range(sched.num_scales)[args.scale]
    n, start, lt = sched.tokens[s], sched.starts[s], 77
    row = (2, t.heads, t.head_dim)
    shapes = {"x": (2, n, t.dim), "text_k": (2, 2, t.heads, lt, t.head_dim), "text_v": (2, 2, t.heads, lt, t.head_dim),
              "sar_k": (n, *row), "sar_v": (n, *row), "past_k_0": (start, *row), "past_v_0": (start, *row),
              "past_k_1": (sched.source_tokens + start, *row), "past_v_1": (sched.source_tokens + start, *row),
              "logits": (2, n, t.num_logits), **{f"new_{kv}_{i}": (n, *row) for kv in "kv" for i in (0, 1)}}
    results = {}
    for form in ("decomposed", "fused"):
        print(f"tracing the {form} step of {args.model} (2 blocks) ...", flush=True)
        model = with_shapes(trace_step(config, form), shapes)
        first, later = block_traffic(model, 0), block_traffic(model, 1)
        total = {k: first[k] + (t.depth - 1) * later[k] for k in first}
        results[form] = {"block_0": first, "block_1": later, "step": total}
    past_bytes = sum(int(np.prod(shapes[f"past_{kv}_{i}"])) * 4 for kv in "kv" for i in (0, 1))
    gb = 1e9
    lines = [f"`python benchmarks/attention_traffic.py --model {args.model}`: scale {s} ({n} tokens, "
             f"past {sched.source_tokens + start} rows in blocks >= 1), {t.depth} blocks, float32 graphs "
             "(16-bit engines: half)", "",
             "| attention form | layout traffic per step (GB) | K/V read by attention (GB) | total (GB) | layout ops on the past |",
             "|---|---:|---:|---:|---|"]
    for form, r in results.items():
        step = r["step"]
        lines.append(f"| {form} | {step['layout'] / gb:.3f} | {step['attention_kv_read'] / gb:.3f} | "
                     f"{(step['layout'] + step['attention_kv_read']) / gb:.3f} | "
                     f"{'Concat of past + new rows' if form == 'fused' else 'Transpose of the whole past, Concat'} |")
    lines += ["", f"(The past K and V of blocks 0 and 1 alone hold {past_bytes / gb:.3f} GB at this scale.)"]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"attention_traffic-{args.model}.md").write_text(text + "\n")
    (args.out / f"attention_traffic-{args.model}.json").write_text(json.dumps(
        {"model": args.model, "scale": s, "tokens": n, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
