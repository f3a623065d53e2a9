"""The opset a graph declares, and raising it where a node we add needs a newer one.

Torch-free: quantisation and the KV-cache rewrite use it on graphs read back from artifacts.
"""

from __future__ import annotations

from ..errors import VareditError


def graph_opset(model) -> int:
    """The default-domain opset a ModelProto declares."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def raise_opset(model, opset: int, name: str) -> None:
    """Convert `model` in place to `opset` where it declares less (ONNX's version converter; weights that
    are stubs stay stubs), e.g. for DequantizeLinear with 16-bit scales (19) or int4 blocks (21)."""
    import onnx

    current = graph_opset(model)
    if current >= opset:
        return
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except Exception as e:
        raise VareditError(f"graph {name}: ONNX cannot convert it from opset {current} to {opset} ({e})") from None
    model.CopyFrom(converted)
