"""Parameter values one tensor at a time: modules built without weights, random weights by name.

A release-size model never has to exist whole in host memory: modules are built with their
parameters on the `meta` device (structure only), and each value is fetched when it is
needed, from a memory-mapped checkpoint or drawn at random. Random weights are a function of
(seed, parameter name), so a module randomised in place and a lazily drawn tensor of the same
name are equal: `export --random-weights` and `edit --random-weights` see the same model.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

# Embedding-like parameters drawn with a fixed 0.1 scale rather than 1/sqrt(fan_in).
_EMBEDDINGS = ("cfg_uncond", "lvl_embed.weight", "pos_start")


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on `meta` (no memory); buffers stay real.

    Buffers are the computed constants (RoPE tables, resampling matrices) that tracing needs."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":  # (a tied parameter is already there)
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random float32 values for parameter `name` that keep activations in a sane range."""
    g = torch.Generator(device=device).manual_seed(_seed(name, seed))
    noise = torch.randn(shape, generator=g, device=device)
    owner = name.rsplit(".", 2)[-2] if "." in name else ""
    if name.endswith("scale_mul_1H11"):
        return math.log(4.0) + 0.1 * noise
    if "norm" in owner and name.endswith("weight"):
        return 1.0 + 0.1 * noise
    if len(shape) >= 2 and name not in _EMBEDDINGS:
        return noise / math.sqrt(math.prod(shape[1:]))  # 1 / sqrt(fan_in)
    return 0.1 * noise


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> None:
    """Random weights in place (tiny test models, GPU benchmarks), drawn on the parameters'
    device so a model built on a GPU never passes through host memory."""
    for name, p in module.named_parameters():
        p.copy_(random_tensor(name, tuple(p.shape), seed, p.device))


class RandomWeights(Mapping):
    """The random weights of `module` (a skeleton is enough), drawn on demand in `dtype`."""

    def __init__(self, module: nn.Module, seed: int, dtype: torch.dtype = torch.float32):
        self.shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
        self.seed, self.dtype = seed, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return random_tensor(name, self.shapes[name], self.seed).to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)
