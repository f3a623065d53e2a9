"""Launch ahead-of-time compiled Triton kernels (`aot.KernelBinary`) through the CUDA driver.

The TensorRT plugin's runtime half has neither Triton nor torch: it loads a cubin with
cuModuleLoadData and launches it with cuLaunchKernel on the stream TensorRT passes. What needs
no device (which cubin suits an SM, the grid, the packed arguments) is plain data here, so CPU
tests check it; every driver call's CUresult is checked and a failure names the call and error.
A set of cubins is loaded once per CUDA context for the whole process (`shared_kernels`): TensorRT
clones the plugin for every execution context, and the backend makes one per captured call.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import math
from dataclasses import dataclass
from typing import Any

from ..errors import VareditError, require
from .aot import KernelBinary
from .plan import plan_attention

# Triton's scalar parameter types -> ctypes; pointers ("*fp16") are c_void_p.
_SCALARS = {"i1": ctypes.c_int8, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32,
            "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64, "fp32": ctypes.c_float,
            "fp64": ctypes.c_double}
POINTER_ALIGNMENT = 16  # the compiler assumed every pointer 16-byte aligned (`aot.specialise`)
TRITON_SCRATCH_POINTERS = 2  # Triton (3.3 on) appends global and profile scratch pointers to every kernel
LEGACY_SHARED_LIMIT = 48 * 1024  # beyond it a kernel must opt in to more dynamic shared memory


def binary_to_json(block_m: int, b: KernelBinary) -> dict[str, Any]:
    return {"block_m": block_m, "arch": b.arch, "entry": b.entry, "params": list(b.params), "num_warps": b.num_warps,
            "shared_bytes": b.shared_bytes, "cubin": base64.b64encode(b.cubin).decode()}


def binary_from_json(d: dict[str, Any]) -> tuple[int, KernelBinary]:
    return d["block_m"], KernelBinary(d["arch"], d["entry"], tuple(d["params"]), d["num_warps"], d["shared_bytes"],
                                      base64.b64decode(d["cubin"]))


def usable_arch(compiled: set[int], device: int) -> int | None:
    """The compiled SM whose cubins run on SM `device`: the same one, else the newest older one of
    the same major (cubins run on later minors of their major) up to sm8x; Triton compiles sm90
    on for the architecture-specific 'a' targets, which run only on that SM."""
    if device in compiled:
        return device
    older = [a for a in compiled if a // 10 == device // 10 and a < device and a < 90]
    return max(older, default=None)


def select_binaries(binaries: dict[tuple[int, int], KernelBinary], device: int) -> dict[int, KernelBinary]:
    """{block_m: binary} for an SM `device` from {(arch, block_m): binary}; a clear error when none runs there."""
    arch = usable_arch({a for a, _ in binaries}, device)
    if arch is None:
        have = ", ".join(f"sm{a}" for a in sorted({a for a, _ in binaries})) or "none"
        raise VareditError(f"the attention plugin in this engine carries kernels for {have}, not for this GPU "
                           f"(sm{device}); rebuild the engines for sm{device}")
    return {m: b for (a, m), b in binaries.items() if a == arch}


@dataclass(frozen=True)
class Launch:
    block_m: int  # which of the plugin's binaries
    binary: KernelBinary
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    params: tuple[tuple[Any, ...], tuple[Any, ...]]  # (values, ctypes types): cuLaunchKernel's kernelParams


def pack_params(binary: KernelBinary, values: tuple) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """kernelParams for `binary`: its runtime parameters, then Triton's scratch pointers (null)."""
    if len(values) != len(binary.params):
        raise VareditError(f"{binary.entry} takes {len(binary.params)} parameters ({', '.join(binary.params)}), "
                           f"got {len(values)}")
    types = []
    for kind, value in zip(binary.params, values):
        if kind.startswith("*"):
            if int(value) % POINTER_ALIGNMENT:
                raise VareditError(f"{binary.entry}: pointer {int(value):#x} is not {POINTER_ALIGNMENT}-byte aligned, "
                                   "which the compiled kernel assumes")
            types.append(ctypes.c_void_p)
        else:
            types.append(_SCALARS[kind])
    return (*values, *[0] * TRITON_SCRATCH_POINTERS), (*types, *[ctypes.c_void_p] * TRITON_SCRATCH_POINTERS)


def flat_attention_launch(binaries: dict[int, KernelBinary], q: int, k: int, v: int, out: int, n: int, keys: int,
                          heads: int, scale: float, sm_count: int) -> Launch:
    """The launch `plugins.attention.flat_attention_launch` makes, from device pointers and sizes."""
    plan = plan_attention(n, keys, heads, sm_count)
    binary = binaries[plan.block_m]
    return Launch(plan.block_m, binary, (math.ceil(n / plan.block_m), heads, 1), (32 * binary.num_warps, 1, 1),
                  pack_params(binary, (q, k, v, out, n, keys, scale)))


def driver():
    return require("cuda.bindings.driver", "trt", package="cuda-python")


def check(result, call: str):
    """cuda-python returns (CUresult, *values): raise naming `call` and the error, else the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    cu = driver()
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise VareditError(f"CUDA driver call {call} failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else tuple(values)


def current_device() -> tuple[int, int]:
    """(SM number, SM count) of the current context's device."""
    cu = driver()
    device = check(cu.cuCtxGetDevice(), "cuCtxGetDevice")
    attr = cu.CUdevice_attribute
    major = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device),
                  "cuDeviceGetAttribute")
    minor = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device),
                  "cuDeviceGetAttribute")
    count = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device),
                  "cuDeviceGetAttribute")
    return 10 * major + minor, count


class LoadedKernels:
    """The cubins of one plugin ({block_m: binary}) loaded into the current CUDA context."""

    def __init__(self, binaries: dict[int, KernelBinary]):
        cu = driver()
        self.modules, self.functions = [], {}
        for block_m, binary in binaries.items():
            module = check(cu.cuModuleLoadData(binary.cubin), "cuModuleLoadData")
            self.modules.append(module)
            function = check(cu.cuModuleGetFunction(module, binary.entry.encode()),
                             f"cuModuleGetFunction({binary.entry})")
            if binary.shared_bytes > LEGACY_SHARED_LIMIT:
                attribute = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                check(cu.cuFuncSetAttribute(function, attribute, binary.shared_bytes), "cuFuncSetAttribute")
            self.functions[block_m] = function

    def launch(self, launch: Launch, stream: int) -> None:
        cu = driver()
        check(cu.cuLaunchKernel(self.functions[launch.block_m], *launch.grid, *launch.block,
                                launch.binary.shared_bytes, cu.CUstream(stream), launch.params, 0), "cuLaunchKernel")


# (CUDA context, digest of the binaries) -> their modules, loaded once for the process: modules belong
# to a context, and every plugin clone in that context launches the same functions.
_LOADED: dict[tuple[int, bytes], LoadedKernels] = {}


def shared_kernels(binaries: dict[int, KernelBinary]) -> LoadedKernels:
    """`binaries` loaded into the current CUDA context, by the first caller in that context; every
    later caller with the same cubins gets the same modules (kept until the process ends)."""
    context = int(check(driver().cuCtxGetCurrent(), "cuCtxGetCurrent"))
    digest = hashlib.sha256()
    for block_m in sorted(binaries):
        binary = binaries[block_m]
        digest.update(f"{block_m}:{binary.entry}:{binary.shared_bytes}:{len(binary.cubin)}:".encode())
        digest.update(binary.cubin)
    key = (context, digest.digest())
    if key not in _LOADED:
        _LOADED[key] = LoadedKernels(binaries)
    return _LOADED[key]
