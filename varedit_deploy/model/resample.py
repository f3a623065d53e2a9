"""Resampling as constant matrices: bilinear (next-scale input) and area pooling (SAR).

PyTorch's `interpolate(mode='bilinear'/'trilinear', align_corners=False)` and
`interpolate(mode='area')` on a fixed schedule are linear maps along each axis, so we write
them as small matrices `A` with `Resize(X) = A_h @ X @ A_w^T`. One definition then serves the
reference, the ONNX graphs (MatMul only: area pooling with non-divisible sizes has no ONNX op,
and TensorRT's Resize edge rules need no checking) and the runtime. numpy only, no torch.
"""

from __future__ import annotations

import numpy as np


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of 1-D linear interpolation with half-pixel centres (align_corners=False).

    Mirrors PyTorch's CPU kernel: source = (dst + 0.5) * in/out - 0.5 (float32 scale, one
    rounding), clamped at 0, two taps, the second clamped to the last input.
    """
    mat = np.zeros((out_size, in_size), dtype=np.float32)
    scale = bilinear_scale(in_size, out_size)
    for i in range(out_size):
        # PyTorch's kernel evaluates scale * (i + 0.5) - 0.5 as one fused multiply-add.
        src = max(np.float32(float(scale) * (i + 0.5) - 0.5), np.float32(0.0))
        lo = int(src)
        hi = lo + 1 if lo < in_size - 1 else lo
        w_hi = np.float32(src - np.float32(lo))
        mat[i, lo] += np.float32(1.0) - w_hi
        mat[i, hi] += w_hi
    return mat


def bilinear_scale(in_size: int, out_size: int) -> np.float32:
    """Source pixels per output pixel, as PyTorch's kernel computes it (one float32 division)."""
    return np.float32(in_size) / np.float32(out_size)


def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of adaptive average pooling: cell i averages [floor(i*in/out), ceil((i+1)*in/out))."""
    mat = np.zeros((out_size, in_size), dtype=np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        mat[i, start:end] = 1.0 / (end - start)
    return mat
