"""Where every tensor of every graph call lives, as plain data (no GPU needed to compute or check).

For each scale, and for the source pass (a run of the same `step` engine), which optimisation
profile the `step`/`sample` engines use, the exact shape of every input and output, and which
loop buffer (and byte offset into it) it is bound to. The TensorRT backend binds exactly these
addresses; CPU tests check the plan against the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from .kv_cache import SOURCE, Call, cache_rows


@dataclass(frozen=True)
class Binding:
    tensor: str
    buffer: str  # loop buffer name: cache_k_{i}, cache_v_{i}, sar_k, sar_v, x_{s}, logits_{s}, ...
    # (the source pass reads x_{N-1} and writes logits_{N-1}: it has the last scale's shapes there)
    offset_bytes: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StepCall:
    scale: Call
    profile: int
    bindings: tuple[Binding, ...]

    def by_tensor(self) -> dict[str, Binding]:
        return {b.tensor: b for b in self.bindings}


def step_plan(config: ModelConfig, text_len: int) -> list[StepCall]:
    """Bindings of the `step` engine at every scale, then the source pass (float32 I/O, L-major caches).

    Profiles follow `build.profiles`: scale s uses profile s, the source pass the one after them."""
    t, sched = config.transformer, config.schedule
    row = 2 * t.heads * t.head_dim * 4  # bytes of one cached token: [2, H, c] float32
    starts, tokens, n_src = sched.starts, sched.tokens, sched.source_tokens
    text = (t.depth, 2, t.heads, text_len, t.head_dim)
    last = sched.num_scales - 1
    calls = []
    for profile, call in enumerate([*range(sched.num_scales), SOURCE]):
        n, io = (n_src, last) if call == SOURCE else (tokens[call], call)
        b = [Binding("x", f"x_{io}", 0, (2, n, t.dim)),
             Binding("modulation", "modulation", 0, (t.depth, 2, 6, t.dim)),
             Binding("head_modulation", "head_modulation", 0, (2, 2, t.dim)),
             Binding("text_k", f"text_k_{text_len}", 0, text), Binding("text_v", f"text_v_{text_len}", 0, text)]
        first, end = cache_rows("sar", 0, call, n_src, starts, tokens)
        b += [Binding(f"sar_{kv}", f"sar_{kv}", first * row, (end - first, 2, t.heads, t.head_dim)) for kv in "kv"]
        for i in range(t.depth):
            for kind, name in (("past", "past"), ("slot", "new")):
                first, end = cache_rows(kind, i, call, n_src, starts, tokens)
                b += [Binding(f"{name}_{kv}_{i}", f"cache_{kv}_{i}", first * row, (end - first, 2, t.heads, t.head_dim))
                      for kv in "kv"]
        b.append(Binding("logits", f"logits_{io}", 0, (2, n, t.num_logits)))
        calls.append(StepCall(call, profile, tuple(b)))
    return calls


def select_profile(profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile (engine manifest form) whose [min, max] holds every given shape."""
    for index, profile in enumerate(profiles):
        ok = True
        for tensor, (lo, _opt, hi) in profile["shapes"].items():
            shape = shapes.get(tensor)
            if shape is None or len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
                ok = False
                break
        if ok:
            return index
    raise ValueError(f"no optimisation profile accepts shapes {shapes}")
