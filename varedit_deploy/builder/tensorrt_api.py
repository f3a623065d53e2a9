"""What the builder needs of TensorRT's Python API beyond the import (runtime/tensorrt_import.py):
strongly typed networks, a logger, and the loader path the ONNX parser needs for plugins."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from types import ModuleType

from ..errors import VareditError

UNVERSIONED_RTX_LIBRARY = "libtensorrt_rtx.so"


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


def parser_plugin_library_dir(trt: ModuleType) -> Path | None:
    """A folder the dynamic loader must search so that TensorRT-RTX's ONNX parser can reach plugin
    creators, or None when it needs none.

    The parser dlopens `libtensorrt_rtx.so` (found in its own folder, then on LD_LIBRARY_PATH) for
    the plugin registry, and the wheel ships only `libtensorrt_rtx.so.1`: without it, parsing a graph
    with plugin nodes aborts the process. The folder returned holds that name as a link to the
    loaded library (the loader then maps the same file, so there is one registry); LD_LIBRARY_PATH
    is read when a process starts, so only a new process can use it (`build_engines` starts one)."""
    if trt.__name__ != "tensorrt_rtx":
        return None
    import tensorrt_rtx_libs

    libs = Path(tensorrt_rtx_libs.__file__).parent
    if (libs / UNVERSIONED_RTX_LIBRARY).exists():
        return None
    versioned = sorted(libs.glob(UNVERSIONED_RTX_LIBRARY + ".*"))
    if not versioned:
        raise VareditError(f"no {UNVERSIONED_RTX_LIBRARY}.* in {libs}; reinstall tensorrt-rtx")
    # One folder per installed library, not per version: two venvs with the same TensorRT-RTX must not
    # share a link, or a build loads the other venv's copy beside its own (two registries, a corrupt heap).
    target = versioned[0].resolve()
    key = hashlib.sha256(str(target).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"varedit-deploy-{os.getuid()}" / f"tensorrt_rtx-{trt.__version__}-{key}"
    if os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)[0] == str(folder):
        return None  # this process's loader already finds our link first (the child `build_engines` starts)
    # (any other `libtensorrt_rtx.so` on the loader path, an SDK's for one, would be a second copy: not used)
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / UNVERSIONED_RTX_LIBRARY
    if not link.exists() or link.resolve() != target:
        tmp = folder / f".{UNVERSIONED_RTX_LIBRARY}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(link)
    return folder
