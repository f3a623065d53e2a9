"""The thin layer that touches the GPU: CUDA calls through cuda-python, device arrays, streams,
captured CUDA graphs, each with an explicit release.

Nothing here runs on a machine without a GPU; everything that can be decided without one
(profiles, shapes, buffer offsets) lives in plain-data modules that CPU tests check. Every
CUDA call goes through `cudart()`, the one place a CPU test substitutes a fake runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import VareditError, require


def cudart():
    return require("cuda.bindings.runtime", "trt", package="cuda-python")


def check(result):
    """cuda-python returns (error, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = cudart().cudaGetErrorName(err)[1]
        raise VareditError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_available() -> bool:
    try:
        rt = cudart()
    except VareditError:
        return False
    err, count = rt.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


def current_compute_capability() -> str:
    """'sm89' etc. of device 0; a clear error where there is no GPU."""
    if not gpu_available():
        raise VareditError("no CUDA GPU is visible here (TensorRT needs one to build and run engines; "
                           "TensorRT-RTX can build ahead of time without one: --flavour tensorrt-rtx)")
    rt = cudart()
    major = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 0))
    minor = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, 0))
    return f"sm{major}{minor}"


@dataclass
class DeviceArray:
    """A contiguous device buffer with a shape; axis-0 slices are views (KV cache prefixes/slots)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: "DeviceArray | None" = None  # keeps the allocation alive for views

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype) -> "DeviceArray":
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        return cls(int(check(cudart().cudaMalloc(nbytes))), tuple(shape), dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, index: slice) -> "DeviceArray":
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("device arrays support contiguous axis-0 slices only")
        start, stop, _ = index.indices(self.shape[0])
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        return DeviceArray(self.ptr + start * row, (max(stop - start, 0), *self.shape[1:]), self.dtype,
                           self.owner or self)

    def reshape(self, *shape) -> "DeviceArray":
        """The same bytes with another shape (a view); `reshape(2, 3)` or `reshape((2, 3))` as numpy."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else tuple(shape)
        if int(np.prod(shape)) != int(np.prod(self.shape)):
            raise ValueError(f"cannot view {self.shape} as {shape}")
        return DeviceArray(self.ptr, shape, self.dtype, self.owner or self)

    def free(self) -> None:
        """Release the allocation now (views of it become invalid); later calls do nothing."""
        if self.owner is None and self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart().cudaFree(ptr))

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # interpreter shutdown, or a context already gone
            pass


@dataclass
class CudaGraph:
    """A captured CUDA graph and its executable instance; `destroy` releases both."""

    graph: object
    exec_: object

    def destroy(self) -> None:
        rt = cudart()
        if self.exec_ is not None:
            exec_, self.exec_ = self.exec_, None
            check(rt.cudaGraphExecDestroy(exec_))
        if self.graph is not None:
            graph, self.graph = self.graph, None
            check(rt.cudaGraphDestroy(graph))


class Stream:
    def __init__(self):
        self.handle = check(cudart().cudaStreamCreate())

    @property
    def ptr(self) -> int:
        """The stream as the integer handle TensorRT's Python API takes."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))

    def copy_to_device(self, dst: DeviceArray, src: np.ndarray) -> None:
        src = np.ascontiguousarray(src, dst.dtype)
        if src.shape != dst.shape:
            raise ValueError(f"copy of {src.shape} into {dst.shape}")
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst.ptr, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                 self.handle))
        self.synchronize()  # src may be a temporary

    def copy_to_host(self, src: DeviceArray) -> np.ndarray:
        """Enqueue a copy into a new host array, valid after the next `synchronize` (into pageable
        memory CUDA completes the copy before returning, but the stream order is what we rely on)."""
        out = np.empty(src.shape, src.dtype)
        rt = cudart()
        check(rt.cudaMemcpyAsync(out.ctypes.data, src.ptr, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                 self.handle))
        return out

    def capture(self, enqueue: Callable[[], None]) -> CudaGraph:
        """Record the work `enqueue` puts on this stream as a CUDA graph ready to launch.

        The capture is ended whatever happens: if `enqueue` raises, the capture is invalidated, or
        it recorded nothing, the partial graph is destroyed and the error raised, so no caller can
        keep (and later replay) a half or empty graph.
        """
        rt = cudart()
        check(rt.cudaStreamBeginCapture(self.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            enqueue()
        except BaseException:
            err, graph = rt.cudaStreamEndCapture(self.handle)
            if int(err) == 0 and graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        graph = check(rt.cudaStreamEndCapture(self.handle))  # fails if the capture was invalidated
        captured = CudaGraph(graph, None)
        try:
            _nodes, count = check(rt.cudaGraphGetNodes(graph, 0))
            if count == 0:
                raise VareditError("the CUDA graph capture recorded no work; nothing was enqueued on the stream")
            captured.exec_ = check(rt.cudaGraphInstantiate(graph, 0))
        except BaseException:
            captured.destroy()
            raise
        return captured

    def launch(self, graph: CudaGraph) -> None:
        check(cudart().cudaGraphLaunch(graph.exec_, self.handle))

    def destroy(self) -> None:
        """Wait for the stream's work, then release it; later calls do nothing."""
        if self.handle is not None:
            self.synchronize()
            handle, self.handle = self.handle, None
            check(cudart().cudaStreamDestroy(handle))
