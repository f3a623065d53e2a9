"""Preallocated KV caches for a whole edit: one L-major buffer per layer and K/V.

Every layer holds the source tokens' K/V in rows [0, L_src) (written by the source pass, a
run of the step graph) and then every target scale. Layer 0 attends over its scale's SAR
slice (layer 0's source K/V pooled by `sar_pool`) and its earlier targets, rows
[L_src, L_src + cum_{s-1}); layers >= 1 over rows [0, L_src + cum_{s-1}). Either way a
call's past is a contiguous view and its new K/V slot the view right after it, so backends
bind both directly: nothing is concatenated or copied on the host, and the buffers are
reused by every edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

SOURCE = "source"  # the "scale" of the source pass in cache views
# Which call of the step graph a view is for: a scale index, or SOURCE for the source pass.
StepCall = Union[int, Literal["source"]]


@dataclass
class KVCache:
    k: list  # per layer [L_src + sum n_s, 2, H, c]; numpy arrays or device arrays with the same slicing
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
        shapes = {}
        for i in range(depth):
            shapes[f"k.{i}"] = shapes[f"v.{i}"] = (source_tokens + total, 2, heads, head_dim)
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

    def rows(self, kind: str, layer: int, call: StepCall = 0) -> tuple[int, int]:
        """Row range [first, end) of a view: 'past', 'slot', 'source' or 'sar'."""
        return cache_rows(kind, layer, call, self.source_tokens, self.starts, self.tokens)

    def _view(self, kind: str, layer: int, call: StepCall = 0):
        first, end = self.rows(kind, layer, call)
        k, v = (self.sar_k, self.sar_v) if kind == "sar" else (self.k[layer], self.v[layer])
        return k[first:end], v[first:end]

    def past(self, layer: int, call: StepCall):
        return self._view("past", layer, call)

    def slot(self, layer: int, call: StepCall):
        return self._view("slot", layer, call)

    def source(self, layer: int):
        """Layer `layer`'s source K/V (layer 0's is what `sar_pool` reads)."""
        return self._view("source", layer)

    def sar(self, call: StepCall):
        return self._view("sar", 0, call)


def cache_rows(kind: str, layer: int, call: StepCall, source_tokens: int, starts, tokens) -> tuple[int, int]:
    """The one definition of where everything sits in the caches (every view is cut by it).

    `call` is a scale index or SOURCE (the source pass: empty past, no SAR, slot = the source rows)."""
    if kind == "source":
        return 0, source_tokens
    if call == SOURCE:
        if kind == "slot":
            return 0, source_tokens
        if kind in ("past", "sar"):
            return 0, 0
        raise ValueError(f"unknown cache view {kind!r}")
    first_past = source_tokens if layer == 0 else 0  # layer 0 attends over the SAR, not its source rows
    end_past = source_tokens + starts[call]
    if kind == "past":
        return first_past, end_past
    if kind == "slot":
        return end_past, end_past + tokens[call]
    if kind == "sar":
        return starts[call], starts[call] + tokens[call]
    raise ValueError(f"unknown cache view {kind!r}")
