"""ONNX Runtime execution providers: names and options, what each provider is given per graph, the
errors where one is missing, and the device-buffer path (I/O binding onto ONNX Runtime allocations,
CUDA graph ids per call) checked on the CPU provider. GPU providers run in the `gpu` tests only."""

import json
import sys

import numpy as np
import pytest

from varedit_deploy.artifact import read_manifest
from varedit_deploy.engine_set import graph_profiles
from varedit_deploy.errors import ArtifactError, ConfigError, VareditError
from varedit_deploy.runtime import onnxruntime_backend as ob
from varedit_deploy.runtime import providers as pv
from varedit_deploy.runtime.ort_memory import OrtMemory
from varedit_deploy.runtime.pipeline import EditPipeline
from varedit_deploy.sampling import NumpyNoise

ort = pytest.importorskip("onnxruntime")


def test_provider_names_and_options_parse():
    assert pv.parse_provider("cpu") == pv.ProviderSpec("cpu")
    assert pv.parse_provider("OpenVINOExecutionProvider:mode=fast, threads=4") == pv.ProviderSpec(
        "openvino", {"mode": "fast", "threads": "4"})
    assert pv.parse_provider(("TensorrtExecutionProvider", {"trt_fp16_enable": True})).options == {"trt_fp16_enable": "1"}
    assert pv.parse_provider("tensorrt-rtx").name == "nv_tensorrt_rtx" and pv.parse_provider("trt").name == "tensorrt"
    assert str(pv.parse_provider("openvino:mode=fast,graphs=vae_decoder")) == "openvino:mode=fast,graphs=vae_decoder"
    assert [s.name for s in pv.parse_providers(None)] == ["cpu"]


@pytest.mark.parametrize("given, message", [
    (["npu"], "unknown execution provider 'npu'; choose from cpu, openvino, cuda, tensorrt, nv_tensorrt_rtx"),
    (["openvino:mode"], "options are KEY=VALUE separated by commas, got 'mode'"),
    (["openvino:mode=slow"], "mode 'slow' is not one of exact, fast"),
    (["openvino:mode=fast,load_config={}"], "either mode/threads or your own load_config"),
    (["cuda:cuda_graph=yes"], "cuda_graph is 0 or 1"),
    (["cpu:graphs=step"], "graphs= names graphs"),
    (["cuda", "CUDAExecutionProvider"], "named twice"),
    (["tensorrt", "nv_tensorrt_rtx"], "cannot run in one session"),
    (["openvino", "cuda"], "do not share buffers"),
])
def test_bad_provider_requests_are_refused(given, message):
    with pytest.raises(ConfigError, match=message):
        pv.parse_providers(given)


def test_openvino_modes_are_explicit_precisions():
    """OpenVINO's own default is bf16 on CPUs with AMX and fp32 elsewhere: both modes say which."""
    def config(text, plugin=True):
        return pv.openvino_options(pv.parse_provider(text), plugin)

    exact, fast = config("openvino"), config("openvino:mode=fast,threads=2")
    assert json.loads(exact["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}
    assert json.loads(fast["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": "2"}}
    assert json.loads(config("openvino:mode=fast,device=gpu")["load_config"]) == {"GPU": {"INFERENCE_PRECISION_HINT": "f16"}}
    assert "device_type" not in exact  # the plugin's device is the OrtEpDevice chosen
    assert config("openvino:cache_dir=/c", plugin=False) == {"cache_dir": "/c", "device_type": "CPU",
                                                             "load_config": exact["load_config"]}


def test_tensorrt_providers_get_a_profile_per_scale_and_an_engine_cache(tiny_artifact, tmp_path):
    m = read_manifest(tiny_artifact)
    trt = pv.provider_options(pv.parse_provider(f"tensorrt:cache_dir={tmp_path},fp16=1"), m, "step", False, True)
    profiles = graph_profiles(m, "step")
    assert len(profiles) == m.config.schedule.num_scales + 1  # every scale and the source pass
    for key, which in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1), ("trt_profile_max_shapes", 2)):
        entries = trt[key].split(",")
        assert len(entries) == sum(len(p.shapes) for p in profiles)
        x = [e for e in entries if e.startswith("x:")]  # one shape per profile for the same input: several profiles
        assert x == [f"x:{'x'.join(map(str, p.shapes['x'][which]))}" for p in profiles]
    assert trt["trt_engine_cache_enable"] == "1" and trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_timing_cache_path"] == str(tmp_path) and trt["trt_fp16_enable"] == "1"
    assert trt["trt_cuda_graph_enable"] == "1" and "cache_dir" not in trt and "fp16" not in trt
    assert pv.provider_options(pv.parse_provider("tensorrt"), m, "step", False, False)["trt_cuda_graph_enable"] == "0"
    rtx = pv.provider_options(pv.parse_provider("nv_tensorrt_rtx:cuda_graph=0"), m, "sample", True, True)
    assert rtx["enable_cuda_graph"] == "0" and rtx["nv_profile_min_shapes"].count("noise:") == m.config.schedule.num_scales
    assert rtx["nv_runtime_cache_path"].startswith(str(pv.default_cache_dir() / "nv_tensorrt_rtx" / "sample-"))
    assert "nv_profile_min_shapes" not in pv.provider_options(pv.parse_provider("nv_tensorrt_rtx"), m, "vae_decoder",
                                                              True, True)  # a graph of fixed shapes has no profile
    cuda = pv.provider_options(pv.parse_provider("cuda:device_id=1"), m, "step", False, True)
    assert cuda == {"device_id": "1", "enable_cuda_graph": "1"}


def test_missing_providers_are_clear_errors(monkeypatch):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(VareditError, match=r"cuda \(CUDAExecutionProvider\) is not in this onnxruntime: "
                                               "onnxruntime-gpu in place of onnxruntime"):
            pv.resolve(pv.parse_providers(["cuda"]))
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # as if it were not installed
    monkeypatch.setattr(pv, "_PLUGINS_REGISTERED", set())
    if "OpenVINOExecutionProvider" not in {d.ep_name for d in ort.get_ep_devices()}:
        with pytest.raises(VareditError, match=r"openvino \(OpenVINOExecutionProvider\) is not installed: "
                                               "pip install onnxruntime-ep-openvino"):
            pv.resolve(pv.parse_providers(["openvino"]))


def _openvino_devices() -> list:
    try:
        import onnxruntime_ep_openvino  # noqa: F401
    except ImportError:
        return []
    try:
        return list(pv.resolve(pv.parse_providers(["openvino"])).devices["openvino"])
    except VareditError:
        return []


def test_openvino_plugin_without_a_device_here_says_why():
    """The OpenVINO plugin offers devices on Intel hardware only; elsewhere (this project's AMD CI) it
    registers, lists no device, and the error says so instead of ONNX Runtime's silent CPU fallback."""
    pytest.importorskip("onnxruntime_ep_openvino")
    if _openvino_devices():
        pytest.skip("the OpenVINO plugin offers a device here (an Intel machine): test_openvino_parity runs instead")
    with pytest.raises(VareditError, match="the OpenVINO plugin offers no CPU device here .* Intel CPUs, GPUs and NPUs "
                                           "only, and this machine's CPU vendor is"):
        pv.resolve(pv.parse_providers(["openvino:mode=exact"]))


@pytest.mark.openvino
@pytest.mark.parametrize("fixture_name", ["tiny-2b", "tiny-8b"])
def test_openvino_parity_in_its_exact_mode(fixture_name, tmp_path):
    """OpenVINO fp32 replays the golden fixtures (an artifact with decomposed attention: OpenVINO's ONNX
    reader has no Attention). Runs where OpenVINO offers a CPU device: an Intel machine with the plugin,
    or the all-in-one onnxruntime-openvino build. Every bit and every tensor agrees on both fixtures, and
    tiny-8b passes whole. On tiny-2b one scale's logits were 1.3x the tolerance (2.5e-4, measured with
    onnxruntime-openvino 1.24.1), which this test reports as an expected failure, not a pass: OpenVINO's
    fp32 kernels differ from ONNX Runtime's in the last bits (1.5e-7 after the first LayerNormalization),
    and the official bf16 rounding of the cross-attention
    (model/attention.py, round_bf16) turns such a difference into a whole bf16 step where a value sits on a
    rounding boundary; benchmarks/RESULTS.md has the numbers. tests/test_fast_path.py takes such flips
    back one rounding at a time for the torch fast path; an ONNX graph's roundings are Cast nodes inside
    the provider, out of this test's reach."""
    from conftest import fixture_dir

    from varedit_deploy.cli import main
    from varedit_deploy.parity import LOGIT_TOL, check_fixture

    art = tmp_path / "art"
    assert main(["export", "--fixture", str(fixture_dir(fixture_name)), "--attention", "decomposed",
                 "--out", str(art)]) == 0
    report = check_fixture(fixture_dir(fixture_name), "onnxruntime", art, providers=["openvino:mode=exact"])
    assert all(r.bits_differ == 0 for r in report.scales) and all(t.ok for t in report.tensors), report.table()
    if not report.ok and fixture_name == "tiny-2b":  # reported as a known failure, never as a pass
        pytest.xfail(f"logits {max(r.rel for r in report.scales):.2e} of the largest (tolerance {LOGIT_TOL:.0e}): "
                     "a bf16 rounding boundary flipped by OpenVINO's last fp32 bits; see the docstring")
    assert report.ok, report.table()


def test_graphs_option_splits_the_work(tiny_artifact):
    backend = ob.OnnxRuntimeBackend(read_manifest(tiny_artifact), providers=["cpu"])
    specs = pv.parse_providers(["openvino:graphs=vae_encoder+vae_decoder", "cpu"])
    resolved = pv.Resolved(specs, False, {})
    assert [s.name for s in resolved.for_graph("vae_decoder")] == ["openvino", "cpu"]
    assert [s.name for s in resolved.for_graph("step")] == ["cpu"]
    with pytest.raises(ConfigError, match="graphs= names vae, which artifact .* does not have"):
        pv.check_graphs(pv.parse_providers(["openvino:graphs=vae"]), backend.manifest)


def test_device_buffers_on_the_cpu_provider_give_the_same_edit(tiny_artifact, photos):
    """The CUDA providers' path (every loop buffer an ONNX Runtime allocation, bound by address, host
    transfers through aliases of exact views), run on the CPU device: bit for bit the host-array edit."""
    host = EditPipeline.from_artifacts(tiny_artifact)
    device = EditPipeline.from_artifacts(tiny_artifact, device_buffers=True)
    assert device.backend.memory is not None and "buffers in cpu:0 memory" in device.backend.describe()
    assert type(device.loop.cache.k[0]).__name__ == "OrtArray"
    a = host.edit(photos["coffee"], "make it red", seed=2, noise=NumpyNoise(2), record=True)
    b = device.edit(photos["coffee"], "make it red", seed=2, noise=NumpyNoise(2), record=True)
    assert all(np.array_equal(x, y) for x, y in zip(a.loop.bits, b.loop.bits))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    again = device.edit(photos["coffee"], "make it red", seed=2, noise=NumpyNoise(2), record=True)  # buffers reused
    assert all(np.array_equal(x, y) for x, y in zip(a.loop.bits, again.loop.bits))


def test_device_views_write_and_read_exactly_their_bytes():
    memory = OrtMemory("cpu")
    buffer = memory.empty((6, 2, 3), np.dtype(np.float32))
    memory.write(buffer, np.zeros((6, 2, 3), np.float32))
    memory.write(buffer[2:4], np.ones((2, 2, 3)))  # an axis-0 view: rows 2 and 3 only
    whole = memory.read(buffer)
    assert whole[2:4].sum() == 12 and whole[:2].sum() == 0 and whole[4:].sum() == 0
    flat = buffer.reshape(36)
    memory.write(flat[30:], np.arange(6, dtype=np.float32))
    assert memory.read(buffer[5:6]).reshape(-1).tolist() == list(range(6))
    assert memory.read(buffer[3:3]).shape == (0, 2, 3)
    import ml_dtypes

    half = memory.empty((4,), np.dtype(ml_dtypes.bfloat16))
    memory.write(half, np.array([1.5, -2, 3, 0.25], ml_dtypes.bfloat16))
    assert memory.read(half).astype(np.float32).tolist() == [1.5, -2, 3, 0.25]
    with pytest.raises(AssertionError, match="writing"):
        memory.write(buffer[0:1], np.zeros(7, np.float32))


def test_each_call_gets_its_own_cuda_graph_id(tiny_artifact, photos, monkeypatch):
    """With CUDA graphs on, each distinct call of a graph (shapes and addresses) gets a graph id of its own
    and keeps it: one per scale for `step` and `sample`, one more for the source pass; past the cap, no
    capture. Checked on the CPU provider, which reads and ignores the run option."""
    pipe = EditPipeline.from_artifacts(tiny_artifact, device_buffers=True)
    for runner in pipe.backend._graphs.values():
        runner.cuda_graphs = True
    pipe.edit(photos["coffee"], "make it red", noise=NumpyNoise(0))
    scales = pipe.config.schedule.num_scales
    step, sample = pipe.backend.graph("step"), pipe.backend.graph("sample")
    assert len(step.graph_ids) == scales + 1 and len(sample.graph_ids) == scales
    ids = {key: options.get_run_config_entry("gpu_graph_id") for key, options in step.graph_ids.items()}
    assert sorted(int(i) for i in ids.values()) == list(range(1, scales + 2))
    pipe.edit(photos["coffee"], "make it blue", noise=NumpyNoise(1))  # the same calls again: the same ids
    assert {k: o.get_run_config_entry("gpu_graph_id") for k, o in step.graph_ids.items()} == ids
    monkeypatch.setattr(ob, "MAX_CUDA_GRAPHS", scales + 2)
    assert step._run_options({"x": np.zeros(1)}, {}).get_run_config_entry("gpu_graph_id") == str(scales + 2)
    assert step._run_options({"x": np.zeros(2)}, {}).get_run_config_entry("gpu_graph_id") == "-1"  # past the cap


def test_a_graph_the_provider_cannot_capture_runs_without_cuda_graphs(tiny_artifact, monkeypatch):
    backend = ob.OnnxRuntimeBackend(read_manifest(tiny_artifact))
    monkeypatch.setattr(pv.Resolved, "cuda_graphs", property(lambda self: True))
    real = backend._session

    def session(name, path, providers, cuda_graphs, weights_folder=None):
        if cuda_graphs:  # what ONNX Runtime says when nodes of the graph are not on the GPU
            raise ob._CudaGraphRefused()
        return real(name, path, providers, cuda_graphs, weights_folder)

    monkeypatch.setattr(backend, "_session", session)
    runner = backend.graph("vae_decoder")
    assert runner.cuda_graphs is False and backend.notes == ["vae_decoder: no CUDA graphs (the provider runs part "
                                                             "of it elsewhere)"]


def test_a_graph_a_cpu_side_provider_cannot_run_falls_back_to_the_cpu(tiny_artifact, photos, monkeypatch):
    """OpenVINO declines some graphs (at load, or at its first run, when it compiles); those run on the
    CPU provider and the backend's notes say which and why. A CUDA provider never falls back silently."""
    m = read_manifest(tiny_artifact)
    backend = ob.OnnxRuntimeBackend(m)
    backend.providers = pv.Resolved(pv.parse_providers(["openvino:graphs=vae_decoder+step"]), False, {})
    real = backend._session

    def session(name, path, providers, cuda_graphs, weights_folder=None):
        if name == "step" and providers.specs[0].name == "openvino":
            raise ob._LoadFailed("OpenVINO does not support the following ONNX operations: Attention")
        if providers.specs[0].name == "openvino":
            return real(name, path, pv.resolve(pv.parse_providers(["cpu"])), False, weights_folder)
        return real(name, path, providers, cuda_graphs, weights_folder)

    monkeypatch.setattr(backend, "_session", session)
    step = backend.graph("step")
    assert step.fallback is None and "step: runs on the CPU provider (openvino declined it: OpenVINO does not support " \
        "the following ONNX operations: Attention; export with --attention decomposed to run it there)" in backend.notes
    decoder = backend.graph("vae_decoder")
    assert decoder.fallback is not None

    compiled = decoder.session

    class Failing:  # a session whose first run fails, as OpenVINO's do on graphs it cannot compile
        def __getattr__(self, name):
            return getattr(compiled, name)

        def run_with_iobinding(self, binding, options):
            raise RuntimeError("[OpenVINO-EP] Output names mismatch between OpenVINO and ONNX")

    decoder.session = Failing()
    side = m.config.schedule.latent_side
    codes = np.zeros((1, m.config.transformer.codebook_dim, side, side), np.float32)
    image = np.empty((1, 3, m.config.image_size, m.config.image_size), np.float32)
    decoder.run({"summed_codes": codes}, {"image": image})
    assert np.isfinite(image).all() and decoder.fallback is None
    assert backend.notes[-1].startswith("vae_decoder: runs on the CPU provider (openvino declined it: Output names")
    on_gpu = ob.OnnxRuntimeBackend(m)
    on_gpu.providers = pv.Resolved(pv.parse_providers(["cuda"]), False, {})
    monkeypatch.setattr(on_gpu, "_session", lambda *a: (_ for _ in ()).throw(ob._LoadFailed("no kernel")))
    with pytest.raises(ArtifactError, match="cannot be loaded by ONNX Runtime with cuda .no kernel."):
        on_gpu.graph("vae_decoder")


@pytest.mark.gpu
@pytest.mark.parametrize("providers", [["cuda"], ["tensorrt"]])
def test_gpu_providers_edit_as_the_cpu_provider_does(tiny_artifact, photos, providers, tmp_path):
    """On a GPU with onnxruntime-gpu: caches on the device, CUDA graphs per call, TensorRT engines cached;
    bits as the CPU provider's (fp32 everywhere: TF32 is off by default in ONNX Runtime)."""
    if pv.PROVIDERS[providers[0]].ep_name not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no {providers[0]} provider (install onnxruntime-gpu)")
    if providers == ["tensorrt"]:
        providers = [f"tensorrt:cache_dir={tmp_path}"]
    cpu = EditPipeline.from_artifacts(tiny_artifact)
    gpu = EditPipeline.from_artifacts(tiny_artifact, providers=providers)
    assert gpu.backend.memory is not None and gpu.backend.memory.device == "cuda"
    a = cpu.edit(photos["coffee"], "make it red", noise=NumpyNoise(0), record=True)
    for _ in range(3):  # capture, then replay
        b = gpu.edit(photos["coffee"], "make it red", noise=NumpyNoise(0), record=True)
    agree = np.mean([np.mean(x == y) for x, y in zip(a.loop.bits, b.loop.bits)])
    assert agree > 0.999, agree


def test_each_server_worker_gets_its_own_gpu():
    from varedit_deploy.serve.state import worker_providers

    assert [str(s) for s in worker_providers(("cuda", "cpu"), 2)] == ["cuda:device_id=2", "cpu"]
    assert [str(s) for s in worker_providers(("tensorrt:device_id=0",), 3)] == ["tensorrt:device_id=0"]
    assert [str(s) for s in worker_providers(("openvino:mode=fast",), 1)] == ["openvino:mode=fast"]
