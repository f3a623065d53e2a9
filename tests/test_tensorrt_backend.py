"""The TensorRT backend on a fake TensorRT and a fake cuda-python that fail on demand (no GPU):
checked statuses, capture that always ends and never keeps a half or empty graph, graphs keyed
by shapes, replays that bind nothing, one shared activation block, and a close that releases
everything it made."""

import gc
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fake_tensorrt import ONNX_TO_TRT, FakeCudart, FakeEngine, FakeEngine10, fake_tensorrt_module
from varedit_deploy.artifact import MANIFEST, file_record, read_manifest, sha256_file
from varedit_deploy.engine_set import ENGINE_SCHEMA, engine_dir_name
from varedit_deploy.engine_set import graph_profiles
from varedit_deploy.errors import ArtifactError, EngineError, VareditError
from varedit_deploy.runtime import gpu
from varedit_deploy.runtime.gpu import DeviceArray, Stream
from varedit_deploy.runtime.tensorrt_backend import TensorRTBackend, TrtGraph

TRT = fake_tensorrt_module(FakeCudart(), {})
# Two scale profiles of a step-like engine: x fixed per scale, the text length a range.
PROFILES = [{"name": f"scale_{s}", "shapes": {"x": [[2, n, 8]] * 3, "text_k": [[1, 1, 4], [1, 8, 4], [1, 32, 4]]}}
            for s, n in enumerate((1, 4))]


@pytest.fixture
def cudart(monkeypatch) -> Iterator[FakeCudart]:
    fake = FakeCudart()
    monkeypatch.setattr(gpu, "cudart", lambda: fake)
    yield fake
    gc.collect()  # arrays in reference cycles are freed now, against the fake that made them


def step_engine(cudart: FakeCudart, **kw) -> FakeEngine:
    return FakeEngine(cudart, "step", kw.pop("profile_bytes", [3000, 7000]),
                      {"logits": lambda shapes: (2, shapes["x"][1], 16)}, **kw)


def buffers(scale: int, text_len: int = 8) -> tuple[dict, dict]:
    n = (1, 4)[scale]
    inputs = {"x": DeviceArray.empty((2, n, 8), np.float32), "text_k": DeviceArray.empty((1, text_len, 4), np.float32)}
    return inputs, {"logits": DeviceArray.empty((2, n, 16), np.float32)}


def runs(cudart: FakeCudart) -> list[tuple]:
    return [w for w in cudart.executed if w[0] == "run"]


def test_first_call_runs_then_captures_and_replays_bind_nothing(cudart):
    engine = step_engine(cudart)
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    inputs, outputs = buffers(1)
    graph.run(inputs, outputs)
    assert len(runs(cudart)) == 1 and len(graph.graphs) == 1 and cudart.launches == 0
    bound = dict(engine.calls)
    assert bound == {"set_optimization_profile_async": 1, "set_input_shape": 2, "set_tensor_address": 3,
                     "execute_async_v3": 2}  # eager run + the captured one
    for _ in range(3):
        graph.run(inputs, outputs)
    assert dict(engine.calls) == bound  # no rebinding, no enqueue: the graph holds it all
    assert cudart.launches == 3 and len(runs(cudart)) == 4 and len(set(runs(cudart))) == 1
    (_, name, profile, _mem, shapes, addresses), = set(runs(cudart))
    assert profile == 1 and dict(shapes) == {"x": (2, 4, 8), "text_k": (1, 8, 4)}
    assert dict(addresses) == {k: a.ptr for k, a in (*inputs.items(), *outputs.items())}


def test_captured_graphs_are_keyed_by_shapes_and_keep_their_own_context(cudart):
    engine = step_engine(cudart)
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    block = DeviceArray.empty((1, 32, 4), np.float32)  # one text buffer, two instruction lengths
    inputs, outputs = buffers(0)
    short = {**inputs, "text_k": DeviceArray(block.ptr, (1, 5, 4), np.dtype(np.float32), block)}
    long = {**inputs, "text_k": DeviceArray(block.ptr, (1, 20, 4), np.dtype(np.float32), block)}
    graph.run(short, outputs)
    graph.run(long, outputs)  # same addresses, other shape: not a replay of the first graph
    assert len(graph.graphs) == 2 and len(graph.contexts) == 2 and cudart.launches == 0
    cudart.executed.clear()
    graph.run(short, outputs)
    assert cudart.launches == 1 and dict(runs(cudart)[0][4])["text_k"] == (1, 5, 4)


@pytest.mark.parametrize("method, argument, message", [
    ("set_optimization_profile_async", 1, "refused to select the optimisation profile"),
    ("set_input_shape", "text_k", r"refused shape \(1, 8, 4\) for input 'text_k' \(the profile accepts \[1, 1, 4\]"),
    ("set_tensor_address", "logits", "refused the address of tensor 'logits'"),
    ("execute_async_v3", None, r"failed to enqueue the engine \(execute_async_v3 returned False"),
])
def test_every_refused_tensorrt_call_raises_naming_graph_profile_and_tensor(cudart, method, argument, message):
    engine = step_engine(cudart)
    engine.refuse[method] = lambda arg, n: argument is None or arg == argument
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    with pytest.raises(EngineError, match=r"graph step, profile 1 \(scale_1\): .*" + message):
        graph.run(*buffers(1))
    assert graph.graphs == {} and runs(cudart) == [] and cudart.capturing == {}


def test_an_output_buffer_of_another_shape_is_refused_before_anything_runs(cudart):
    graph = TrtGraph("step", step_engine(cudart), TRT, PROFILES, Stream(), use_cuda_graphs=False)
    inputs, _ = buffers(1)
    with pytest.raises(EngineError, match=r"output 'logits' is \(2, 4, 16\) .* buffer bound to it is \(2, 1, 16\)"):
        graph.run(inputs, {"logits": DeviceArray.empty((2, 1, 16), np.float32)})
    assert runs(cudart) == []


def test_shapes_no_profile_accepts_are_an_engine_error(cudart):
    graph = TrtGraph("step", step_engine(cudart), TRT, PROFILES, Stream(), use_cuda_graphs=True)
    inputs, outputs = buffers(1)
    inputs["x"] = DeviceArray.empty((2, 3, 8), np.float32)
    with pytest.raises(EngineError, match="graph step: no optimisation profile accepts"):
        graph.run(inputs, outputs)


@pytest.mark.parametrize("failure", ["raises", "returns False", "capture invalidated"])
def test_a_failed_capture_ends_it_keeps_nothing_and_is_never_replayed(cudart, failure):
    engine = step_engine(cudart)
    if failure == "raises":  # the eager run (call 1) works, the enqueue inside the capture (call 2) raises
        engine.refuse["execute_async_v3"] = lambda arg, n: RuntimeError("enqueue broke") if n == 2 else False
        expected = (RuntimeError, "enqueue broke")
    elif failure == "returns False":
        engine.refuse["execute_async_v3"] = lambda arg, n: n == 2
        expected = (EngineError, "failed to enqueue")
    else:
        cudart.invalidate_capture = True
        expected = (VareditError, "cudaErrorStreamCaptureInvalidated")
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    inputs, outputs = buffers(0)
    with pytest.raises(expected[0], match=expected[1]):
        graph.run(inputs, outputs)
    assert cudart.capturing == {}  # the capture was ended
    assert graph.graphs == {} and not cudart.live["graph"] and not cudart.live["graph_exec"]
    engine.refuse.clear()
    cudart.invalidate_capture = False
    cudart.executed.clear()
    graph.run(inputs, outputs)  # runs eagerly and captures again; nothing half-made is launched
    assert cudart.launches == 0 and len(runs(cudart)) == 1 and len(graph.graphs) == 1
    graph.run(inputs, outputs)
    assert cudart.launches == 1 and len(runs(cudart)) == 2


def test_a_capture_that_records_nothing_is_refused_and_released(cudart):
    stream = Stream()
    with pytest.raises(VareditError, match="recorded no work"):
        stream.capture(lambda: None)
    assert cudart.capturing == {} and not cudart.live["graph"] and not cudart.live["graph_exec"]
    assert cudart.made["graph"] == cudart.released["graph"] == 1


def test_a_context_tensorrt_cannot_capture_runs_eagerly_every_time(cudart):
    engine = step_engine(cudart, capturable=False)
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    inputs, outputs = buffers(0)
    for _ in range(3):
        graph.run(inputs, outputs)
    assert len(runs(cudart)) == 3 and cudart.launches == 0 and graph.graphs == {} and cudart.made["graph"] == 0
    assert engine.calls["set_tensor_address"] == 3  # bound once, run three times


def test_without_cuda_graphs_one_context_per_profile_rebinds_only_when_the_call_changes(cudart):
    engine = step_engine(cudart)
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=False)
    first, second = buffers(1), buffers(1)
    for call in (first, first, second, second, first):
        graph.run(*call)
    assert len(graph.contexts) == 1 and engine.calls["execute_async_v3"] == 5
    assert engine.calls["set_tensor_address"] == 3 * 3  # three changes of call, three tensors each
    assert [dict(w[5])["x"] for w in runs(cudart)] == [first[0]["x"].ptr] * 2 + [second[0]["x"].ptr] * 2 + [
        first[0]["x"].ptr]


def test_captured_calls_are_bounded_and_the_least_recently_used_go_first(cudart, monkeypatch):
    """Every instruction length makes new calls; past the cap the oldest unused one's graph and
    context are released (a server would otherwise grow without end)."""
    from varedit_deploy.runtime import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "MAX_CAPTURED_CALLS", 3)
    engine = step_engine(cudart)
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    calls = {length: buffers(1, length) for length in (4, 5, 6, 7)}
    for length in (4, 5, 6, 4, 7):  # 4 is used again before 7 arrives: 5 is the least recently used
        graph.run(*calls[length])
    assert len(graph.contexts) == len(graph.graphs) == 3 == len(cudart.live["graph_exec"])
    assert cudart.released["graph_exec"] == 1 and len(engine.alive_contexts()) == 3
    texts = {shape[1] for k in graph.graphs for name, _, shape in k[1] if name == "text_k"}
    assert texts == {4, 6, 7}
    launches = cudart.launches
    graph.run(*calls[4])  # still captured: replayed
    assert cudart.launches == launches + 1


def test_all_contexts_share_one_block_of_the_largest_profile(cudart):
    engine = step_engine(cudart, profile_bytes=[3000, 7000])
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    for scale, text_len in ((0, 8), (1, 8), (1, 9), (0, 30)):
        graph.run(*buffers(scale, text_len))
    contexts = engine.alive_contexts()
    assert len(contexts) == 4 and engine.strategies == ["USER_MANAGED"] * 4
    assert {c.memory for c in contexts} == {(graph.workspace.ptr, 7000)} and cudart.bytes[graph.workspace.ptr] == 7000
    assert {w[3] for w in runs(cudart)} == {graph.workspace.ptr}
    report = graph.memory_report()
    assert report == {"profiles": 2, "profile_bytes": [3000, 7000], "shared_bytes": 7000, "contexts": 4,
                      "one_per_profile_bytes": 14000, "cuda_graphs": 4}


def test_tensorrt_10_0_memory_calls_are_used_where_the_v2_ones_are_missing(cudart):
    engine = FakeEngine10(cudart, "step", [3000, 7000], {"logits": lambda shapes: (2, shapes["x"][1], 16)})
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    graph.run(*buffers(0))
    assert graph.profile_bytes == [3000, 7000] and graph.workspace.nbytes == 7000
    assert [c.memory for c in engine.alive_contexts()] == [(graph.workspace.ptr, None)]


def test_close_releases_graphs_contexts_and_the_block(cudart):
    engine = step_engine(cudart)
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    calls = [buffers(0), buffers(1), buffers(1, 20)]
    for call in calls:
        graph.run(*call)
    block = graph.workspace.ptr
    assert cudart.made["graph"] == cudart.made["graph_exec"] == 3 and cudart.pending[graph.stream.handle]
    graph.close()
    assert not cudart.pending[graph.stream.handle]  # queued runs finished before their contexts went
    gc.collect()
    assert cudart.released["graph"] == cudart.released["graph_exec"] == 3
    assert not cudart.live["graph"] and not cudart.live["graph_exec"] and block not in cudart.live["memory"]
    assert engine.alive_contexts() == [] and graph.engine is None


def test_a_buffer_of_another_type_than_the_engine_s_tensor_is_refused_in_one_line(cudart):
    engine = step_engine(cudart, dtypes={"text_k": "HALF"})
    graph = TrtGraph("step", engine, TRT, PROFILES, Stream(), use_cuda_graphs=True)
    with pytest.raises(EngineError, match=r"^graph step, profile 1 \(scale_1\): tensor 'text_k' is float16 "
                                          r"in the engine, the buffer bound to it is float32$") as e:
        graph.run(*buffers(1))
    assert "\n" not in str(e.value) and runs(cudart) == [] and engine.calls["set_input_shape"] == 0
    engine.dtypes = {"logits": "FP8"}  # an output too, and a type no buffer here holds
    with pytest.raises(EngineError, match=r"tensor 'logits' is float8_e4m3fn in the engine"):
        graph.run(*buffers(1))
    engine.dtypes = {}
    graph.run(*buffers(1))
    assert len(runs(cudart)) == 1


def test_runs_and_replays_queue_work_without_waiting(cudart):
    graph = TrtGraph("step", step_engine(cudart), TRT, PROFILES, Stream(), use_cuda_graphs=True)
    inputs, outputs = buffers(1)
    for _ in range(3):  # eager, capture, then replays
        graph.run(inputs, outputs)
    assert cudart.synchronizations == 0 and cudart.launches == 2
    assert len(cudart.pending[graph.stream.handle]) == 3  # queued, not yet waited for


def test_uploads_are_staged_in_page_locked_memory_kept_until_the_wait(cudart):
    """An upload's source may be dropped or reused at once: it is copied into page-locked staging memory,
    queued, and that memory is not handed out again before the stream has been synchronised."""
    stream = Stream()
    a, b = DeviceArray.empty((3, 5), np.float32), DeviceArray.empty((700,), np.int64)
    host = np.arange(15, dtype=np.float32).reshape(3, 5)
    stream.copy_to_device(a, host)
    host[:] = -1  # reused at once
    stream.copy_to_device(b, np.arange(700))  # a temporary, gone at once
    stream.copy_to_device(a[1:2], np.full((1, 5), 7.0, np.float32))  # a later write of the same rows wins
    assert cudart.synchronizations == 0 and len(cudart.pending[stream.handle]) == 3
    got_a, got_b = stream.read_back([a, b])
    assert cudart.synchronizations == 1
    expected = np.arange(15, dtype=np.float32).reshape(3, 5)
    expected[1] = 7.0
    assert np.array_equal(got_a, expected) and np.array_equal(got_b, np.arange(700))
    staged = cudart.made["pinned"]
    for _ in range(3):  # the staging memory is reused after each wait, not grown
        stream.copy_to_device(b, np.arange(700))
        stream.read_back([b])
    assert cudart.made["pinned"] == staged and cudart.synchronizations == 4
    # The fake keeps CUDA's rule: a transfer from pageable memory may wait for the stream.
    stream.copy_to_device(a, host)
    cudart.cudaMemcpyAsync(b.ptr, np.arange(700).ctypes.data, b.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                           stream.handle)
    assert cudart.synchronizations == 5 and not cudart.pending[stream.handle]
    stream.destroy()
    assert not cudart.pinned and cudart.released["pinned"] == staged


def write_fake_engine_set(artifact: Path, folder: Path, precision: str = "fp32", tf32: bool = False,
                          weight_streaming: bool = False, weights_stripped: bool = False,
                          io: dict[str, dict[str, str]] | None = None) -> Path:
    """An engine set for `artifact` as `build` writes it, whose engine files hold the graph names."""
    manifest = read_manifest(artifact)
    folder.mkdir(parents=True)
    engines = {}
    for name, g in manifest.graphs.items():
        path = folder / f"{name}.engine"
        path.write_bytes(name.encode())
        engines[name] = {**file_record(folder, path), "source": g["files"][0]["path"],
                         "source_sha256": g["files"][0]["sha256"],
                         "profiles": [p.to_json() for p in graph_profiles(manifest, name)],
                         "network": {"layers": {}, "fused_attentions": 0, "attention_chains": 0},
                         "math": {"precision": precision, "tf32": tf32, "attention_decomposable": False},
                         **({"io": io[name]} if io and name in io else {})}
    (folder / "engines.json").write_text(json.dumps({
        "schema_version": ENGINE_SCHEMA, "flavour": "tensorrt-rtx", "tensorrt_version": "1.7.1.116",
        "target": "sm89", "precision": precision, "artifact_manifest_sha256": sha256_file(artifact / MANIFEST),
        "weight_streaming": weight_streaming, "weights_stripped": weights_stripped, "engines": engines}))
    return folder


def output_shape(declared: list, inputs: list[dict]):
    """An output's shape for the input shapes set on a context: symbolic axes ('tokens', 'text_len')
    take the size of the input axis of the same name, as TensorRT resolves them."""
    def shape(bound: dict[str, tuple]) -> tuple:
        sizes = {axis: bound[t["name"]][i] for t in inputs if t["name"] in bound
                 for i, axis in enumerate(t["shape"]) if isinstance(axis, str)}
        return tuple(sizes[d] if isinstance(d, str) else d for d in declared)

    return shape


@pytest.fixture
def fake_rtx(cudart, tiny_artifact, monkeypatch):
    """tensorrt_rtx replaced by the fake, with one engine per graph of the tiny artifact."""
    manifest = read_manifest(tiny_artifact)
    engines = {}
    for name, g in manifest.graphs.items():
        dtypes = {t["name"]: ONNX_TO_TRT[t["dtype"]] for t in (*g["inputs"], *g["outputs"])}
        engines[name.encode()] = FakeEngine(cudart, name, [1000 * (i + 1) for i in range(max(
            len(graph_profiles(manifest, name)), 1))], {o["name"]: output_shape(o["shape"], g["inputs"])
                                                        for o in g["outputs"]}, dtypes=dtypes)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", fake_tensorrt_module(cudart, engines))
    return engines


def test_backend_close_releases_everything_it_made(fake_rtx, cudart, tiny_artifact, tmp_path):
    folder = write_fake_engine_set(tiny_artifact, tmp_path / engine_dir_name("tensorrt-rtx", "1.7.1.116", "sm89", "fp32"))
    manifest = read_manifest(tiny_artifact)
    with TensorRTBackend(manifest, flavour="tensorrt-rtx", precision="fp32", engine_dir=folder) as backend:
        for name in manifest.graphs:  # as EditPipeline does: load every graph up front
            backend.graph(name)
        bits, summed, out = (backend.empty((1, 256, 16), np.int64), backend.empty((1, 16, 16, 16), np.float32),
                             backend.empty((1, 16, 16, 16), np.float32))
        backend.write(bits, np.ones((1, 256, 16), np.int64))
        for _ in range(2):
            backend.graph("next_input_6").run({"bits": bits, "summed_codes": summed}, {"summed_codes_out": out})
        assert cudart.launches == 1
        report = backend.memory_report()
        assert report["step"]["profiles"] == 8 and report["step"]["shared_bytes"] == 8000  # 7 scales + the source pass
        assert report["step"]["one_per_profile_bytes"] == 8 * 8000 and report["next_input_6"]["cuda_graphs"] == 1
    gc.collect()
    assert all(not cudart.live[kind] for kind in ("memory", "stream", "graph", "graph_exec")), dict(cudart.live)
    assert cudart.made["pinned"] == cudart.released["pinned"] >= 1 and not cudart.pinned  # the upload's staging
    assert cudart.made["stream"] == 1 and cudart.made["memory"] == len(manifest.graphs) + 3
    assert all(engine.alive_contexts() == [] for engine in fake_rtx.values())
    backend.close()  # a second close is harmless
    assert cudart.released["stream"] == 1


def test_an_edit_waits_for_the_device_once_and_reads_back_what_it_wrote(fake_rtx, cudart, tiny_artifact, tmp_path):
    """The backend's contract: one host synchronisation per edit, in `read_all`. A scale loop (first edit:
    eager runs and captures; second: replays) queues its uploads from staging memory and its timing marks
    as events; what it uploaded from temporaries comes back intact; the marks are read after the wait."""
    from varedit_deploy.runtime.loop import ScaleLoop
    from varedit_deploy.sampling import NumpyNoise, SamplerInputs, draw_edit

    folder = write_fake_engine_set(tiny_artifact, tmp_path / engine_dir_name("tensorrt-rtx", "1.7.1.116", "sm89", "fp32"))
    manifest = read_manifest(tiny_artifact)
    t, sched = manifest.config.transformer, manifest.config.schedule
    rng = np.random.default_rng(0)
    with TensorRTBackend(manifest, flavour="tensorrt-rtx", precision="fp32", engine_dir=folder) as backend:
        loop = ScaleLoop(manifest, backend)
        sampler = SamplerInputs.from_params(manifest.config.sampling)
        for edit in range(2):
            features = rng.standard_normal((1, 7, t.text_channels)).astype(np.float32)
            prefix = rng.standard_normal((1, sched.source_tokens, t.d_tok)).astype(np.float32)
            sent = (features.copy(), prefix.copy())
            waits, launches = cudart.synchronizations, cudart.launches
            out = loop.run(features, prefix, sampler, NumpyNoise(edit))
            features[:], prefix[:] = np.nan, np.nan  # the caller's arrays are free once run returns
            assert cudart.synchronizations == waits  # nothing waited while queuing the whole edit
            with pytest.raises(VareditError, match="cudaErrorNotReady"):
                backend.seconds(*out.marks[0][1:])  # a mark is readable only after the wait
            got_features, got_prefix, got_noise = loop.collect(out, [loop.text_buffers(7)[0], loop.prefix,
                                                                     loop._noise_all])
            assert cudart.synchronizations == waits + 1, "an edit must wait for the device exactly once"
            assert np.array_equal(got_features, sent[0]) and np.array_equal(got_prefix, sent[1])
            assert np.array_equal(got_noise, draw_edit(NumpyNoise(edit), [n * t.d_tok for n in sched.tokens]))
            assert {"step", "sample", "next_input", "source_pass", "scale_0"} <= set(out.timings_ms)
            assert all(v >= 0 for v in out.timings_ms.values())
            assert (cudart.launches > launches) == (edit == 1)  # the second edit replays captured graphs
        staged = cudart.made["pinned"]
    del out  # its marks hold the events
    gc.collect()
    assert not cudart.pinned and cudart.released["pinned"] == staged
    assert not cudart.live["event"] and not cudart.live["memory"] and not cudart.live["stream"]


def test_buffers_the_loop_drops_are_freed_before_close(fake_rtx, cudart, tiny_artifact, tmp_path):
    """Text buffers outgrown by a longer instruction are replaced: the old ones must not stay allocated
    until close (for 8B-1024 that is gigabytes of text K/V per length seen)."""
    from varedit_deploy.runtime.loop import ScaleLoop

    folder = write_fake_engine_set(tiny_artifact, tmp_path / engine_dir_name("tensorrt-rtx", "1.7.1.116", "sm89", "fp32"))
    manifest = read_manifest(tiny_artifact)
    with TensorRTBackend(manifest, flavour="tensorrt-rtx", precision="fp32", engine_dir=folder) as backend:
        loop = ScaleLoop(manifest, backend)
        loop.text_buffers(10)
        live = len(cudart.live["memory"])
        for length in (70, 140, 300, 512):  # each one outgrows the text buffers
            loop.text_buffers(length)
        gc.collect()
        assert len(cudart.live["memory"]) == live  # the loop's buffers, one set of text buffers
    gc.collect()
    assert not cudart.live["memory"]


def test_streamable_engines_get_their_weight_budget_before_any_context(fake_rtx, cudart, tiny_artifact, tmp_path):
    manifest = read_manifest(tiny_artifact)
    for streaming in (False, True):
        folder = write_fake_engine_set(tiny_artifact, tmp_path / f"{streaming}" / engine_dir_name(
            "tensorrt-rtx", "1.7.1.116", "sm89", "fp32"), weight_streaming=streaming)
        with TensorRTBackend(manifest, flavour="tensorrt-rtx", precision="fp32", engine_dir=folder) as backend:
            backend.graph("step")
            engine = fake_rtx[b"step"]
            assert engine.weight_streaming_budget_v2 == (4096 if streaming else -1)


def test_backend_refuses_fp32_engines_built_with_tf32(fake_rtx, tiny_artifact, tmp_path):
    folder = write_fake_engine_set(tiny_artifact, tmp_path / "set", tf32=True)
    with pytest.raises(ArtifactError, match="engine step is meant to be fp32 but was built with TF32 "
                                            r"\(fp32, TF32 on\).*rebuild: varedit-deploy build"):
        TensorRTBackend(read_manifest(tiny_artifact), flavour="tensorrt-rtx", precision="fp32", engine_dir=folder)


def _set(tiny_artifact, tmp_path, **kw) -> Path:
    return write_fake_engine_set(tiny_artifact, tmp_path / "set" / engine_dir_name("tensorrt-rtx", "1.7.1.116", "sm89",
                                                                                   "fp16"), precision="fp16", **kw)


CACHE_TENSORS = {"step": [f"{p}_{kv}_{i}" for p in ("past", "new") for kv in "kv" for i in range(3)]
                 + ["sar_k", "sar_v", "text_k", "text_v"],
                 "sar_pool": ["source_k", "source_v", "sar_k", "sar_v"], "text_cond": ["text_k", "text_v"]}


def test_the_loop_allocates_caches_in_the_engines_types(fake_rtx, cudart, tiny_artifact, tmp_path):
    """16-bit engines take the caches and text K/V in 16 bits: the loop allocates them so (read from the
    engines), and refuses engines that disagree on a buffer they share, naming it, in one line."""
    from varedit_deploy.runtime.loop import ScaleLoop

    manifest = read_manifest(tiny_artifact)
    for name, tensors in CACHE_TENSORS.items():
        fake_rtx[name.encode()].dtypes = dict.fromkeys(tensors, "HALF")
    with TensorRTBackend(manifest, flavour="tensorrt-rtx", precision="fp16", engine_dir=_set(tiny_artifact, tmp_path)) as backend:
        loop = ScaleLoop(manifest, backend)
        assert loop.cache.k[1].dtype == loop.cache.sar_v.dtype == np.float16 and loop.x[0].dtype == np.float32
        assert loop.text_buffers(9)[1].dtype == np.float16 and loop.text_buffers(9)[0].dtype == np.float32
        fake_rtx[b"sar_pool"].dtypes["sar_v"] = "FLOAT"
    with TensorRTBackend(manifest, flavour="tensorrt-rtx", precision="fp16", engine_dir=_set(tiny_artifact, tmp_path / "2")) as backend:
        with pytest.raises(ArtifactError, match=r"disagree on the types of the buffers they share \(caches float16, "
                                                r"text K/V float16\): sar_pool has sar_v in float32, not float16; export the artifact"):
            ScaleLoop(manifest, backend)


def test_an_engine_that_is_not_what_its_manifest_records_is_refused(fake_rtx, cudart, tiny_artifact, tmp_path):
    manifest = read_manifest(tiny_artifact)
    folder = _set(tiny_artifact, tmp_path, io={"step": {"past_k_0": "float16"}})
    with TensorRTBackend(manifest, flavour="tensorrt-rtx", precision="fp16", engine_dir=folder) as backend:
        with pytest.raises(EngineError, match="engine step: past_k_0 is float32, its engine manifest says float16"):
            backend.tensor_dtype("step", "past_k_0")


def _stripped(fake_rtx, manifest, weights_of=None) -> None:
    """Make every fake engine a weight-stripped one built with the initializers of its graph file."""
    from fake_tensorrt import onnx_weights

    for name in manifest.graphs:
        fake_rtx[name.encode()].weights = onnx_weights((weights_of or manifest).graph_path(name))


def test_stripped_engines_are_refitted_from_the_artifact_before_any_context(fake_rtx, cudart, tiny_artifact, tmp_path):
    manifest = read_manifest(tiny_artifact)
    _stripped(fake_rtx, manifest)
    assert sum(len(e.weights) for e in fake_rtx.values()) > 20
    with TensorRTBackend(manifest, flavour="tensorrt-rtx", precision="fp16",
                         engine_dir=_set(tiny_artifact, tmp_path, weights_stripped=True)) as backend:
        for name in manifest.graphs:
            backend.graph(name)
            backend.graph(name)._context((0,), 0)  # the fake asserts the engine had its weights first
        assert all(e.refitted == e.weights for e in fake_rtx.values())


def test_a_stripped_engine_without_its_weights_is_one_clear_error(fake_rtx, cudart, tiny_artifact, tmp_path):
    manifest = read_manifest(tiny_artifact)
    _stripped(fake_rtx, manifest)
    fake_rtx[b"step"].weights["a weight the graph file lacks"] = b"\0"
    backend = TensorRTBackend(manifest, flavour="tensorrt-rtx", precision="fp16",
                              engine_dir=_set(tiny_artifact, tmp_path, weights_stripped=True))
    with pytest.raises(EngineError, match=r"engine step: .*step.onnx lacks 1 of the weights it was built with "
                                          r"\(a weight the graph file lacks\)"):
        backend.graph("step")
    _stripped(fake_rtx, manifest)
    name = next(iter(fake_rtx[b"step"].weights))
    fake_rtx[b"step"].weights[name] = b"other values"  # built from another export's weights
    with pytest.raises(EngineError, match="engine step: TensorRT refused the weights of .*step.onnx"):
        backend.graph("step")
    backend.close()


def test_the_fake_offers_only_calls_tensorrt_rtx_has_and_their_statuses_are_bools():
    import tensorrt_rtx as trt

    from fake_tensorrt import FakeContext

    test_helpers = {"alive_contexts", "answer", "context_class"}
    fake_module = fake_tensorrt_module(FakeCudart(), {})
    for fake, real in ((FakeEngine, trt.ICudaEngine), (FakeContext, trt.IExecutionContext),
                       (fake_module.Refitter, trt.Refitter), (fake_module.OnnxParserRefitter, trt.OnnxParserRefitter)):
        calls = [n for n in vars(fake) if not n.startswith("_") and n not in test_helpers]
        assert calls and all(hasattr(real, n) for n in calls), [n for n in calls if not hasattr(real, n)]
    assert hasattr(trt.ICudaEngine, "num_optimization_profiles")
    assert trt.ExecutionContextAllocationStrategy.USER_MANAGED.name == "USER_MANAGED"
    for name in ("set_optimization_profile_async", "set_input_shape", "set_tensor_address", "execute_async_v3",
                 "is_stream_capturable"):
        assert "-> bool" in getattr(trt.IExecutionContext, name).__doc__, name
    assert "-> bool" in trt.Refitter.refit_cuda_engine.__doc__ and "-> bool" in trt.OnnxParserRefitter.refit_from_file.__doc__
    assert "-> list[str]" in trt.Refitter.get_missing_weights.__doc__
    assert {"FLOAT", "HALF", "BF16", "INT8", "INT64"} <= set(trt.DataType.__members__)
    assert {"STRIP_PLAN", "REFIT_IDENTICAL"} <= set(trt.BuilderFlag.__members__)
