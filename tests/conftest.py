"""Shared test fixtures: golden fixture folders, real photos, tiny models and text encoders."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from varedit_deploy.errors import VareditError
from varedit_deploy.runtime.gpu import expect_gpu_from_env, gpu_probes, gpu_verdict

ROOT = Path(__file__).resolve().parents[1]

# Is there a GPU? Three probes that must agree (cuda-python, torch, nvidia-smi): a probe that fails
# where another sees a GPU would silently turn every GPU test into a skip and switch the interpreter
# on, so disagreement, or no GPU under VAREDIT_EXPECT_GPU=1 (benchmarks/gpu_check.sh), ends the run
# with an error naming every probe (pytest_configure) instead of a green log.
GPU_PROBES = gpu_probes()
try:
    HAS_GPU, GPU_PROBLEM = gpu_verdict(GPU_PROBES, expect_gpu_from_env()), None
except VareditError as e:
    HAS_GPU, GPU_PROBLEM = False, str(e)
# Triton kernels run in its interpreter on CPU tensors where there is no GPU. Triton reads this
# when a kernel is decorated, so it must be set before any varedit_deploy.plugins import.
if "TRITON_INTERPRET" not in os.environ and not HAS_GPU and GPU_PROBLEM is None:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
FIXTURES = Path(os.environ.get("VAREDIT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
FIXTURE_NAMES = ("tiny-2b", "tiny-8b")  # 256 px: cheap enough for every fixture-shaped test
# Every parity path also runs the 1024-px fixture: 13 scales, RoPE offsets up to 14,616 (the
# 256-px ones stop at 776), release sampling defaults (cfg 4, tau 0.5), ~1M-element VAE groups.
PARITY_FIXTURE_NAMES = FIXTURE_NAMES + ("tiny-8b-1024",)


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"golden fixture {path} is missing; set VAREDIT_FIXTURES to the shared/fixtures folder")
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` while its pixels are not there."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: mode 0555, or for the superuser (who ignores modes) /sys."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.fixture(params=FIXTURE_NAMES)
def golden(request) -> Path:
    return fixture_dir(request.param)


@pytest.fixture(params=PARITY_FIXTURE_NAMES)
def parity_golden(request) -> Path:
    return fixture_dir(request.param)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos shipped inside wheels: square (astronaut) and non-square (coffee, chelsea)."""
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    from varedit_deploy.model.tiny_text import write_tiny_text_encoder

    return write_tiny_text_encoder(tmp_path_factory.mktemp("t5"), d_model=256)


@pytest.fixture(scope="session")
def tiny_model(tiny_text_dir):
    """A random tiny-2b model with a tiny T5: the model `export --random-weights --model tiny-2b` builds."""
    from varedit_deploy.config import from_name
    from varedit_deploy.model.loaded import VAREditModel

    model = VAREditModel.random(from_name("tiny-2b"), seed=0)
    model.attach_text_encoder(tiny_text_dir, "fp32")
    return model


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """`varedit-deploy export --random-weights --model tiny-2b`, run through the CLI (of `tiny_model`)."""
    from varedit_deploy.cli import main

    out = tmp_path_factory.mktemp("art") / "tiny-2b"
    assert main(["export", "--random-weights", "--model", "tiny-2b", "--out", str(out)]) == 0
    return out


def pytest_configure(config):
    if GPU_PROBLEM is not None:
        raise pytest.UsageError(GPU_PROBLEM)


def openvino_available() -> bool:
    """Whether ONNX Runtime can run on an OpenVINO CPU device here (never faked: the plugin lists no device
    on non-Intel CPUs)."""
    from varedit_deploy.errors import VareditError
    from varedit_deploy.runtime.providers import parse_providers, resolve

    try:
        resolve(parse_providers(["openvino"]))
    except VareditError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """GPU tests run where a CUDA GPU (and, for `trt`, TensorRT) is present; skipped elsewhere, never faked."""
    try:
        import tensorrt  # noqa: F401

        has_trt = HAS_GPU
    except ImportError:
        has_trt = False
    has_openvino = any("openvino" in item.keywords for item in items) and openvino_available()
    for item in items:
        if "openvino" in item.keywords and not has_openvino:
            item.add_marker(pytest.mark.skip(reason="needs OpenVINO with a CPU device (Intel hardware with "
                                                    "onnxruntime-ep-openvino, or onnxruntime-openvino)"))
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU"))
