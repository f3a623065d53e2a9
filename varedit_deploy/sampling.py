"""Host-side sampling constants and noise sources, free of torch (the runtime imports them).

The official sampler draws `torch.multinomial` on the CPU, which equals `argmax(p / E)` with
E ~ Exp(1) from the same generator; every backend therefore takes E as an input, and a
noise source says where E comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .config import SamplingConfig, check_seed
from .errors import ConfigError, missing_dependency


@dataclass(frozen=True)
class SamplerInputs:
    """The host-side constants of the sampler, rounded to float32 the way the official code does."""

    cfg_weights: np.ndarray  # [2]: cfg, 1 - cfg (computed in double, then float32)
    inv_tau: np.ndarray  # [1]: 1 / tau (the official loop multiplies by it)
    drop_threshold: np.ndarray  # [1]: a bit value with probability <= this is never drawn

    @classmethod
    def from_params(cls, params: SamplingConfig) -> "SamplerInputs":
        threshold = 1.0 - params.top_p
        if params.top_k == 1:  # greedy: the minority bit (p <= 0.5) is always dropped
            threshold = max(threshold, 0.5)
        return cls(
            np.asarray([params.cfg, 1.0 - params.cfg], dtype=np.float32),
            np.asarray([1.0 / params.tau], dtype=np.float32),
            np.asarray([threshold], dtype=np.float32),
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.cfg_weights, self.inv_tau, self.drop_threshold


class NoiseSource(Protocol):
    """Exp(1) noise for each scale, [n_s * d_tok, 2] float32, drawn in scale order.

    Every source takes the same seeds: integers in [0, 2**63 - 1] (`config.check_seed`)."""

    name: str

    def draw(self, rows: int) -> np.ndarray: ...


class TorchCPUNoise:
    """The official CPU draws: a torch.Generator seeded once per edit, one exponential_ per scale."""

    name = "torch-cpu"

    def __init__(self, seed: int):
        try:
            import torch
        except ImportError:
            raise missing_dependency("torch", "export") from None
        self._torch = torch
        self.generator = torch.Generator().manual_seed(check_seed(seed))

    def draw(self, rows: int) -> np.ndarray:
        return self._torch.empty(rows, 2).exponential_(1, generator=self.generator).numpy()


class NumpyNoise:
    """A torch-free source (PCG64), for deployments; reproducible, but not the official stream."""

    name = "numpy"

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(check_seed(seed))

    def draw(self, rows: int) -> np.ndarray:
        return self.rng.standard_exponential((rows, 2), dtype=np.float32)


NOISE_SOURCES = {cls.name: cls for cls in (TorchCPUNoise, NumpyNoise)}


def draw_edit(noise: NoiseSource, rows: Sequence[int]) -> np.ndarray:
    """A whole edit's noise at once, [sum(rows), 2], for one upload: one draw per scale in scale
    order, so the values are those of per-scale draws by construction, for any noise source."""
    return np.concatenate([noise.draw(r) for r in rows])


def make_noise(name: str, seed: int) -> NoiseSource:
    if name not in NOISE_SOURCES:
        raise ConfigError(f"unknown noise source {name!r}; choose one of {sorted(NOISE_SOURCES)}")
    return NOISE_SOURCES[name](seed)
