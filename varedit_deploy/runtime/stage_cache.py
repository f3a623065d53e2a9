"""A bounded cache of stage outputs (T5 features, VAE-encoder prefixes) keyed by their input's content.

A product edits the same photo again with another instruction, or sends the same instruction
for many photos; the pipeline then skips the text encoder or the VAE encoder. Values are
host copies of what the graph wrote, so a hit replays exactly the same numbers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class StageCache:
    """Least-recently-used arrays, at most `max_bytes` in all; `max_bytes=0` turns it off."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the worker writes, /metrics reads
        self.hits = self.misses = self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes -= 0 if old is None else old.nbytes
            self._items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._items)
