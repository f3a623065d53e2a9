import itertools

import pytest
import torch
import torch.nn.functional as F

from varedit_deploy.config import SQUARE_SIDES
from varedit_deploy.model.resample import area_matrix, bilinear_matrix

PAIRS = sorted({(a, b) for a, b in itertools.product(SQUARE_SIDES + (128,), repeat=2) if a != b})


@pytest.mark.parametrize("src, dst", PAIRS)
def test_bilinear_weights_equal_torch_interpolation_of_an_identity(src, dst):
    ref = F.interpolate(torch.eye(src)[None], size=dst, mode="linear")[0].T  # [dst, src]
    assert torch.equal(torch.from_numpy(bilinear_matrix(src, dst)), ref)


@pytest.mark.parametrize("src, dst", PAIRS)
def test_bilinear_matrix_equals_torch_trilinear_with_t1(src, dst):
    x = torch.randn(1, 3, 1, src, src, generator=torch.Generator().manual_seed(src * 131 + dst))
    ref = F.interpolate(x, size=(1, dst, dst), mode="trilinear")[:, :, 0]
    a = torch.from_numpy(bilinear_matrix(src, dst))
    got = a @ x[:, :, 0] @ a.T
    # Same weights, another summation order: a few float32 ulps of the largest value.
    assert torch.allclose(got, ref, atol=4 * 1.2e-7 * float(x.abs().max()), rtol=0)


@pytest.mark.parametrize("src, dst", [(p, q) for p, q in PAIRS if q < p])
def test_area_matrix_equals_torch_area(src, dst):
    x = torch.randn(2, 4, src, src, generator=torch.Generator().manual_seed(src * 7 + dst))
    ref = F.interpolate(x, size=(dst, dst), mode="area")
    a = torch.from_numpy(area_matrix(src, dst))
    assert torch.allclose(a @ x @ a.T, ref, atol=1e-6, rtol=0)
