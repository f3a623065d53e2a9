"""Which engine precisions each TensorRT flavour can build for each GPU, in one table.

From the vendors' support matrices (TensorRT, TensorRT-RTX, ModelOpt): FP8 tensor cores from
Ada (sm89) and Hopper (sm90) on, not on Ampere or Jetson Orin (sm86, sm87); INT8 W8A8 on
TensorRT from Turing on (Orin included), never on TensorRT-RTX (it lists INT8 and INT4
weight-only GEMMs, not INT8 activations); INT4 weight-only from Ampere on; BF16 from Ampere on.
"""

from __future__ import annotations

from ..errors import VareditError
from ..precisions import describe_precision

# precision -> (flavour -> predicate on the SM number)
_SUPPORT = {
    "fp32": {"tensorrt": lambda sm: True, "tensorrt-rtx": lambda sm: True},
    "fp16": {"tensorrt": lambda sm: True, "tensorrt-rtx": lambda sm: True},
    "bf16": {"tensorrt": lambda sm: sm >= 80, "tensorrt-rtx": lambda sm: sm >= 80},
    "int8": {"tensorrt": lambda sm: sm >= 72, "tensorrt-rtx": lambda sm: False},
    "fp8": {"tensorrt": lambda sm: sm in (89, 90) or sm >= 100, "tensorrt-rtx": lambda sm: sm in (89, 120, 121)},
    "int4": {"tensorrt": lambda sm: sm >= 80, "tensorrt-rtx": lambda sm: sm >= 80},
}


# TensorRT releases in the field, by what ships them (NVIDIA's JetPack release notes and TensorRT's
# support matrix): `build` names them in its refusals; docs/jetson.md has the same table.
TENSORRT_IN_THE_FIELD = {
    (10, 3): "JetPack 6",
    (10, 13): "JetPack 7.0 and 7.1",
    (10, 16): "JetPack 7.2",
}
TENSORRT_11_NOTE = "strongly typed networks only, no IPluginV2 (our plugin is IPluginV3)"


def shipped_with(version: str) -> str | None:
    """Which release ships TensorRT `version` ('10.13.3.9' -> 'JetPack 7.0 and 7.1'); None for others."""
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    if major_minor[0] >= 11:
        return f"TensorRT {major_minor[0]}: {TENSORRT_11_NOTE}"
    return TENSORRT_IN_THE_FIELD.get(major_minor)


def sm_number(target: str) -> int:
    """'sm89' -> 89."""
    return int(target.removeprefix("sm"))


def supported(flavour: str, target: str) -> list[str]:
    """Precisions `flavour` builds for the GPU `target` ('sm89')."""
    sm = sm_number(target)
    return [p for p, by in _SUPPORT.items() if by[flavour](sm)]


def check_supported(flavour: str, target: str, precision: str) -> None:
    """Raise a VareditError naming what the target can build when `precision` is not among it."""
    can = supported(flavour, target)
    if precision not in can:
        listed = ", ".join(describe_precision(p) for p in can)
        hint = ""
        if precision == "int8" and flavour == "tensorrt-rtx":
            hint = ("; TensorRT-RTX has no INT8 activation GEMMs: quantise with --mode fp8 or int4, or build the "
                    "int8 artifact with --flavour tensorrt on the GPU")
        elif precision == "fp8":
            hint = "; FP8 needs Ada (sm89), Hopper (sm90) or Blackwell"
        raise VareditError(f"{flavour} cannot build {describe_precision(precision)} engines for {target}: "
                           f"it supports {listed} there{hint}")
