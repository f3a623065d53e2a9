"""Independent oracles written from the spec (../shared/spec), never from varedit_deploy's code.

Tests compare the package against these where no golden tensor reaches: float64 formulas,
the official layouts, and plain per-head loops.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SIDES_1M = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)  # docs/spec/transformer.md 2, '1M'


def rope_positions() -> list[tuple[int, int]]:
    """docs/spec/transformer.md 3.6: the flat '1M' table, entry -> (row, col), before padding."""
    positions = [(64 + e // 64, 64 + e % 64) for e in range(4096)]  # the source block
    for s in SIDES_1M:  # round(64 i / s) with no .5 ties: floor(64 i / s + 1/2), in integers
        positions += [((128 * i + s) // (2 * s), (128 * j + s) // (2 * s)) for i in range(s) for j in range(s)]
    return positions


def rope_angles(head_dim: int, entries: range | None = None) -> np.ndarray:
    """[entries, head_dim / 2] float64 angles: [row * inv_freq[0..c/4-1], col * inv_freq[...]]."""
    quarter = head_dim // 4
    inv_freq = 10000.0 ** (-2.0 * np.arange(quarter) / (head_dim // 2))
    pos = np.asarray(rope_positions(), np.float64)
    if entries is not None:
        pos = pos[entries.start:entries.stop]
    return np.concatenate([np.outer(pos[:, 0], inv_freq), np.outer(pos[:, 1], inv_freq)], axis=1)


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """GPT-J interleaved pairs: (x[2j], x[2j+1]) rotated by angle j, one pair at a time."""
    out = x.clone()
    for j in range(x.shape[-1] // 2):
        c, s = torch.cos(angles[:, j]), torch.sin(angles[:, j])
        out[..., 2 * j] = c * x[..., 2 * j] - s * x[..., 2 * j + 1]
        out[..., 2 * j + 1] = s * x[..., 2 * j] + c * x[..., 2 * j + 1]
    return out


def cosine_self_attention(x: torch.Tensor, w_qkv: torch.Tensor, q_bias: torch.Tensor, v_bias: torch.Tensor,
                          scale_mul: torch.Tensor, heads: int, angles: torch.Tensor) -> torch.Tensor:
    """docs/spec/transformer.md 3.5 and 5, head by head: mat_qkv rows are q (0..C-1), k, v; head h owns
    rows h*c..h*c+c-1 of each part; q has a bias, k none, v a bias; q and k are L2-normalised,
    q scaled by exp(min(scale_mul[h], ln 100)); RoPE on both; softmax with scale 1; no mask.
    Returns [B, L, C] with head h at channels h*c..h*c+c-1 (before `proj`)."""
    dim = x.shape[-1]
    c = dim // heads
    outs = []
    for h in range(heads):
        rows = slice(h * c, (h + 1) * c)
        q = x @ w_qkv[rows].T + q_bias[rows]
        k = x @ w_qkv[dim:][rows].T
        v = x @ w_qkv[2 * dim:][rows].T + v_bias[rows]
        q = q / q.norm(dim=-1, keepdim=True) * math.exp(min(float(scale_mul[h]), math.log(100.0)))
        k = k / k.norm(dim=-1, keepdim=True)
        q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        outs.append(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)
    return torch.cat(outs, dim=-1)
