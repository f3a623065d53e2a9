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

    @staticmethod
    def layout(depth: int, heads: int, head_dim: int, source_tokens: int, starts: tuple[int, ...],
               tokens: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Shape of every cache buffer by name: k.{i}, v.{i} per layer, then sar_k and sar_v."""
        total = starts[-1] + tokens[-1]
        lengths = [total] + [source_tokens + total] * (depth - 1)
        shapes = {}
        for i, n in enumerate(lengths):
            shapes[f"k.{i}"] = shapes[f"v.{i}"] = (n, 2, heads, head_dim)
        shapes["sar_k"] = shapes["sar_v"] = (total, 2, heads, head_dim)
        return shapes

    @classmethod
    def from_buffers(cls, buffers: dict, source_tokens: int, starts: tuple[int, ...],
                     tokens: tuple[int, ...]) -> "KVCache":
        """The cache over buffers allocated by `layout` (every byte is written before it is read)."""
        depth = sum(name.startswith("k.") for name in buffers)
        return cls([buffers[f"k.{i}"] for i in range(depth)], [buffers[f"v.{i}"] for i in range(depth)],
                   buffers["sar_k"], buffers["sar_v"], source_tokens, tuple(starts), tuple(tokens))

    @classmethod
    def allocate(cls, depth: int, heads: int, head_dim: int, source_tokens: int,
                 starts: tuple[int, ...], tokens: tuple[int, ...], dtype: str = "float32", empty=np.empty) -> "KVCache":
        """`empty(shape, dtype)` makes one buffer (host or device)."""
        shapes = cls.layout(depth, heads, head_dim, source_tokens, starts, tokens)
        return cls.from_buffers({name: empty(shape, dtype) for name, shape in shapes.items()},
                                source_tokens, starts, tokens)

    def rows(self, kind: str, layer: int, scale: int = 0) -> tuple[int, int]:
        """Row range [first, end) of a view: 'past', 'slot', 'source' (layers >= 1) or 'sar'."""
        return cache_rows(kind, layer, scale, self.source_tokens, self.starts, self.tokens)

    def _view(self, kind: str, layer: int, scale: int = 0):
        first, end = self.rows(kind, layer, scale)
        k, v = (self.sar_k, self.sar_v) if kind == "sar" else (self.k[layer], self.v[layer])
        return k[first:end], v[first:end]

    def past(self, layer: int, scale: int):
        return self._view("past", layer, scale)

    def slot(self, layer: int, scale: int):
        return self._view("slot", layer, scale)

    def source(self, layer: int):
        """Where the source pass writes layer `layer`'s (>= 1) source K/V."""
        return self._view("source", layer)

    def sar(self, scale: int):
        return self._view("sar", 0, scale)


def cache_rows(kind: str, layer: int, scale: int, source_tokens: int, starts, tokens) -> tuple[int, int]:
    """The one definition of where everything sits in the caches (used by views and binding plans)."""
    offset = 0 if layer == 0 else source_tokens  # layer 0 holds targets only
    if kind == "past":
        return 0, offset + starts[scale]
    if kind == "slot":
        return offset + starts[scale], offset + starts[scale] + tokens[scale]
    if kind == "source":
        if layer == 0:
            raise ValueError("layer 0 keeps no source rows (its source reference is the SAR buffer)")
        return 0, source_tokens
    if kind == "sar":
        return starts[scale], starts[scale] + tokens[scale]
    raise ValueError(f"unknown cache view {kind!r}")
