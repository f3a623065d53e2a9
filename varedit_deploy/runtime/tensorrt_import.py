"""Choose and import TensorRT or TensorRT-RTX in one place (their Python APIs are nearly the same).

`tensorrt` needs a GPU to build or run and cannot be installed from PyPI here (NVIDIA's index,
JetPack or a container provide it); `tensorrt_rtx` installs from PyPI and builds engines ahead
of time on a CPU-only machine for SM75-SM121. The runtime and the builder both import it here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import VareditError

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
_INSTALL = {
    "tensorrt": "TensorRT is not installed: on Jetson it comes with JetPack (6.x: TensorRT 10.3); elsewhere "
                "install it from NVIDIA's index (pip install --extra-index-url https://pypi.nvidia.com tensorrt) "
                "or use an NGC container",
    "tensorrt-rtx": 'TensorRT-RTX is not installed: pip install "varedit-deploy[rtx]"',
}


def import_tensorrt(flavour: str) -> ModuleType:
    if flavour not in FLAVOURS:
        raise VareditError(f"unknown TensorRT flavour {flavour!r}; choose one of {sorted(FLAVOURS)}")
    try:
        return importlib.import_module(FLAVOURS[flavour])
    except ImportError:
        raise VareditError(_INSTALL[flavour]) from None


# TensorRT's DataType names -> the element type names buffers are allocated by (runtime/backend.py).
DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
               "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3fn"}


def dtype_name(trt_dtype) -> str:
    """A TensorRT DataType as the element type name the runtime allocates by."""
    return DTYPE_NAMES.get(trt_dtype.name, trt_dtype.name.lower())
