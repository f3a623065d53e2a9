"""Bits -> codes -> summed codes -> next-scale input, and the source prefix (spec 3.11, vae-text 2.3).

This is the only place that knows the token <-> VAE-latent layout: 2x2 spatial patchify for
8B models (token channel 4c + 2dy + dx <-> VAE channel c at pixel (2i+dy, 2j+dx)), written as
Reshape/Transpose because ONNX SpaceToDepth uses another channel order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .buffers import constant
from .resample import bilinear_matrix


def pixel_unshuffle2(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, 4C, h, w] with channel 4c + 2dy + dx (torch.pixel_unshuffle order)."""
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, hh // 2, ww // 2)


def pixel_shuffle2(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `pixel_unshuffle2`: [B, 4C, h, w] -> [B, C, 2h, 2w]."""
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def latent_to_tokens(latent: torch.Tensor, patchify: bool) -> torch.Tensor:
    """VAE-layout [1, d, H, W] -> transformer tokens [1, n, d_tok], row-major."""
    if patchify:
        latent = pixel_unshuffle2(latent)
    return latent.flatten(2).transpose(1, 2)


def tokens_to_latent(tokens: torch.Tensor, side: int, patchify: bool) -> torch.Tensor:
    """Transformer tokens [1, n, d_tok] on a side x side grid -> VAE layout [1, d, H, W]."""
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
    return pixel_shuffle2(grid) if patchify else grid


def bits_to_codes(bits: torch.Tensor, codebook_dim: int) -> torch.Tensor:
    """{0, 1} -> (2b - 1) / sqrt(d), as the official bit_label codes (the l2norm is a no-op)."""
    inv = 1.0 / math.sqrt(codebook_dim)
    return bits.to(torch.float32) * (2 * inv) - inv


class NextScaleInput(nn.Module):
    """Add scale s's codes to the running sum and build scale s+1's tokens (static per scale)."""

    def __init__(self, config: ModelConfig, scale: int):
        super().__init__()
        sched = config.schedule
        self.scale, self.side = scale, sched.sides[scale]
        self.patchify = config.transformer.patchify
        self.codebook_dim = config.transformer.codebook_dim
        self.last = scale == sched.num_scales - 1
        full = sched.latent_side
        if not self.last:
            up = bilinear_matrix(sched.vae_side(scale), full)
            down = bilinear_matrix(full, sched.vae_side(scale + 1))
            self.register_buffer("up", constant(up), persistent=False)
            self.register_buffer("down", constant(down), persistent=False)

    def forward(self, bits: torch.Tensor, summed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """bits [1, n, d_tok], summed [1, d, H, W] -> new summed, next tokens [1, n', d_tok] or None."""
        codes = bits_to_codes(tokens_to_latent(bits, self.side, self.patchify), self.codebook_dim)
        if self.last:
            return summed + codes, None
        summed = summed + torch.matmul(torch.matmul(self.up, codes), self.up.t())
        nxt = torch.matmul(torch.matmul(self.down, summed), self.down.t())
        return summed, latent_to_tokens(nxt, self.patchify)
