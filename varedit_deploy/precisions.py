"""The precision names of graphs, engines and quantised artifacts, written down once.

A graph precision is what `export --precision` stores and what `build` lowers fp32 graphs to; a
quantisation mode is what `quantize --mode` makes, and engines of a quantised artifact are built
in its mode. Everything that accepts or prints a precision reads these tuples.
"""

from __future__ import annotations

GRAPH_PRECISIONS = ("fp32", "fp16", "bf16")
QUANTIZED_MODES = ("int8", "fp8", "int4")
ENGINE_PRECISIONS = GRAPH_PRECISIONS + QUANTIZED_MODES
_DESCRIPTION = {"int8": "int8 (W8A8)", "fp8": "fp8 (E4M3)", "int4": "int4 (weight-only)"}


def describe_precision(precision: str) -> str:
    """'int8 (W8A8)' for the quantisation modes, the name itself otherwise."""
    return _DESCRIPTION.get(precision, precision)


def default_16bit(target: str | None) -> str:
    """The 16-bit precision engines of an fp32 artifact are built in when none is asked for: bf16 where
    the GPU has it (Ampere, sm80, and later, Jetson Orin's sm87 included: fp32's range, so trained
    weights cannot overflow), fp16 before (Turing, sm75), where a range record keeps out-of-range nodes fp32."""
    return "bf16" if target is not None and int(target.removeprefix("sm")) >= 80 else "fp16"
