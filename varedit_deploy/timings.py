"""Edit timings, in milliseconds everywhere: the API (`timings_ms`), the CLI, the demo, benchmarks.

An edit's stages are `text_encoder`, `vae_encoder`, `transformer` and `vae_decoder`, and
`total` covers them all. The transformer's time is made of parts: `text_condition`,
`source_pass`, then per scale `step`, `sample` and `next_input` (summed over the scales, and
per scale as `scale_0`, `scale_1`, ...). Tables show the parts indented under their stage.
"""

from __future__ import annotations

import re
import time

STAGES = ("text_encoder", "vae_encoder", "transformer", "vae_decoder")
TRANSFORMER_PARTS = ("text_condition", "source_pass", "step", "sample", "next_input")
_PER_SCALE = ("step", "sample", "next_input")
_SCALE = re.compile(r"^scale_(\d+)$")


def ms_since(start: float) -> float:
    """Milliseconds since `start`, a `time.perf_counter()` reading."""
    return (time.perf_counter() - start) * 1e3


def timing_rows(timings_ms: dict[str, float]) -> list[tuple[str, str, str | None]]:
    """(key, label, stage it is a part of or None) in reading order: each stage, its parts, the total."""
    rows: list[tuple[str, str, str | None]] = []
    for stage in STAGES:
        if stage in timings_ms:
            rows.append((stage, stage, None))
        if stage == "transformer":
            rows += [(part, part + (" (all scales)" if part in _PER_SCALE else ""), stage)
                     for part in TRANSFORMER_PARTS if part in timings_ms]
    return rows + ([("total", "total", None)] if "total" in timings_ms else [])


def per_scale(timings_ms: dict[str, float]) -> list[float]:
    """Each scale's time (its step, sample and next_input), in scale order."""
    scales = sorted((int(m[1]), v) for k, v in timings_ms.items() if (m := _SCALE.match(k)))
    return [v for _, v in scales]


def format_timings(timings_ms: dict[str, float]) -> str:
    """A plain-text table of one edit's timings, parts indented under their stage."""
    rows = [(key, ("  " if parent else "") + label) for key, label, parent in timing_rows(timings_ms)]
    width = max(len(label) for _, label in rows)
    lines = [f"{'stage':<{width}} {'ms':>9}"]
    lines += [f"{label:<{width}} {timings_ms[key]:>9.1f}" for key, label in rows]
    lines.append("(indented rows are parts of the stage above them)")
    scales = per_scale(timings_ms)
    if scales:
        lines.append(f"transformer per scale, ms: {' '.join(f'{v:.1f}' for v in scales)}")
    return "\n".join(lines)
