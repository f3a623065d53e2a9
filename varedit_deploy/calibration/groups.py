"""Layer groups of a transformer graph: the weight matrix products of one block and one kind.

Groups are found in the graph we are given, not assumed: a node's module comes from the parameter
our exporter records on each node that reads one (`varedit.parameter` metadata,
`blocks.1.ffn.fc2.weight` -> `blocks.1.ffn.fc2`), else from the dynamo exporter's
`pkg.torch.onnx.name_scopes` metadata, else from the TorchScript exporter's node name
(`/blocks.1/ffn/fc2/MatMul` -> `blocks.1.ffn.fc2`), and a MatMul/Gemm counts only when its second
input is a weight (an initializer or constant, possibly transposed or cast). Kinds: `qkv`
(self-attention input projection), `proj` (its output), `ca` (cross-attention query and output),
`ca_kv` (the text's K/V projection of each block, run once per edit in `text_cond`: an eighth of
the transformer's weights), `fc1`, `fc2`. Everything else (embeddings, conditioning, the head,
attention score products, SAR pooling) belongs to no group and always stays in high precision.

Importing this module needs nothing beyond the standard library and graph_io (the memory plan uses it).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from ..graph_io import PARAMETER_KEY

KINDS = ("qkv", "proj", "ca", "ca_kv", "fc1", "fc2")
_KIND_SCOPES = (  # (kind, module scope pattern); block index is group 1
    ("fc1", r"blocks\.(\d+)\.ffn\.fc1"),
    ("fc2", r"blocks\.(\d+)\.ffn\.fc2"),
    ("ca_kv", r"blocks\.(\d+)\.ca\.mat_kv"),
    ("ca", r"blocks\.(\d+)\.ca(?:\..+)?"),
    ("proj", r"blocks\.(\d+)(?:\.sa)?\.proj"),
    ("qkv", r"blocks\.(\d+)(?:\.sa)?(?:\.mat_qkv)?"),
)
WEIGHT_OPS = ("MatMul", "Gemm")
_PASS_THROUGH = ("Transpose", "Cast", "Reshape", "Identity")
# Published W8A8/FP8 recipes keep the first and last blocks in high precision. On a model of a
# few blocks that would leave one block or none quantised, so it applies from this depth on.
FIRST_LAST_MIN_DEPTH = 8


@dataclass(frozen=True)
class LayerGroup:
    block: int
    kind: str
    nodes: dict[str, tuple[str, ...]]  # graph -> names of its weight MatMul/Gemm nodes in this group

    @property
    def name(self) -> str:
        return f"blocks.{self.block}.{self.kind}"

    def __hash__(self) -> int:
        return hash(self.name)


def node_scope(node) -> str:
    """The dotted module path of the weight a node reads, or that it was traced in ('' at the top level)."""
    for prop in node.metadata_props:
        if prop.key == PARAMETER_KEY:
            return prop.value.rpartition(".")[0]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value)[:-1] if s]  # the last entry names the op
            return scopes[-1] if scopes else ""
    parts = [p for p in node.name.split("/") if p]
    return ".".join(parts[:-1])


def group_of(scope: str) -> tuple[int, str] | None:
    """(block, kind) of a weight product traced in module `scope`, or None outside every group."""
    for kind, pattern in _KIND_SCOPES:
        m = re.fullmatch(pattern, scope)
        if m:
            return int(m.group(1)), kind
    return None


def weight_nodes(model) -> list:
    """MatMul/Gemm nodes whose second input is a weight (not an activation)."""
    constants = {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def is_weight(name: str) -> bool:
        while name not in constants:
            node = producers.get(name)
            if node is None:
                return False
            if node.op_type == "Constant":
                return True
            if node.op_type not in _PASS_THROUGH:
                return False
            name = node.input[0]
        return True

    return [n for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and is_weight(n.input[1])]


def find_groups(models: dict) -> list[LayerGroup]:
    """Every layer group across `models` (graph name -> ModelProto), ordered by block then kind."""
    found: dict[tuple[int, str], dict[str, list[str]]] = {}
    for graph, model in models.items():
        for node in weight_nodes(model):
            key = group_of(node_scope(node))
            if key is not None:
                found.setdefault(key, {}).setdefault(graph, []).append(node.name)
    order = sorted(found, key=lambda k: (k[0], KINDS.index(k[1])))
    return [LayerGroup(b, k, {g: tuple(n) for g, n in found[(b, k)].items()}) for b, k in order]


def default_exclusions(mode: str, depth: int) -> list[str]:
    """Group-name patterns kept in high precision by default: the first and last blocks for modes
    that quantise activations (int8, fp8) on models deep enough; none for weight-only int4."""
    if mode == "int4" or depth < FIRST_LAST_MIN_DEPTH:
        return []
    return [r"blocks\.0\..*", rf"blocks\.{depth - 1}\..*"]


def excluded(groups: list[LayerGroup], patterns: list[str]) -> list[LayerGroup]:
    """The groups whose name fully matches one of `patterns` (regular expressions)."""
    compiled = [re.compile(p) for p in patterns]
    return [g for g in groups if any(p.fullmatch(g.name) for p in compiled)]


def blocks_quantised_by_default(mode: str, depth: int) -> list[int]:
    """Blocks whose groups the default recipe quantises (before the sensitivity search)."""
    patterns = [re.compile(p) for p in default_exclusions(mode, depth)]
    return [b for b in range(depth) if not any(p.fullmatch(f"blocks.{b}.qkv") for p in patterns)]
