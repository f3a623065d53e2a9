"""Bitwise sampling with the noise as an input (spec 3.9-3.10).

The official sampler is `torch.multinomial(softmax(l), 1, generator)` after tau and CFG on
logits, top-k (a no-op on two classes unless k = 1) and top-p (a bit whose minority
probability is <= 1 - top_p becomes deterministic). Multinomial with one sample is
`argmax(p / E)`, E ~ Exp(1); E comes in from a noise source (`varedit_deploy.sampling`).
"""

from __future__ import annotations

import torch
from torch import nn



def guided_logits(logits: torch.Tensor, cfg_weights: torch.Tensor, inv_tau: torch.Tensor) -> torch.Tensor:
    """[2, n, V] cond/uncond logits -> [n * d_tok, 2] bit-pair logits after tau and CFG."""
    scaled = logits * inv_tau
    mixed = scaled[0] * cfg_weights[0] + scaled[1] * cfg_weights[1]
    return mixed.reshape(-1, 2)


def sample_bits(pair_logits: torch.Tensor, noise: torch.Tensor, drop_threshold: torch.Tensor) -> torch.Tensor:
    """[R, 2] logits and Exp(1) noise [R, 2] -> bits [R] (int64), as multinomial would draw them."""
    p = torch.softmax(pair_logits, dim=-1)
    p0, p1 = p[:, 0], p[:, 1]
    drawn = ((p1 / noise[:, 1]) > (p0 / noise[:, 0])).to(torch.int64)  # argmax(p / E); ties -> 0
    bit = torch.where(p0 <= drop_threshold, torch.ones_like(drawn), drawn)
    return torch.where(p1 <= drop_threshold, torch.zeros_like(drawn), bit)


class BitSampler(nn.Module):
    """Step logits [2, n, 2*d_tok] + noise -> bits [1, n, d_tok] and the guided pair logits.

    One module for every scale; the guided logits come out too (they are what parity checks
    compare, and cost nothing extra).
    """

    def __init__(self, d_tok: int):
        super().__init__()
        self.d_tok = d_tok

    def forward(self, logits, noise, cfg_weights, inv_tau, drop_threshold):
        pair = guided_logits(logits, cfg_weights, inv_tau)
        return sample_bits(pair, noise, drop_threshold).view(1, -1, self.d_tok), pair
