"""What TensorRT's ONNX parser made of a graph, read from the INetworkDefinition at build time.

The engine manifest records, per graph, the layer types as TensorRT names them, how many
attentions became one fused IAttention (TensorRT-RTX 1.7 shows each as an ATTENTION_INPUT and
an ATTENTION_OUTPUT boundary layer), and how many attentions are still spelled out as a
MatMul-Softmax-MatMul chain, so a test can assert "every attention fused, no chain left".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..runtime.tensorrt_import import dtype_name

# Layers that may sit between the two products and the softmax of an attention: the scale and
# mask (elementwise), fp16 <-> fp32 casts, reshapes and transposes.
PASS_THROUGH = frozenset({"CAST", "ELEMENTWISE", "SHUFFLE", "IDENTITY", "SCALE"})
MAX_HOPS = 4  # pass-through layers followed on each side of a softmax


@dataclass(frozen=True)
class Layer:
    kind: str  # the LayerType name, e.g. "MATRIX_MULTIPLY"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def network_layers(network) -> list[Layer]:
    """The network's layers with the names of the tensors each reads and writes."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = (layer.get_input(j) for j in range(layer.num_inputs))
        layers.append(Layer(layer.type.name, tuple(t.name for t in inputs if t is not None),
                            tuple(layer.get_output(j).name for j in range(layer.num_outputs))))
    return layers


def attention_chains(layers: list[Layer]) -> int:
    """Softmax layers fed (through at most MAX_HOPS pass-through layers) by a matrix product and
    feeding one: attentions TensorRT sees as separate layers instead of one fused attention."""
    producer = {t: layer for layer in layers for t in layer.outputs}
    consumers: dict[str, list[Layer]] = {}
    for layer in layers:
        for t in layer.inputs:
            consumers.setdefault(t, []).append(layer)

    def upstream(t: str) -> list[tuple[Layer, tuple[str, ...]]]:
        return [(producer[t], producer[t].inputs)] if t in producer else []

    def downstream(t: str) -> list[tuple[Layer, tuple[str, ...]]]:
        return [(layer, layer.outputs) for layer in consumers.get(t, [])]

    def reaches_product(tensors: tuple[str, ...], neighbours, hops: int) -> bool:
        for t in tensors:
            for layer, onward in neighbours(t):
                if layer.kind == "MATRIX_MULTIPLY":
                    return True
                if layer.kind in PASS_THROUGH and hops > 0 and reaches_product(onward, neighbours, hops - 1):
                    return True
        return False

    return sum(1 for layer in layers if layer.kind == "SOFTMAX" and reaches_product(layer.inputs, upstream, MAX_HOPS)
               and reaches_product(layer.outputs, downstream, MAX_HOPS))


def network_record(network) -> dict[str, Any]:
    """The engine manifest's `network` entry of one graph."""
    layers = network_layers(network)
    counts = Counter(layer.kind for layer in layers)
    return {"layers": dict(sorted(counts.items())), "fused_attentions": counts.get("ATTENTION_OUTPUT", 0),
            "attention_chains": attention_chains(layers)}


def network_io_dtypes(network) -> dict[str, str]:
    """Every network input and output with the element type the engine takes or gives it in (the
    runtime allocates the buffers bound to them so, and checks the engine says the same)."""
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    return {t.name: dtype_name(t.dtype) for t in tensors}


def mark_attentions_decomposable(trt: ModuleType, network) -> int:
    """Let every IAttention fall back to its decomposed form (fp32 has no dedicated fused kernel,
    and the build fails without this); returns how many were marked."""
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer  # get_layer returns the base ILayer binding
            layer.attention.decomposable = True
            marked += 1
    return marked
