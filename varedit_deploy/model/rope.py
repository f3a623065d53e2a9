"""2-D RoPE as VAREdit builds and indexes it (docs/spec/transformer.md 3.6).

One flat table is built from the '1M' schedule (source block of 64x64 at offset (64, 64),
then every 1M scale at star-normalised positions) and looked up by *flat sequence offset*
for whatever schedule runs. At 512 px every offset is below 4096, so all tokens take their
positions from the source block: a training-time quirk the checkpoints expect, kept as is.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import SQUARE_SIDES

_GRID = 256  # VAREdit's position grid (doubled from Infinity's 128)
_PAD_TO = 128


def _table_positions() -> np.ndarray:
    """[(row, col)] of every entry of the flat '1M' table, before padding."""
    full = SQUARE_SIDES[-1]
    rows = [(full + e // full, full + e % full) for e in range(full * full)]
    for side in SQUARE_SIDES:
        for i in range(side):
            for j in range(side):
                rows.append((int(round(full * i / side)), int(round(full * j / side))))
    return np.asarray(rows, dtype=np.int64)


def rope_table(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [entries, head_dim // 2] (fp32, zero-padded to a multiple of 128).

    Angles are computed exactly as the official table (torch fp32 outer products, then
    cos/sin), so positions match bit for bit.
    """
    half = head_dim // 2
    cpu = torch.device("cpu")  # the same values whatever the model is built on; the caller places them
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64, device=cpu).float() / half))
    t = torch.arange(_GRID, dtype=torch.int64, device=cpu).float()
    freqs = torch.outer(t, inv_freq)  # [grid, half/2]
    pos = torch.from_numpy(_table_positions())
    angles = torch.cat([freqs[pos[:, 0]], freqs[pos[:, 1]]], dim=-1)  # [entries, half]
    pad = -angles.shape[0] % _PAD_TO
    cos = torch.cat([torch.cos(angles), torch.zeros(pad, half, device=cpu)])
    sin = torch.cat([torch.sin(angles), torch.zeros(pad, half, device=cpu)])
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of x [..., L, c] by the angles of cos/sin [L, c/2]."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2)
