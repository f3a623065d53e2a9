"""The VAE's GroupNorm: the same function as torch's, and float32-accurate on ONNX Runtime at 1024 px."""

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from varedit_deploy.model.vae import GroupNorm


def _norm(channels: int, seed: int) -> GroupNorm:
    g = torch.Generator().manual_seed(seed)
    norm = GroupNorm(32, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=g))
        norm.bias.copy_(torch.randn(channels, generator=g))
    return norm


@pytest.mark.parametrize("channels, side", [(32, 7), (64, 16), (128, 5)])
def test_group_norm_is_torch_group_norm(channels, side):
    """Oracle: F.group_norm in float64 (the official module is nn.GroupNorm(32, eps=1e-6))."""
    norm = _norm(channels, side).double().requires_grad_(False)
    x = torch.randn(2, channels, side, side + 3, dtype=torch.float64) * 3 + 1.5
    ref = F.group_norm(x, 32, norm.weight, norm.bias, eps=1e-6)
    assert torch.allclose(norm(x), ref, atol=1e-12, rtol=0)


def test_exported_group_norm_keeps_float32_accuracy_over_1m_element_groups():
    """1024 px, 32 channels: each of the 32 groups holds 1024 x 1024 values. ONNX Runtime's
    InstanceNormalization (what nn.GroupNorm exports to) is 7.7e-5 from float64 here."""
    import onnxruntime as ort

    norm = _norm(32, 0).requires_grad_(False)
    x = torch.randn(1, 32, 1024, 1024, generator=torch.Generator().manual_seed(1)) * 3 + 1.5
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(norm, (x,), buf, opset_version=17, dynamo=False, input_names=["x"])
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    ref = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), eps=1e-6)
    scale = float(ref.abs().max())
    assert np.abs(got - ref.numpy()).max() / scale < 1e-6  # measured 2e-7 relative (1.4e-6 absolute)
    with torch.inference_mode():
        assert float((norm(x).double() - ref).abs().max()) / scale < 1e-6
