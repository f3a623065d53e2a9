"""Preallocated KV caches for a whole edit: one L-major buffer per layer and K/V.

Layer 0 holds target tokens only (its source reference is the per-scale SAR slice); layers
>= 1 hold the source prefix then every target scale. A scale's past is a contiguous prefix
view and its new K/V slot the view right after it, so backends bind both directly: nothing is
concatenated or copied on the host, and the buffers are reused by every edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KVCache:
    k: list  # per layer [L_max, 2, H, c]; numpy arrays or device arrays with the same slicing
    v: list
    sar_k: object  # [sum n_s, 2, H, c]: layer-0 source reference pooled to every scale
    sar_v: object
    source_tokens: int
    starts: tuple[int, ...]
    tokens: tuple[int, ...]

    @classmethod
    def allocate(cls, depth: int, heads: int, head_dim: int, source_tokens: int,
                 starts: tuple[int, ...], tokens: tuple[int, ...], dtype=np.float32, empty=np.empty) -> "KVCache":
        """`empty(shape, dtype)` makes one buffer (host or device); every byte is written before it is read."""
        total = starts[-1] + tokens[-1]

        def buf(n: int):
            return empty((n, 2, heads, head_dim), dtype)

        lengths = [total] + [source_tokens + total] * (depth - 1)
        return cls([buf(n) for n in lengths], [buf(n) for n in lengths], buf(total), buf(total),
                   source_tokens, tuple(starts), tuple(tokens))

    def _offset(self, layer: int) -> int:
        return 0 if layer == 0 else self.source_tokens

    def past(self, layer: int, scale: int):
        end = self._offset(layer) + self.starts[scale]
        return self.k[layer][:end], self.v[layer][:end]

    def slot(self, layer: int, scale: int):
        start = self._offset(layer) + self.starts[scale]
        end = start + self.tokens[scale]
        return self.k[layer][start:end], self.v[layer][start:end]

    def source(self, layer: int):
        """Where the source pass writes layer `layer`'s (>= 1) source K/V."""
        return self.k[layer][: self.source_tokens], self.v[layer][: self.source_tokens]

    def sar(self, scale: int):
        start, end = self.starts[scale], self.starts[scale] + self.tokens[scale]
        return self.sar_k[start:end], self.sar_v[start:end]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.k, *self.v, self.sar_k, self.sar_v))
