"""The two attention flavours of VAREdit, in the precision the official code runs them.

Self-attention is cosine attention (scale 1); cross-attention and the text pool go through
flash-attn in the official code, which receives bfloat16 q/k/v even in a float32 run and
returns bfloat16. `bf16_flash_attention` reproduces that rounding (fixtures need it: without
it logits move by about 2e-3). The fixtures' flash-attn stand-in ran SDPA in float32 on the
rounded inputs; using SDPA here too (rather than matmul-softmax-matmul) makes the float32
result, and so every later bf16 rounding decision, the same as theirs.

The modules reach both products through an `Attention` object (`EAGER` unless replaced): an
exporter substitutes one whose products trace to fused ONNX nodes (export/attention_nodes.py),
so this package holds the math and nothing of ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# exp(scale_mul) is clamped at 100; the official constant is the float32 log(100).
MAX_SCALE_MUL = float(torch.log(torch.tensor(100.0)))


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to bfloat16 and back (what handing a tensor to the official flash-attn does)."""
    return x.to(torch.bfloat16).to(x.dtype)


def bf16_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over [B, H, L, c] with bf16 inputs/output, fp32 softmax/accumulation, scale 1/sqrt(c)."""
    q, k, v = round_bf16(q), round_bf16(k), round_bf16(v)
    return round_bf16(F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1])))


def head_temperature(scale_mul: torch.Tensor) -> torch.Tensor:
    """The learned per-head temperature of cosine attention, exp(min(scale_mul, ln 100)): clamped in
    the parameter's dtype (bf16 blocks clamp in bf16), exponentiated in fp32 as under autocast."""
    return scale_mul.clamp_max(MAX_SCALE_MUL).float().exp()


def cosine_qk(q: torch.Tensor, k: torch.Tensor, scale_mul: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise q and k per head and apply the learned per-head temperature to q."""
    return F.normalize(q, dim=-1) * head_temperature(scale_mul), F.normalize(k, dim=-1)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention with softmax scale 1 ([B, H, Lq, c] x [B, H, Lk, c])."""
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def cache_self_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q [B, H, n, c] over keys/values in the cache layout [L, B, H, c] -> [B, n, H*c]."""
    b, _, n, _ = q.shape
    return self_attention(q, keys.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3)).transpose(1, 2).reshape(b, n, -1)


class Attention:
    """The attention products the transformer's modules call; this one computes them eagerly."""

    def text(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Cross-attention and the text pool ([B, H, L, c]): `bf16_flash_attention`."""
        return bf16_flash_attention(q, k, v)

    def over_cache(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Self-attention of q [B, H, n, c] over the cache rows [L, B, H, c]: `cache_self_attention`."""
        return cache_self_attention(q, keys, values)


EAGER = Attention()
