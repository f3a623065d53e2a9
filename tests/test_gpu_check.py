"""The first GPU run, checked without a GPU: the GPU probes and the loud failures they give,
benchmarks/gpu_check.sh's plan and order, and the benchmarks' own checks (agreement only with finite
logits, the spread of the timed edits, results written as each phase ends)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import HAS_GPU
from fake_tensorrt import INSUFFICIENT_DRIVER, FakeCudart
from varedit_deploy.errors import VareditError
from varedit_deploy.runtime import gpu
from varedit_deploy.runtime.gpu import GpuProbe, gpu_probes, gpu_verdict

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def fake_nvidia_smi(folder: Path) -> Path:
    """A folder holding an `nvidia-smi` that lists one H100, as the driver's tool does."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)'\n")
    tool.chmod(0o755)
    return folder


# ------------------------------------------------------------------------------------------ probes
def test_a_failed_cuda_python_probe_beside_a_working_torch_is_an_error_not_a_skip(monkeypatch):
    """cuda-bindings newer than the driver (cudaErrorInsufficientDriver) while torch sees the GPU: the old
    detection said "no GPU", skipped every GPU test and switched the interpreter on, and the log looked green."""
    monkeypatch.setattr(gpu, "cudart", lambda: FakeCudart(device_count_error=INSUFFICIENT_DRIVER))
    monkeypatch.setattr(gpu, "probe_torch", lambda: GpuProbe("torch", True, "1 device(s) (torch 2.11, CUDA 13.0)"))
    probes = gpu_probes(nvidia_smi=False)
    assert probes[0] == GpuProbe("cuda-python", False, "cudaGetDeviceCount failed: cudaErrorInsufficientDriver")
    with pytest.raises(VareditError, match=r"the GPU probes disagree \(cuda-python: cudaGetDeviceCount failed: "
                                           r"cudaErrorInsufficientDriver; torch: 1 device\(s\)"):
        gpu_verdict(probes)


def test_a_probe_that_raises_counts_as_a_failed_probe(monkeypatch):
    class Unloadable(FakeCudart):
        def cudaGetDeviceCount(self):
            raise RuntimeError('"cuda" is an NVIDIA driver library and can only be found via system search')

    monkeypatch.setattr(gpu, "cudart", lambda: Unloadable())
    probe = gpu.probe_cuda_python()
    assert probe.sees_gpu is False and "raised RuntimeError" in probe.detail
    assert not gpu.gpu_available()


def test_no_gpu_where_nvidia_smi_sees_one_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    probes = gpu_probes()  # cuda-python and torch as they are here: no GPU
    assert probes[-1] == GpuProbe("nvidia-smi", True, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)")
    with pytest.raises(VareditError, match="the GPU probes disagree .*nvidia-smi: GPU 0: NVIDIA H100"):
        gpu_verdict(probes)


def test_probes_that_agree_decide_and_an_expected_gpu_must_be_found():
    none = [GpuProbe("cuda-python", None, "not installed"), GpuProbe("torch", False, "a CPU build"),
            GpuProbe("nvidia-smi", None, "not installed")]
    assert gpu_verdict(none) is False
    assert gpu_verdict([GpuProbe("cuda-python", True, "1"), GpuProbe("torch", True, "1")]) is True
    with pytest.raises(VareditError, match=r"a CUDA GPU was expected \(VAREDIT_EXPECT_GPU=1\) and none was found "
                                           r"\(cuda-python: not installed; torch: a CPU build"):
        gpu_verdict(none, expect_gpu=True)


def _pytest_collect(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(HAS_GPU, reason="checks what a machine without a GPU does")
def test_the_test_run_fails_loudly_where_a_gpu_is_expected_or_a_probe_disagrees(tmp_path):
    """tests/conftest.py: VAREDIT_EXPECT_GPU=1 (gpu_check.sh sets it) and no GPU, or nvidia-smi seeing a GPU
    that torch does not: pytest stops with one error naming the probes, never a run of skips."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VAREDIT_EXPECT_GPU")}
    expected = _pytest_collect({**env, "VAREDIT_EXPECT_GPU": "1"})
    assert expected.returncode != 0 and "a CUDA GPU was expected (VAREDIT_EXPECT_GPU=1)" in expected.stderr
    smi = _pytest_collect({**env, "PATH": f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{env['PATH']}"})
    assert smi.returncode != 0 and "the GPU probes disagree" in smi.stderr and "nvidia-smi: GPU 0" in smi.stderr


# ------------------------------------------------------------------------------------- gpu_check.sh
def plan(*options: str) -> tuple[list[tuple[str, int]], list[str]]:
    out = subprocess.run(["bash", str(CHECK), "--plan", *options], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    steps, files = [], []
    for line in out.splitlines():
        kind, *rest = line.split(" ")
        assert kind in ("STEP", "FILE") and len(rest) == (2 if kind == "STEP" else 1), line
        if kind == "STEP":
            assert not files, "steps come before files"
            steps.append((rest[0], int(rest[1])))
        else:
            files.append(rest[0])
    return steps, files


@pytest.mark.parametrize("mode", [(), ("--quick",)])
def test_the_plan_puts_the_benchmark_first_fits_the_time_and_leaves_at_most_8_files(mode):
    steps, files = plan(*mode)
    assert steps[0][0] == "bench-2b-512", steps
    assert sum(limit for _, limit in steps) <= 540, steps
    assert 1 <= len(files) <= 8 and len(set(files)) == len(files) and all("/" not in f for f in files), files
    assert {"summary.md", "gpu_fast_path.json", "gpu_fast_path.md"} <= set(files)
    if mode:
        assert [name for name, _ in steps] == ["bench-2b-512", "env"]
    else:
        assert [name for name, _ in steps] == ["bench-2b-512", "gpu-tests", "batch-steps-2b-512", "env"]
        assert {"tests.log", "batch_steps.json", "batch_steps.md"} <= set(files)


def _left(out: Path) -> set[str]:
    assert all(p.is_file() for p in out.iterdir()), "no folders under $OUT"
    return {p.name for p in out.iterdir()}


def test_the_run_follows_the_plan_with_every_step_expecting_a_gpu(tmp_path):
    """gpu_check.sh with a stand-in python that records each call: the steps run in the plan's order, the
    benchmark with >= 10 timed runs, the tests named one by one (no -k filter dropping one by a substring,
    fixtures that are not there left out by node id, no CPU-only test), every step under
    VAREDIT_EXPECT_GPU=1; only planned files land under $OUT."""
    log, out, fixtures = tmp_path / "calls.log", tmp_path / "out", tmp_path / "fixtures"
    (fixtures / "tiny-2b").mkdir(parents=True)
    (fixtures / "tiny-2b" / "config.json").write_text("{}")
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\n{{ printf "EXPECT=%s" "$VAREDIT_EXPECT_GPU"; printf "\\t%s" "$@"; echo; }} >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "OUT": str(out), "PYTHON": str(stub), "VAREDIT_FIXTURES": str(fixtures)}
    done = subprocess.run(["bash", str(CHECK)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 4 and all(c.startswith("EXPECT=1\t") for c in calls), calls
    bench, tests, batch, env_step = (c.split("\t")[1:] for c in calls)
    assert bench[:3] == ["benchmarks/gpu_fast_path.py", "--models", "2b-512"]
    assert int(bench[bench.index("--runs") + 1]) >= 10 and bench[bench.index("--out") + 1] == str(out)
    assert tests[:2] == ["-m", "pytest"] and "-k" not in tests and tests[tests.index("-m", 2) + 1] == "not trt"
    named = [t for t in tests if t.startswith("tests/")]
    assert "tests/test_fast_path.py::test_fast_path_reproduces_the_official_fixtures[tiny-2b]" in named
    assert not any("tiny-8b" in t for t in named)  # those fixtures are not here
    assert not any("test_pytest_m_gpu_selects" in t or "tensor_cores" in t for t in named)  # CPU-only tests
    assert "tests/test_plugins.py::test_fused_sampler_and_next_scale_input_match_the_reference" in named
    assert batch[:2] == ["benchmarks/gpu_batch_steps.py", "--model"] and "--device" in batch
    assert batch[batch.index("--device") + 1] == "cuda" and env_step == ["-"]
    _, files = plan()
    assert _left(out) <= set(files) and "summary.md" in _left(out)
    summary = (out / "summary.md").read_text()
    assert [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ") and " s |" in line] \
        == ["bench-2b-512", "gpu-tests", "batch-steps-2b-512", "env"]


@pytest.mark.skipif(HAS_GPU, reason="checks what a machine without a GPU does")
def test_without_a_gpu_the_run_fails_loudly_after_the_benchmark_step(tmp_path):
    """The benchmark step finds no GPU: exit status 2, the reason in benchmark.log and in the summary's
    step table, no test or batch step run on the CPU, and the probes' answers in env.txt."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VAREDIT_EXPECT_GPU")}
    done = subprocess.run(["bash", str(CHECK)], env={**env, "OUT": str(out), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    _, files = plan()
    assert _left(out) <= set(files) and "tests.log" not in _left(out) and "batch_steps.json" not in _left(out)
    assert "error: gpu_fast_path.py needs a CUDA GPU" in (out / "benchmark.log").read_text()
    assert "| bench-2b-512 | 270 s | 2 |" in (out / "summary.md").read_text()
    assert "(no benchmark results)" in (out / "summary.md").read_text()
    assert "probe torch: torch.cuda.is_available() is False" in (out / "env.txt").read_text()
    assert "error: a CUDA GPU was expected" in (out / "env.txt").read_text()


# ----------------------------------------------------------------------------------- the benchmarks
def _benchmark(name: str):
    """A benchmark script as a module (they live outside the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_is_reported_only_where_both_sides_logits_are_finite():
    """NaN logits sample all-zero bits on both sides: agreement 1.0 would be reported for garbage."""
    bench = _benchmark("gpu_fast_path")
    bits = [np.zeros((1, 4, 2), np.int64)]
    nan = [np.full((8, 2), np.nan, np.float32)]
    found = bench.agreement(bits, nan, bits, [np.ones((8, 2), np.float32)])
    assert found == {"finite_logits": {"official_order": True, "fast_path": False}, "logit_error_per_scale": None,
                     "bit_agreement_per_scale": None, "bit_agreement": None}
    ref = [np.array([[1.0, 2.0]] * 8, np.float32)]
    fast_bits = [np.array([[[0, 0], [0, 1], [0, 0], [0, 0]]])]
    found = bench.agreement(fast_bits, [ref[0] * 1.01], bits, ref)
    assert found["bit_agreement"] == found["bit_agreement_per_scale"][0] == 7 / 8
    assert found["logit_error_per_scale"] == [pytest.approx(0.01, rel=1e-5)]
    record = {"model": "2b-512", "gpu": "H100", "status": "failed: non-finite logits", **bench.agreement(
        bits, nan, bits, nan)}
    assert "no bit agreement: non-finite logits" in bench.markdown([record])


def test_the_timed_edits_report_their_spread_and_each_phase_is_published(tmp_path):
    bench = _benchmark("gpu_fast_path")
    from varedit_deploy.config import from_name

    config = from_name("tiny-2b")
    scales = {f"scale_{s}": 0.001 for s in range(config.schedule.num_scales)}
    official = [{**scales, "transformer": 0.05, "total": t} for t in (0.40, 0.50, 0.45)]
    fast = [{**scales, "transformer": 0.01, "total": t} for t in (0.10, 0.11, 0.09)]
    timed = bench.timings(config, official, fast)
    assert timed["official_order_total_ms"] == {"median": 450.0, "min": 400.0, "max": 500.0,
                                                "runs": [400.0, 500.0, 450.0]}
    assert timed["speedup_end_to_end"] == pytest.approx(4.5)
    assert timed["speedup_per_pair"] == {"min": pytest.approx(4.0), "max": pytest.approx(5.0)}
    record = {"model": "tiny-2b", "gpu": "H100", "torch": "2.11", "triton": "3.6", "precision": "bf16",
              "status": "timed 3/10", "runs": 3, "bit_agreement": 0.999, "logit_error_per_scale": [0.01],
              "bit_agreement_per_scale": [0.999], "finite_logits": {"official_order": True, "fast_path": True},
              **timed}
    bench.publish(tmp_path, {"model": "8b-512", "gpu": "H100", "status": "building"})
    bench.publish(tmp_path, {**record, "status": "agreement measured"})
    bench.publish(tmp_path, record)  # replaces its own entry, keeps the other model's
    results = json.loads((tmp_path / "gpu_fast_path.json").read_text())
    assert [(r["model"], r["status"]) for r in results] == [("8b-512", "building"), ("tiny-2b", "timed 3/10")]
    first = (tmp_path / "gpu_fast_path.md").read_text().splitlines()
    assert first[0].startswith("**8b-512** (H100, building): no timed edits yet")
    assert first[2].startswith("**tiny-2b** (H100, timed 3/10): fast path **4.50x** the official order (per pair "
                               "4.00-5.00x; median of 3 edits each, interleaved: 450.0 ms [400.0-500.0] vs 100.0 ms")
    assert "bits agree **0.99900** teacher-forced" in first[2]


def test_the_official_order_builds_nothing_inside_an_edit_and_the_fast_path_agrees(tiny_text_dir, monkeypatch):
    """The benchmark's reference and agreement code on the CPU (bf16 autocast, the interpreter): the
    next-scale resamplers are made once, outside the timed edit (the official code does not rebuild them
    per scale), and the fast path teacher-forced on the reference's bits agrees with finite logits."""
    import torch

    from varedit_deploy.config import from_name
    from varedit_deploy.imaging import SAMPLE_PHOTO
    from varedit_deploy.imaging import load_image
    from varedit_deploy.model import codes
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    bench = _benchmark("gpu_fast_path")
    model = VAREditModel.random(from_name("tiny-2b"), seed=0)
    model.attach_text_encoder(tiny_text_dir, "fp32")
    for blk in model.transformer.blocks:  # as the benchmark builds it (and CPU autocast needs fp32 norm weights)
        blk.to(torch.bfloat16)
        blk.ca_norm.float()
    photo = load_image(SAMPLE_PHOTO)
    official = bench.OfficialOrder(model, "cpu")
    built = []
    original = codes.NextScaleInput.__init__
    monkeypatch.setattr(codes.NextScaleInput, "__init__", lambda self, *a: (built.append(a), original(self, *a)))
    times, bits, logits = official.edit(photo, NumpyNoise(0))
    assert built == [] and len(bits) == model.config.schedule.num_scales
    assert {"text_encoder", "vae_encoder", "source_pass", "scale_0", "vae_decoder", "transformer", "total"} <= set(times)
    pipe = EditPipeline.from_model(model, device="cpu", dtype=torch.bfloat16)
    scales = 4  # the interpreter is slow at the last scales; the GPU run does them all
    found = bench.agreement(*bench.teacher_forced(pipe, photo, bits[:scales], NumpyNoise(0)), bits[:scales],
                            logits[:scales])
    assert found["finite_logits"] == {"official_order": True, "fast_path": True}
    assert found["bit_agreement"] >= 0.99 and max(found["logit_error_per_scale"]) <= 8 * torch.finfo(torch.bfloat16).eps
    pipe.close()


def test_batch_steps_time_the_fast_path_s_step_and_publish_each_step(tmp_path, monkeypatch):
    """gpu_batch_steps.py times the fast path's step (fused kernels writing K/V into the cache slot; the
    eager reference's step writes nothing there) and rewrites its results after every step, the two ends
    of the batch range first, so a run cut short still compares them."""
    import torch

    steps_module = _benchmark("gpu_batch_steps")
    stages = steps_module.build("tiny-2b", torch.device("cpu"))
    steps = steps_module.BatchSteps(stages, 2, torch.device("cpu"))
    from varedit_deploy.runtime.kv_cache import cache_rows

    sched = stages.config.schedule
    slot = slice(*cache_rows("slot", 1, 0, sched.source_tokens, sched.starts, sched.tokens))
    before = steps.k[1][slot].clone()
    with torch.inference_mode():
        steps.call(1)()  # scale 0 for 2 requests (4 rows)
    assert not torch.equal(steps.k[1][slot], before) and steps.logits[1].shape[0] == 4
    assert torch.isfinite(steps.logits[1]).all()

    assert steps_module.measuring_order([4, 1, 16, 8]) == [1, 16, 4, 8]
    published = []

    class CutShort(Exception):
        pass

    def publish(per_batch):
        published.append({b: dict(v) for b, v in per_batch.items()})
        if len(published) == 10:
            raise CutShort

    monkeypatch.setattr(steps_module, "time_call", lambda fn, device, repeats, pool=None: 1.5)
    with pytest.raises(CutShort):
        steps_module.measure("tiny-2b", [1, 4, 16], torch.device("cpu"), 1, publish)
    assert [sum(len(v) for v in p.values()) for p in published] == list(range(1, 11))
    assert list(published[-1]) == [1, 16]  # batch 1's eight steps, then the largest batch's
    text = steps_module.report("tiny-2b", published[-1], "CPU", complete=False)
    assert "- incomplete" in text and "| scale_0 | 1.500 | 1.500 | 16.00x |" in text
    assert "| scale_6 | 1.500 | - | - |" in text and "transformer per edit" not in text
