"""Buffers in an ONNX Runtime device's memory, so the loop's caches stay where the graphs run.

With ONNX Runtime's CUDA, TensorRT and TensorRT-RTX providers, every buffer of the loop (KV
caches, text K/V, logits, bits, codes) is an allocation ONNX Runtime made on the GPU (an
OrtValue); the graphs read and write them in place through I/O binding, by address, so a step
moves nothing between host and device. Views work as on the host: an axis-0 slice or a reshape
is the same memory at an offset. Host transfers (`write`, `read`) go through an OrtValue that
aliases exactly the bytes of a view (made with DLPack, which ONNX Runtime imports without
copying), so writing a view never touches the bytes around it.

The same code runs on the CPU device (`OrtMemory("cpu")`), which is how the tests check it on
machines without a GPU.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from math import prod

import numpy as np

from ..errors import require

# DLPack (dlpack.h, the "dltensor" capsule): device types and type codes.
_DL_DEVICE = {"cpu": 1, "cuda": 2}
_DL_CODE = {"i": 0, "u": 1, "f": 2, "b": 6}  # numpy kinds; bfloat16 is code 4
_ONNX_BFLOAT16 = 16  # TensorProto.BFLOAT16: what ONNX Runtime's binding calls bfloat16 (numpy has none)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]
_NO_DELETE = _DELETER(lambda _: None)  # the structure belongs to its _Alias, kept alive beside the OrtValue
_CAPSULE_NAME = b"dltensor"
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype, _capsule_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class _Alias:
    """An OrtValue over `nbytes` bytes at `ptr` on a device (uint8, one axis), and the DLPack structure it
    was made from (freed with it)."""

    def __init__(self, ort, device: str, device_id: int, ptr: int, nbytes: int):
        self._shape = (ctypes.c_int64 * 1)(nbytes)
        self._managed = _DLManagedTensor(_DLTensor(ptr, _DLDevice(_DL_DEVICE[device], device_id), 1,
                                                   _DLDataType(_DL_CODE["u"], 8, 1), self._shape, None, 0),
                                         None, _NO_DELETE)
        self.value = ort.OrtValue.from_dlpack(_capsule_new(ctypes.addressof(self._managed), _CAPSULE_NAME, None))


def element_type(dtype: np.dtype):
    """What ONNX Runtime's binding takes as the element type of `dtype` (bfloat16 by its ONNX number)."""
    return _ONNX_BFLOAT16 if dtype.name == "bfloat16" else dtype.type


@dataclass
class OrtArray:
    """A contiguous buffer in an OrtMemory with a shape; axis-0 slices and reshapes are views."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    memory: "OrtMemory"
    owner: object  # the OrtValue that holds the allocation (views keep it alive)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize

    def __getitem__(self, index: slice) -> "OrtArray":
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("device arrays support contiguous axis-0 slices only")
        start, stop, _ = index.indices(self.shape[0])
        row = prod(self.shape[1:]) * self.dtype.itemsize
        return OrtArray(self.ptr + start * row, (max(stop - start, 0), *self.shape[1:]), self.dtype, self.memory,
                        self.owner)

    def reshape(self, *shape) -> "OrtArray":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else tuple(shape)
        if prod(shape) != prod(self.shape):
            raise ValueError(f"cannot view {self.shape} as {shape}")
        return OrtArray(self.ptr, shape, self.dtype, self.memory, self.owner)


class OrtMemory:
    """Allocations on one ONNX Runtime device ("cuda" or "cpu", and its index), and the host
    transfers into and out of them. `memory_info`: the device memory of a plugin provider (from its
    OrtEpDevice), allocated through it and copied with `onnxruntime.copy_tensors`; the built-in
    devices allocate by name and copy with `update_inplace`."""

    def __init__(self, device: str = "cpu", device_id: int = 0, memory_info=None):
        self.ort = require("onnxruntime", "ort")
        self.device, self.device_id, self.memory_info = device, device_id, memory_info
        self.plugin = memory_info is not None

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> OrtArray:
        nbytes = max(prod(shape) * dtype.itemsize, 1)
        new = self.ort.OrtValue.ortvalue_from_shape_and_type
        owner = (new([nbytes], np.uint8, memory_info=self.memory_info) if self.plugin
                 else new([nbytes], np.uint8, self.device, self.device_id))
        return OrtArray(owner.data_ptr(), tuple(shape), dtype, self, owner)

    def _alias(self, array: OrtArray) -> _Alias:
        return _Alias(self.ort, self.device, self.device_id, array.ptr, array.nbytes)

    def write(self, dst: OrtArray, src: np.ndarray) -> None:
        """Copy host `src` (the view's shape, any layout) into the bytes of `dst` and nothing else."""
        data = np.ascontiguousarray(np.asarray(src).astype(dst.dtype, copy=False)).reshape(-1).view(np.uint8)
        if data.size != dst.nbytes:
            raise AssertionError(f"writing {np.shape(src)} into a device view of shape {dst.shape}")
        if data.size == 0:
            return
        alias = self._alias(dst)
        if self.plugin:
            self.ort.copy_tensors([self.ort.OrtValue.ortvalue_from_numpy(data)], [alias.value])
        else:
            alias.value.update_inplace(data)

    def read(self, src: OrtArray) -> np.ndarray:
        """A host copy of the view `src`."""
        if src.nbytes == 0:
            return np.empty(src.shape, src.dtype)
        alias = self._alias(src)
        if self.plugin:
            host = self.ort.OrtValue.ortvalue_from_shape_and_type([src.nbytes], np.uint8, "cpu", 0)
            self.ort.copy_tensors([alias.value], [host])
            data = host.numpy()
        else:
            data = alias.value.numpy()
        return data.view(src.dtype).reshape(src.shape).copy()
