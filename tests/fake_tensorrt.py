"""A fake TensorRT (runtime, engine, execution context) and a fake cuda-python runtime that fail on
demand, so CPU tests can drive the TensorRT backend: what it binds, enqueues, captures, replays,
transfers, waits for and releases.

They model only what the backend calls, with the conventions of the real bindings (checked
against tensorrt_rtx 1.7.1 and cuda-bindings 13): TensorRT's setters and `execute_async_v3`
return a bool; cuda-python returns `(error, *values)` and error 0 is success. Work is queued on
its stream (`FakeCudart.executed`, in order) or on the capture in progress, and takes effect when
the stream is synchronised, as on a GPU: a copy reads its source then, not when it was queued, so
host memory reused before the wait shows up as wrong data. CUDA's synchronisation rules are kept
("API synchronization behavior"): a transfer between the device and pageable host memory may wait
for the stream, so it counts as a synchronisation and runs at once; one from or to page-locked
memory (cudaMallocHost) is queued. cudaFree and cudaFreeHost are counted as waits too.
"""

from __future__ import annotations

import bisect
import ctypes
import types
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable

STREAM_CAPTURE_INVALIDATED = 901  # cudaErrorStreamCaptureInvalidated
NOT_READY = 600  # cudaErrorNotReady
INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: bindings newer than the driver
ERROR_NAMES = {STREAM_CAPTURE_INVALIDATED: b"cudaErrorStreamCaptureInvalidated", NOT_READY: b"cudaErrorNotReady",
               INSUFFICIENT_DRIVER: b"cudaErrorInsufficientDriver"}


class FakeCudart:
    """The subset of `cuda.bindings.runtime` in use; counts what is made, released and waited for.

    Each fake hands out handles from a range of its own, so an array left over from an earlier
    test, freed by the garbage collector while a later test's fake is installed, cannot release
    one of that fake's handles (it fails inside `__del__`, which swallows it, instead). Device
    memory holds bytes (`device_bytes`), so what was uploaded can be read back.
    """

    instances = 0

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaDeviceAttr:
        cudaDevAttrComputeCapabilityMajor = 75
        cudaDevAttrComputeCapabilityMinor = 76

    def __init__(self, compute_capability: tuple[int, int] = (8, 9), device_count_error: int = 0):
        self.compute_capability = compute_capability
        self.device_count_error = device_count_error  # e.g. 35, cudaErrorInsufficientDriver: a failed probe
        self.made: Counter[str] = Counter()
        self.released: Counter[str] = Counter()
        self.live: dict[str, set[int]] = defaultdict(set)
        self.bytes: dict[int, int] = {}
        self.device_bytes: dict[int, bytearray] = {}  # allocation -> its contents
        self._bases: list[int] = []  # sorted allocation addresses
        self.pinned: dict[int, ctypes.Array] = {}  # page-locked host blocks, by address
        self.capturing: dict[int, list] = {}
        self.graph_work: dict[int, list] = {}
        self.exec_work: dict[int, list] = {}
        self.executed: list[tuple] = []  # work queued on streams, in order
        self.pending: dict[int, list] = defaultdict(list)  # queued per stream, not yet done
        self.completed_events: dict[int, int] = {}  # event -> the order in which it completed
        self.synchronizations = 0  # host waits: stream syncs, pageable transfers, frees
        self.launches = 0
        self.invalidate_capture = False
        FakeCudart.instances += 1
        self._next = FakeCudart.instances << 32

    def _make(self, kind: str, size: int = 0x1000) -> int:
        handle = self._next
        self._next += -(-max(size, 0x1000) // 0x1000) * 0x1000  # 256-byte aligned and apart, like cudaMalloc
        self.made[kind] += 1
        self.live[kind].add(handle)
        return handle

    def _release(self, kind: str, handle: int) -> tuple[int]:
        assert handle in self.live[kind], f"{kind} {handle:#x} released twice or never made"
        self.live[kind].remove(handle)
        self.released[kind] += 1
        return (0,)

    # ---------------------------------------------------------------- the "GPU"
    def enqueue(self, stream: int, work: tuple) -> None:
        if stream in self.capturing:
            self.capturing[stream].append(work)
        else:
            self.executed.append(work)
            self.pending[stream].append(work)

    def _wait(self, stream: int | None = None) -> None:
        """The host waits: queued work (of `stream`, or of every stream) takes effect, in order."""
        self.synchronizations += 1
        for s in [stream] if stream is not None else list(self.pending):
            work, self.pending[s] = self.pending[s], []
            for item in work:
                self._do(item)

    def _do(self, work: tuple) -> None:
        if work[0] == "copy":
            _, dst, src, nbytes, kind = work
            self._copy(dst, src, nbytes, kind)
        elif work[0] == "event":
            self.completed_events[work[1]] = len(self.completed_events)

    def _device(self, ptr: int, nbytes: int) -> tuple[bytearray, int]:
        i = bisect.bisect_right(self._bases, ptr) - 1
        assert i >= 0, f"{ptr:#x} is not device memory"
        base = self._bases[i]
        memory = self.device_bytes[base]
        assert ptr + nbytes <= base + len(memory) and base in self.live["memory"], \
            f"{nbytes} bytes at {ptr:#x} overrun or outlive their allocation"
        return memory, ptr - base

    def _copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            memory, offset = self._device(dst, nbytes)
            memory[offset:offset + nbytes] = ctypes.string_at(src, nbytes)
        else:
            memory, offset = self._device(src, nbytes)
            ctypes.memmove(dst, bytes(memory[offset:offset + nbytes]), nbytes)

    def is_pinned(self, ptr: int, nbytes: int) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + len(block) for base, block in self.pinned.items())

    # ------------------------------------------------------------- the runtime
    def cudaGetDeviceCount(self):
        return (self.device_count_error, None) if self.device_count_error else (0, 1)

    def cudaDeviceGetAttribute(self, attr, device):
        major, minor = self.compute_capability
        return (0, major if attr == self.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor else minor)

    def cudaGetErrorName(self, err):
        return (0, ERROR_NAMES.get(int(err), b"cudaErrorFake"))

    def cudaMalloc(self, nbytes: int):
        ptr = self._make("memory", nbytes)
        self.bytes[ptr] = nbytes
        self.device_bytes[ptr] = bytearray(nbytes)
        bisect.insort(self._bases, ptr)
        return (0, ptr)

    def cudaFree(self, ptr: int):
        self._wait()  # cudaFree waits for the device
        return self._release("memory", ptr)

    def cudaMallocHost(self, nbytes: int):
        block = ctypes.create_string_buffer(nbytes)
        self.pinned[ctypes.addressof(block)] = block
        self.made["pinned"] += 1
        return (0, ctypes.addressof(block))

    def cudaFreeHost(self, ptr: int):
        assert ptr in self.pinned, f"host memory {ptr:#x} freed twice or never made by cudaMallocHost"
        self._wait()  # it may wait for the device: and nothing queued may still use it
        del self.pinned[ptr]
        self.released["pinned"] += 1
        return (0,)

    def cudaStreamCreate(self):
        return (0, self._make("stream"))

    def cudaStreamDestroy(self, stream: int):
        assert not self.pending[stream], "stream destroyed with work still queued"
        return self._release("stream", stream)

    def cudaStreamSynchronize(self, stream: int):
        assert stream not in self.capturing, "synchronize during a capture invalidates it"
        self._wait(stream)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        host = src if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else dst
        work = ("copy", dst, src, nbytes, kind)
        if self.is_pinned(host, nbytes):
            self.enqueue(stream, work)
        else:  # pageable memory: CUDA may wait for the stream, then copies before returning
            assert stream not in self.capturing, "a pageable transfer cannot be captured"
            self._wait(stream)
            self.executed.append(work)
            self._do(work)
        return (0,)

    def cudaEventCreate(self):
        return (0, self._make("event"))

    def cudaEventRecord(self, event: int, stream: int):
        assert event in self.live["event"], "record of a destroyed event"
        self.completed_events.pop(event, None)
        self.enqueue(stream, ("event", event))
        return (0,)

    def cudaEventElapsedTime(self, start: int, end: int):
        if start not in self.completed_events or end not in self.completed_events:
            return (NOT_READY, None)  # recorded but not complete: nothing waited for it yet
        return (0, float(self.completed_events[end] - self.completed_events[start]))

    def cudaEventDestroy(self, event: int):
        return self._release("event", event)

    def cudaStreamBeginCapture(self, stream: int, mode):
        assert stream not in self.capturing, "capture begun twice"
        self.capturing[stream] = []
        return (0,)

    def cudaStreamEndCapture(self, stream: int):
        work = self.capturing.pop(stream)  # KeyError: ended a capture that was never begun
        if self.invalidate_capture:
            return (STREAM_CAPTURE_INVALIDATED, None)
        graph = self._make("graph")
        self.graph_work[graph] = work
        return (0, graph)

    def cudaGraphGetNodes(self, graph: int, count: int = 0):
        return (0, None, len(self.graph_work[graph]))

    def cudaGraphInstantiate(self, graph: int, flags: int):
        graph_exec = self._make("graph_exec")
        self.exec_work[graph_exec] = list(self.graph_work[graph])
        return (0, graph_exec)

    def cudaGraphLaunch(self, graph_exec: int, stream: int):
        assert graph_exec in self.live["graph_exec"], "launch of a destroyed graph"
        self.launches += 1
        for work in self.exec_work[graph_exec]:
            self.enqueue(stream, work)
        return (0,)

    def cudaGraphDestroy(self, graph: int):
        self.graph_work.pop(graph)
        return self._release("graph", graph)

    def cudaGraphExecDestroy(self, graph_exec: int):
        self.exec_work.pop(graph_exec)
        return self._release("graph_exec", graph_exec)


class FakeDriver:
    """The subset of `cuda.bindings.driver` the plugin's launcher calls (cuda_launch.py); counts module
    loads per CUDA context and launches. `context` is the context current on the calling thread."""

    CUresult = types.SimpleNamespace(CUDA_SUCCESS=0)
    CUdevice_attribute = types.SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR=75,
                                               CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR=76,
                                               CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT=16)
    CUfunction_attribute = types.SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8)

    def __init__(self, compute_capability: tuple[int, int] = (8, 9), sm_count: int = 132):
        self.attributes = {75: compute_capability[0], 76: compute_capability[1], 16: sm_count}
        self.context = 0x7000
        self.modules: dict[int, tuple[int, bytes]] = {}  # module -> (its context, the cubin)
        self.launches: list[tuple] = []

    def loads(self, context: int | None = None) -> int:
        return sum(1 for c, _ in self.modules.values() if context is None or c == context)

    def cuGetErrorName(self, err):
        return (0, b"CUDA_ERROR_FAKE")

    def cuCtxGetCurrent(self):
        return (0, self.context)

    def cuCtxGetDevice(self):
        return (0, 0)

    def cuDeviceGetAttribute(self, attribute, device):
        return (0, self.attributes[attribute])

    def cuModuleLoadData(self, image: bytes):
        module = 0x100 + len(self.modules)
        self.modules[module] = (self.context, bytes(image))
        return (0, module)

    def cuModuleGetFunction(self, module: int, name: bytes):
        context, _ = self.modules[module]
        assert context == self.context, "a function looked up outside its module's context"
        return (0, (module, name))

    def cuFuncSetAttribute(self, function, attribute, value):
        return (0,)

    def CUstream(self, stream: int) -> int:
        return stream

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        module, _ = function
        assert self.modules[module][0] == self.context, "a kernel launched from another context's module"
        self.launches.append((function, (gx, gy, gz), stream))
        return (0,)


# TensorRT's DataType members the backend meets, as objects with a `name`.
DataType = types.SimpleNamespace(**{n: types.SimpleNamespace(name=n) for n in (
    "FLOAT", "HALF", "BF16", "INT8", "UINT8", "INT32", "INT64", "BOOL", "FP8")})
ONNX_TO_TRT = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
               "int8": "INT8", "bool": "BOOL"}


# refuse[method](argument, call number) -> False to accept, True to refuse (the call returns
# False), or an exception to raise from inside the call.
Refusal = Callable[[object, int], object]


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.memory: tuple[int, int] | None = None
        self.profile = 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        ok = self.engine.answer("set_optimization_profile_async", profile)
        if ok:
            self.profile = profile
        return ok

    def set_input_shape(self, name: str, shape) -> bool:
        ok = self.engine.answer("set_input_shape", name)
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        ok = self.engine.answer("set_tensor_address", name)
        if ok:
            self.addresses[name] = ptr
        return ok

    def get_tensor_shape(self, name: str) -> tuple:
        return self.engine.outputs[name](self.shapes)

    def is_stream_capturable(self, stream: int) -> bool:
        return self.engine.capturable

    def execute_async_v3(self, stream: int) -> bool:
        if not self.engine.answer("execute_async_v3", stream):
            return False
        assert self.memory is not None, "a user-managed context ran without device memory"
        self.engine.cudart.enqueue(stream, ("run", self.engine.name, self.profile, self.memory[0],
                                            tuple(sorted(self.shapes.items())), tuple(sorted(self.addresses.items()))))
        return True


class FakeEngine:
    context_class = FakeContext

    def __init__(self, cudart: FakeCudart, name: str, profile_bytes: list[int],
                 outputs: dict[str, Callable[[dict[str, tuple]], tuple]], capturable: bool = True,
                 dtypes: dict[str, str] | None = None, weights: dict[str, bytes] | None = None):
        self.cudart, self.name, self.profile_bytes, self.outputs = cudart, name, profile_bytes, outputs
        self.dtypes = dtypes or {}  # tensor -> TensorRT DataType name; FLOAT where not given
        self.weights = weights  # a weight-stripped engine: the weights it was built with, by initializer name
        self.refitted: dict[str, bytes] = {}
        self.num_optimization_profiles = len(profile_bytes)
        self.capturable = capturable
        self.refuse: dict[str, Refusal] = {}
        self.calls: Counter[str] = Counter()
        self.contexts: list[weakref.ref] = []
        self.strategies: list[str] = []

    weight_streaming_budget_v2 = -1  # TensorRT's default: every weight on the device

    def get_weight_streaming_automatic_budget(self) -> int:
        return 4096

    def get_tensor_dtype(self, name: str) -> types.SimpleNamespace:
        return getattr(DataType, self.dtypes.get(name, "FLOAT"))

    def get_device_memory_size_for_profile_v2(self, profile: int) -> int:
        return self.profile_bytes[profile]

    @property
    def device_memory_size_v2(self) -> int:  # the largest profile's, as TensorRT reports it
        return max(self.profile_bytes)

    def create_execution_context(self, strategy):
        assert self.weights is None or self.refitted == self.weights, "a context of an engine without its weights"
        self.strategies.append(strategy)
        ctx = self.context_class(self)
        self.contexts.append(weakref.ref(ctx))
        return ctx

    def alive_contexts(self) -> list["FakeContext"]:
        return [c for c in (ref() for ref in self.contexts) if c is not None]

    def answer(self, method: str, argument) -> bool:
        """Count the call; True when it succeeds."""
        self.calls[method] += 1
        verdict = self.refuse.get(method, lambda *_: False)(argument, self.calls[method])
        if isinstance(verdict, BaseException):
            raise verdict
        return not verdict


class FakeContext10(FakeContext):
    def __getattribute__(self, name: str):
        if name == "set_device_memory":
            raise AttributeError(name)
        return super().__getattribute__(name)

    @property
    def device_memory(self) -> int:
        return self.memory[0]

    @device_memory.setter
    def device_memory(self, ptr: int) -> None:
        self.memory = (ptr, None)


class FakeEngine10(FakeEngine):
    """TensorRT 10.0's spelling: memory queries without `_v2`, contexts given memory by a property."""

    context_class = FakeContext10

    def __getattribute__(self, name: str):
        if name.endswith("_v2"):
            raise AttributeError(name)
        return super().__getattribute__(name)

    def get_device_memory_size_for_profile(self, profile: int) -> int:
        return self.profile_bytes[profile]

    @property
    def device_memory_size(self) -> int:
        return max(self.profile_bytes)


def onnx_weights(path) -> dict[str, bytes]:
    """Every initializer of an ONNX file by name, as bytes (what a weight-stripped engine is refitted with)."""
    import onnx

    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def fake_tensorrt_module(cudart: FakeCudart, engines: dict[bytes, FakeEngine], version: str = "1.7.1.116"):
    """A stand-in for `tensorrt_rtx` whose Runtime deserialises engine files to `engines[file bytes]`."""

    class Logger:
        ERROR = "ERROR"

        def __init__(self, severity):
            self.severity = severity

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes):
            return engines.get(bytes(data))

    class Refitter:
        """Weights are set by name; the refit succeeds when every weight is the one built with."""

        def __init__(self, engine: FakeEngine, logger):
            self.engine, self.logger, self.staged = engine, logger, {}

        def get_missing_weights(self) -> list[str]:
            return sorted(set(self.engine.weights or {}) - set(self.staged))

        def refit_cuda_engine(self) -> bool:
            if self.get_missing_weights() or any(self.engine.weights[k] != v for k, v in self.staged.items()):
                return False
            self.engine.refitted = dict(self.staged)
            return True

    class OnnxParserRefitter:
        """Stages every initializer of the ONNX file (external data included) that the engine has."""

        def __init__(self, refitter: Refitter, logger):
            self.refitter, self.errors = refitter, []

        def refit_from_file(self, model: str) -> bool:
            try:
                weights = onnx_weights(model)
            except Exception as e:  # noqa: BLE001 - reported as the parser reports it
                self.errors.append(types.SimpleNamespace(desc=lambda e=e: f"cannot read {model}: {e}"))
                return False
            for name, value in weights.items():
                if name in (self.refitter.engine.weights or {}):
                    self.refitter.staged[name] = value
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int):
            return self.errors[index]

    return types.SimpleNamespace(
        __name__="tensorrt_rtx", __version__=version, Logger=Logger, Runtime=Runtime, DataType=DataType,
        Refitter=Refitter, OnnxParserRefitter=OnnxParserRefitter,
        ExecutionContextAllocationStrategy=types.SimpleNamespace(STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE",
                                                                 USER_MANAGED="USER_MANAGED"),
    )
