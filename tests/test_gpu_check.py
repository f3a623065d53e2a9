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
