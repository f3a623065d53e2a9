"""Bitwise sampling with the noise as an input (spec 3.9-3.10).

The official sampler is `torch.multinomial(softmax(l), 1, generator)` after tau and CFG on
logits, top-k (a no-op on two classes unless k = 1) and top-p (a bit whose minority
probability is <= 1 - top_p becomes deterministic). Multinomial with one sample is
`argmax(p / E)`, E ~ Exp(1); E comes in from a noise source (`varedit_deploy.sampling`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .codes import NextScaleInput


def guided_logits(logits: torch.Tensor, cfg_weights: torch.Tensor, inv_tau: torch.Tensor) -> torch.Tensor:
    """[2, n, V] cond/uncond logits -> [n * d_tok, 2] bit-pair logits after tau and CFG."""
    scaled = logits * inv_tau
    mixed = scaled[0] * cfg_weights[0] + scaled[1] * cfg_weights[1]
    return mixed.reshape(-1, 2)


def sample_bits(pair_logits: torch.Tensor, noise: torch.Tensor, drop_threshold: torch.Tensor) -> torch.Tensor:
    """[R, 2] logits and Exp(1) noise [R, 2] -> bits [R] (int64), as multinomial would draw them."""
    p = torch.softmax(pair_logits, dim=-1)
    p0, p1 = p[:, 0], p[:, 1]
    drawn = (p1 / noise[:, 1]) > (p0 / noise[:, 0])  # argmax(p / E); ties go to index 0
    bit = torch.where(p0 <= drop_threshold, torch.ones_like(drawn), drawn)
    bit = torch.where(p1 <= drop_threshold, torch.zeros_like(drawn), bit)
    return bit.to(torch.int64)


class SampleNext(nn.Module):
    """One scale's tail: guided logits -> bits -> summed codes -> next scale's embedded input."""

    def __init__(self, config: ModelConfig, scale: int, word_embed: nn.Linear, lvl_embed: nn.Embedding):
        super().__init__()
        self.d_tok = config.transformer.d_tok
        self.scale = scale
        self.next_input = NextScaleInput(config, scale)
        self.word_embed, self.lvl_embed = word_embed, lvl_embed

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[1, n, d_tok] -> [2, n, C] step input of scale s+1 (same input for both CFG rows)."""
        return (self.word_embed(tokens) + self.lvl_embed.weight[self.scale + 1]).expand(2, -1, -1)

    def forward(self, logits, noise, summed, cfg_weights, inv_tau, drop_threshold):
        bits = sample_bits(guided_logits(logits, cfg_weights, inv_tau), noise, drop_threshold)
        bits = bits.view(1, -1, self.d_tok)
        summed, tokens = self.next_input(bits, summed)
        if tokens is None:
            return bits, summed
        return bits, summed, self.embed(tokens)
