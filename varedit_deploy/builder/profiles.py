"""Optimisation profiles of every graph, as plain data computed from the artifact manifest.

`step` and `sample` get one fixed-shape profile per scale, and `step` one more for the source
pass (source tokens, no SAR, empty past): the weights exist once in the engine; each call gets
kernels tuned for its exact lengths and can be captured as a CUDA graph. Only the instruction
length stays a range. Graphs without dynamic inputs get none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..artifact import Manifest

TEXT_LEN = (1, 32, 512)  # min / opt / max instruction tokens (T5 limit 512)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: (min, opt, max) shape of every dynamic input."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def _resolve(shape: list, dims: dict[str, int]) -> Shape:
    return tuple(d if isinstance(d, int) else dims[d] for d in shape)


def _profile(name: str, inputs: list[dict], dims: dict[str, int], text_len: tuple[int, int, int]) -> Profile:
    shapes = {}
    for spec in inputs:
        if all(isinstance(d, int) for d in spec["shape"]):
            continue
        lo, opt, hi = ({**dims, "text_len": t} for t in text_len)
        shapes[spec["name"]] = (_resolve(spec["shape"], lo), _resolve(spec["shape"], opt), _resolve(spec["shape"], hi))
    return Profile(name, shapes)


def graph_profiles(manifest: Manifest, graph: str, text_len: tuple[int, int, int] = TEXT_LEN) -> list[Profile]:
    """The profiles `graph` is built with, in the order the runtime selects them."""
    inputs = manifest.graphs[graph]["inputs"]
    schedule = manifest.schedule
    if graph in ("step", "sample"):
        profiles = [
            _profile(f"scale_{p['scale']}", inputs,
                     {"tokens": p["tokens"], "sar_tokens": p["tokens"], "past_targets": p["past_targets"],
                      "past_len": p["past_len"], "rows": p["sample_rows"]}, text_len)
            for p in schedule["per_scale"]
        ]
        if graph == "step":
            src = schedule["source_pass"]
            profiles.append(_profile("source_pass", inputs, {k: src[k] for k in ("tokens", "sar_tokens", "past_targets",
                                                                                  "past_len")}, text_len))
        return profiles
    profile = _profile("default", inputs, {}, text_len)
    return [profile] if profile.shapes else []
