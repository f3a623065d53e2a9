"""Choose and import TensorRT or TensorRT-RTX in one place (their Python APIs are nearly the same).

`tensorrt` needs a GPU to build or run and cannot be installed from PyPI here (NVIDIA's index,
JetPack or a container provide it); `tensorrt_rtx` installs from PyPI and builds engines ahead
of time on a CPU-only machine for SM75-SM121.
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


def strongly_typed_network(trt: ModuleType, builder):
    """TensorRT 11 and TensorRT-RTX keep only strongly typed networks; TensorRT 10.x has them too."""
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


def make_logger(trt: ModuleType, gpu_less: bool):
    """A logger that prints warnings and errors, except the CUDA-driver errors TensorRT-RTX logs
    (harmlessly) when it builds ahead of time on a machine without a GPU."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.suppressed = 0

        def log(self, severity, msg):
            if severity > trt.ILogger.Severity.WARNING:
                return
            if gpu_less and ("cudaError 35" in msg or "CUDA driver" in msg):
                self.suppressed += 1
                return
            if "has Int64 binding" in msg:  # bits and token ids are int64 by design; the runtime binds int64
                return
            print(f"[{'E' if severity <= trt.ILogger.Severity.ERROR else 'W'}] {msg}")

    return Logger()
