"""Tiles and key split of a scale-attention launch: plain arithmetic, no torch or Triton, so the
TensorRT plugin's runtime half picks its launch without importing either."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Tiles by the compile statistics of benchmarks/kernel_report.py (RESULTS.md), the same on every
# target: with 16-bit caches both use tensor cores (HGMMA on sm90, HMMA on sm89/sm87), spill nothing
# and fit sm89's 99 KB of shared memory. Small tiles (one warpgroup, two per SM) for scales with
# few queries, large ones where there are enough row blocks to fill the GPU.
BLOCK_N = 64
SMALL = (64, 4, 2)  # BLOCK_M, warps, stages
LARGE = (128, 8, 2)
# A launch wants at least this many blocks per SM before the key range is split across blocks,
# and every split keeps at least this many keys (fewer would spend more on merging than on keys).
BLOCKS_PER_SM = 2
MIN_KEYS_PER_SPLIT = 512
COMBINE_M = 32  # rows per block of the merge (an elementwise pass over the partials)
# The interpreter has no device to ask: it plans for an H100/H200 (132 SMs), so CPU tests run the
# same splits the GPU runs.
DEFAULT_SM_COUNT = 132


@dataclass(frozen=True)
class AttentionPlan:
    """Tiles, warps and key split of one scale_attention call (static per scale and layer)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split: int
    keys_per_split: int


def plan_attention(n: int, keys: int, batch_heads: int, sm_count: int = DEFAULT_SM_COUNT) -> AttentionPlan:
    """Large query blocks where there are many queries; the key range split across blocks where
    the row blocks alone would leave SMs idle (the first scales have 1 to a few hundred queries)."""
    wanted = BLOCKS_PER_SM * sm_count
    enough_rows = n >= LARGE[0] and math.ceil(n / LARGE[0]) * batch_heads >= wanted
    block_m, warps, stages = LARGE if enough_rows else SMALL
    blocks = math.ceil(n / block_m) * batch_heads
    split = max(1, min(math.ceil(wanted / blocks), keys // MIN_KEYS_PER_SPLIT))
    per_split = math.ceil(math.ceil(keys / split) / BLOCK_N) * BLOCK_N  # whole key tiles per split
    return AttentionPlan(block_m, BLOCK_N, warps, stages, math.ceil(keys / per_split), per_split)
