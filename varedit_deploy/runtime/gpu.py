"""The thin layer that touches the GPU: CUDA calls through cuda-python, device arrays, streams,
page-locked staging memory, events, captured CUDA graphs, each with an explicit release.

Nothing here runs on a machine without a GPU; everything that can be decided without one
(profiles, shapes, buffer offsets) lives in plain-data modules that CPU tests check. Every
CUDA call goes through `cudart()`, the one place a CPU test substitutes a fake runtime.

Host transfers never wait: a copy to or from pageable memory may synchronise the stream (CUDA's
"API synchronization behavior"), so every transfer goes through page-locked staging memory that
stays untouched until the stream has been synchronised; `Stream.read_back` is the one wait.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import VareditError, require

STAGING_ALIGNMENT = 256  # each staged transfer starts on its own 256-byte boundary, as cudaMalloc's do
MIN_STAGING_BLOCK = 1 << 20


def cudart():
    return require("cuda.bindings.runtime", "trt", package="cuda-python")


def _error_name(err) -> str:
    name = cudart().cudaGetErrorName(err)[1]
    return name.decode() if isinstance(name, bytes) else str(name)


def check(result):
    """cuda-python returns (error, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise VareditError(f"CUDA error {_error_name(err)}")
    return values[0] if len(values) == 1 else tuple(values)


# ------------------------------------------------------------------------------------------ probes
@dataclass(frozen=True)
class GpuProbe:
    """One way of asking whether a CUDA GPU is here; `sees_gpu` is None where the tool is not installed."""

    name: str
    sees_gpu: bool | None
    detail: str


def probe_cuda_python() -> GpuProbe:
    """cudaGetDeviceCount through cuda-python (what the TensorRT backend and the plugin use)."""
    try:
        rt = cudart()
    except VareditError:
        return GpuProbe("cuda-python", None, "not installed")
    try:
        err, count = rt.cudaGetDeviceCount()
    except Exception as e:  # noqa: BLE001 - a driver library that cannot be loaded raises, not returns
        return GpuProbe("cuda-python", False, f"cudaGetDeviceCount raised {type(e).__name__}: {e}")
    if int(err) != 0:
        return GpuProbe("cuda-python", False, f"cudaGetDeviceCount failed: {_error_name(err)}")
    return GpuProbe("cuda-python", count > 0, f"{count} device(s)")


def probe_torch() -> GpuProbe:
    """torch.cuda.is_available() (what the torch fast path and Triton use); torch is imported only here."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return GpuProbe("torch", None, "not installed")
    import torch

    build = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU build)'}"
    if not torch.cuda.is_available():
        return GpuProbe("torch", False, f"torch.cuda.is_available() is False ({build})")
    return GpuProbe("torch", True, f"{torch.cuda.device_count()} device(s) ({build})")


def probe_nvidia_smi() -> GpuProbe:
    """`nvidia-smi -L` (the driver's own view, independent of any Python package)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return GpuProbe("nvidia-smi", None, "not installed")
    try:
        done = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return GpuProbe("nvidia-smi", False, f"nvidia-smi -L failed: {e}")
    gpus = [line for line in done.stdout.splitlines() if line.startswith("GPU ")]
    if done.returncode != 0 or not gpus:
        said = (done.stderr or done.stdout).strip().splitlines()
        return GpuProbe("nvidia-smi", False, f"nvidia-smi -L: exit {done.returncode}, {said[0] if said else 'no GPU'}")
    return GpuProbe("nvidia-smi", True, "; ".join(gpus))


def gpu_probes(torch: bool = True, nvidia_smi: bool = True) -> list[GpuProbe]:
    """Every probe asked for: cuda-python always, torch and nvidia-smi where wanted."""
    return [probe_cuda_python(), *([probe_torch()] if torch else []), *([probe_nvidia_smi()] if nvidia_smi else [])]


def gpu_verdict(probes: Sequence[GpuProbe], expect_gpu: bool = False) -> bool:
    """Whether a GPU is here, from probes that must agree: a probe that fails where another sees a
    GPU (a driver the bindings cannot load, a CPU build of torch) would silently turn GPU checks into
    skips, so it is an error naming every probe; with `expect_gpu`, so is finding none."""
    ran = [p for p in probes if p.sees_gpu is not None]
    seen = {p.sees_gpu for p in ran}
    said = "; ".join(f"{p.name}: {p.detail}" for p in probes)
    if len(seen) > 1:
        raise VareditError(f"the GPU probes disagree ({said}); fix the installation the failing probe names "
                           "(a GPU check that quietly skips would look green)")
    found = seen == {True}
    if expect_gpu and not found:
        raise VareditError(f"a CUDA GPU was expected (VAREDIT_EXPECT_GPU=1) and none was found ({said})")
    return found


def expect_gpu_from_env() -> bool:
    """VAREDIT_EXPECT_GPU=1: a run that must not fall back to the CPU (benchmarks/gpu_check.sh sets it)."""
    return os.environ.get("VAREDIT_EXPECT_GPU", "") == "1"


def gpu_available() -> bool:
    """Whether cuda-python sees a CUDA GPU (what the TensorRT backend needs; tests also ask torch:
    `gpu_probes`, `gpu_verdict`)."""
    return bool(probe_cuda_python().sees_gpu)


def current_compute_capability() -> str:
    """'sm89' etc. of device 0; a clear error where there is no GPU."""
    probe = probe_cuda_python()
    if not probe.sees_gpu:
        raise VareditError(f"no CUDA GPU is visible here ({probe.name}: {probe.detail}); TensorRT needs one to build "
                           "and run engines (TensorRT-RTX can build ahead of time without one: --flavour tensorrt-rtx)")
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


class PinnedStaging:
    """Page-locked host memory that every transfer goes through, handed out in 256-byte aligned
    regions. A region stays untouched until `reset`, which the stream calls only after a
    synchronisation, so a queued copy never reads or writes memory that was reused meanwhile.
    Blocks are kept (and reused by the next edit) until `free`: freeing page-locked memory may
    itself wait for the device."""

    def __init__(self):
        self.blocks: list[tuple[int, int]] = []  # (host pointer, bytes)
        self._block = 0  # the block regions are taken from
        self._used = 0  # bytes taken from it

    def take(self, nbytes: int) -> int:
        """A host pointer to `nbytes` of page-locked memory no queued transfer uses."""
        size = -(-max(nbytes, 1) // STAGING_ALIGNMENT) * STAGING_ALIGNMENT
        while self._block < len(self.blocks) and self._used + size > self.blocks[self._block][1]:
            self._block, self._used = self._block + 1, 0
        if self._block == len(self.blocks):  # grow: at least double what is held, so an edit settles on few blocks
            held = sum(n for _, n in self.blocks)
            block = max(size, held, MIN_STAGING_BLOCK)
            self.blocks.append((int(check(cudart().cudaMallocHost(block))), block))
        ptr = self.blocks[self._block][0] + self._used
        self._used += size
        return ptr

    def reset(self) -> None:
        """Every region is free again (the stream has been synchronised)."""
        self._block = self._used = 0

    def free(self) -> None:
        """Release every block (after the stream has been synchronised); later calls do nothing."""
        blocks, self.blocks = self.blocks, []
        self.reset()
        for ptr, _ in blocks:
            check(cudart().cudaFreeHost(ptr))


class Event:
    """A CUDA event recorded on a stream: a point in its work, for timing without a wait."""

    def __init__(self, stream: "Stream"):
        rt = cudart()
        self.handle = check(rt.cudaEventCreate())
        check(rt.cudaEventRecord(self.handle, stream.handle))

    def seconds_since(self, start: "Event") -> float:
        """Seconds from `start` to this event; valid once the stream has been synchronised after both."""
        return float(check(cudart().cudaEventElapsedTime(start.handle, self.handle))) / 1e3

    def destroy(self) -> None:
        """Release the event (CUDA frees it once its work completes); later calls do nothing."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(cudart().cudaEventDestroy(handle))

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:  # interpreter shutdown, or a context already gone
            pass


class Stream:
    """A CUDA stream whose host transfers never wait: uploads and read-backs go through page-locked
    staging memory, and `read_back` (or `synchronize`) is the one point where the host waits."""

    def __init__(self):
        self.handle = check(cudart().cudaStreamCreate())
        self.staging = PinnedStaging()

    @property
    def ptr(self) -> int:
        """The stream as the integer handle TensorRT's Python API takes."""
        return int(self.handle)

    def synchronize(self) -> None:
        """Wait for every queued piece of work; the staging memory is free again afterwards."""
        check(cudart().cudaStreamSynchronize(self.handle))
        self.staging.reset()

    def copy_to_device(self, dst: DeviceArray, src: np.ndarray) -> None:
        """Queue a copy of `src` into `dst` and return at once; `src` may be reused or dropped
        immediately (it is copied into staging memory that stays put until the next synchronisation)."""
        src = np.ascontiguousarray(src, dst.dtype)
        if src.shape != dst.shape:
            raise ValueError(f"copy of {src.shape} into {dst.shape}")
        host = self.staging.take(src.nbytes)
        ctypes.memmove(host, src.ctypes.data, src.nbytes)
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst.ptr, host, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle))

    def read_back(self, buffers: Sequence[DeviceArray]) -> list[np.ndarray]:
        """Host copies of `buffers` after all queued work: the copies are queued into staging memory,
        then the one synchronisation, then they are copied out."""
        rt = cudart()
        staged = []
        for src in buffers:
            host = self.staging.take(src.nbytes)
            check(rt.cudaMemcpyAsync(host, src.ptr, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                     self.handle))
            staged.append((host, src))
        check(rt.cudaStreamSynchronize(self.handle))
        out = []
        for host, src in staged:
            array = np.empty(src.shape, src.dtype)
            ctypes.memmove(array.ctypes.data, host, src.nbytes)
            out.append(array)
        self.staging.reset()
        return out

    def record(self) -> Event:
        """An event at this point of the stream's work."""
        return Event(self)

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
        """Wait for the stream's work, then release its staging memory and the stream; later calls do nothing."""
        if self.handle is not None:
            self.synchronize()
            self.staging.free()
            handle, self.handle = self.handle, None
            check(cudart().cudaStreamDestroy(handle))
