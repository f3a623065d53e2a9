"""The VAREdit transformer, written to be run eagerly, traced to ONNX and run by backends.

Three entry points split one edit by lifetime (docs/spec/transformer.md 3.2-3.8, section 7):

* `text_condition`: T5 features -> per-layer AdaLN modulation, head modulation, start
  token and per-layer cross-attention K/V (computed once per edit, not per step).
* `step`: one scale; takes the past K/V of every layer explicitly and returns logits and
  this scale's new K/V. It mutates nothing and branches on no tensor value.
* `source_pass`: the source tokens through the same `step`, with an empty past and no SAR
  (spec 3.7: full attention among source tokens, RoPE positions from 0), so one set of
  block weights serves both; `sar_pool` then area-pools layer 0's source K/V to every scale.

KV caches are L-major, [L, 2, H, c] per layer, so that a prefix is a contiguous view and a
runtime can bind each step's new K/V straight into a preallocated buffer.

Parameter names follow the official checkpoint (blocks are `blocks.{i}` here; the loader
maps `block_chunks.{k}.module.{j}`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, Schedule, TransformerConfig
from .attention import EAGER, cosine_qk
from .buffers import constant
from .resample import area_matrix
from .rope import apply_rope, rope_table


class TextCondition(NamedTuple):
    """Everything the steps need from the instruction; batch row 0 is cond, row 1 uncond."""

    start_token: torch.Tensor  # [2, 1, C]: pooled text + pos_start + lvl_embed[0]
    modulation: torch.Tensor  # [depth, 2, 6, C]: ada_gss_i + shared AdaLN of the text
    head_modulation: torch.Tensor  # [2, 2, C]: (scale, shift) before the head
    text_k: torch.Tensor  # [depth, 2, H, Lt, c]
    text_v: torch.Tensor  # [depth, 2, H, Lt, c]


class SourceKV(NamedTuple):
    sar_k: torch.Tensor  # [sum n_s, 2, H, c]: layer-0 source keys pooled to every scale
    sar_v: torch.Tensor
    layer_k: list[torch.Tensor]  # every layer: [L_src, 2, H, c] (layer 0's only feeds the SAR)
    layer_v: list[torch.Tensor]


def to_heads(cache: torch.Tensor) -> torch.Tensor:
    """[L, B, H, c] cache layout -> [B, H, L, c] attention layout."""
    return cache.permute(1, 2, 0, 3)


def to_cache(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, c] attention layout -> [L, B, H, c] cache layout."""
    return x.permute(2, 0, 1, 3)


def fp32_region(x: torch.Tensor):
    """Autocast off: under bf16 autocast the official code still runs the AdaLN linears on the text
    condition and the head in fp32 (docs/spec/transformer.md 3.2, 3.5, 3.12). A no-op without autocast."""
    return torch.autocast(x.device.type, enabled=False)


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then the AdaLN modulation (official fused_ada_layer_norm)."""
    return F.layer_norm(x, (dim,), eps=eps) * (scale + 1) + shift


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        c = cfg.dim
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, cfg.heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(c, c)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, L, C] -> q, k, v as [B, H, L, c], q/k cosine-normalised and rotated."""
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = cosine_qk(q, k, self.scale_mul_1H11)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v



class CrossAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        c = cfg.dim
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.mat_q = nn.Linear(c, c)
        self.mat_kv = nn.Linear(c, 2 * c, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.proj = nn.Linear(c, c)
        self.attention = EAGER  # an exporter swaps in fused nodes (export/attention_nodes.py)

    def text_kv(self, ca_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text [B, Lt, C] -> this block's K, V [B, H, Lt, c] (once per edit)."""
        b, n, _ = ca_kv.shape
        bias = torch.cat([torch.zeros_like(self.v_bias), self.v_bias])
        kv = F.linear(ca_kv, self.mat_kv.weight, bias).view(b, n, 2, self.heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.mat_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        return self.proj(self.attention.text(q, k, v).transpose(1, 2).reshape(b, n, -1))


class FFN(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """CrossAttnBlock with shared AdaLN (spec 3.5)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.dim, self.eps = cfg.dim, cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, cfg.dim))
        self.sa = SelfAttention(cfg)
        self.ca = CrossAttention(cfg)
        self.ca_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = FFN(cfg)
        self.attention = EAGER  # the self-attention's product (see CrossAttention)

    def mix(self, x: torch.Tensor, mod: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor,
            self_attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block around any self-attention implementation (eager here, fused kernels on GPUs):
        `self_attend(AdaLN(x))` returns the attention output [2, n, C] before `sa.proj`."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unsqueeze(1).unbind(2)
        x = x + self.sa.proj(self_attend(ada_layer_norm(x, scale1, shift1, self.dim, self.eps))) * gamma1
        x = x + self.ca(self.ca_norm(x), text_k, text_v)
        return x + self.ffn(ada_layer_norm(x, scale2, shift2, self.dim, self.eps)) * gamma2

    def forward(
        self,
        x: torch.Tensor,  # [2, n, C]
        mod: torch.Tensor,  # [2, 6, C]
        cos: torch.Tensor,
        sin: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        prefix_k: torch.Tensor,  # [P, 2, H, c] (cache layout) keys attended before this call's own (P may be 0)
        prefix_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the new hidden state and this call's own k, v ([n, 2, H, c], cache layout)."""
        own: dict[str, torch.Tensor] = {}

        def attend(y: torch.Tensor) -> torch.Tensor:
            q, k, v = self.sa.qkv(y, cos, sin)
            own["k"], own["v"] = to_cache(k), to_cache(v)
            keys = torch.cat([prefix_k, own["k"]], dim=0)
            values = torch.cat([prefix_v, own["v"]], dim=0)
            return self.attention.over_cache(q, keys, values)

        x = self.mix(x, mod, text_k, text_v, attend)
        return x, own["k"], own["v"]


class TextAttentivePool(nn.Module):
    """One learned query per head attends over the normed text: the start token and AdaLN condition."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.pool_heads, cfg.pool_head_dim
        self.mat_q = nn.Parameter(torch.zeros(1, self.heads, self.head_dim))
        self.mat_kv = nn.Linear(cfg.text_channels, 2 * cfg.dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(cfg.dim))
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attention = EAGER  # (see CrossAttention)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        b, n, _ = text.shape
        bias = torch.cat([torch.zeros_like(self.v_bias), self.v_bias])
        kv = F.linear(text, self.mat_kv.weight, bias).view(b, n, 2, self.heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        q = self.mat_q.unsqueeze(2).expand(b, -1, -1, -1)  # [B, Hp, 1, cp]
        return self.proj(self.attention.text(q, k, v).reshape(b, -1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _PoolContainer(nn.Module):
    """Keeps the official key prefix `text_proj_for_sos.ca.*`."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ca = TextAttentivePool(cfg)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))


class VAREditTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = self.cfg = config.transformer
        self.schedule: Schedule = config.schedule
        c = cfg.dim
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, cfg.text_channels))
        self.text_norm = RMSNorm(cfg.text_channels, cfg.norm_eps)
        self.text_proj_for_sos = _PoolContainer(cfg)
        self.text_proj_for_ca = nn.Sequential(
            nn.Linear(cfg.text_channels, c), nn.GELU(approximate="tanh"), nn.Linear(c, c)
        )
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.lvl_embed = nn.Embedding(15, c)
        self.word_embed = nn.Linear(cfg.d_tok, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(c, cfg.num_logits)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

        cos, sin = rope_table(cfg.head_dim)
        self.register_buffer("rope_cos", constant(cos), persistent=False)
        self.register_buffer("rope_sin", constant(sin), persistent=False)
        self._register_sar_pooling()

    def _register_sar_pooling(self) -> None:
        """Separable area-pooling matrices from the source grid to each scale (SAR)."""
        src = self.schedule.source_side
        for s, side in enumerate(self.schedule.sides):
            self.register_buffer(f"sar_pool_{s}", constant(area_matrix(src, side)), persistent=False)

    # ------------------------------------------------------------------ text
    def text_condition(self, text_features: torch.Tensor) -> TextCondition:
        """text_features [1, Lt, Ct5] (real tokens only) -> TextCondition."""
        lt = text_features.shape[1]
        text = torch.cat([text_features, self.cfg_uncond[:lt].unsqueeze(0)], dim=0)
        text = self.text_norm(text)
        pooled = self.text_proj_for_sos.ca(text)  # [2, C]
        ca_kv = self.text_proj_for_ca(text)  # [2, Lt, C]
        with fp32_region(pooled):
            shared = self.shared_ada_lin(pooled.float()).view(2, 6, -1)
            head_modulation = self.head_nm.ada_lin(pooled.float()).view(2, 2, -1)
        modulation = torch.stack([blk.ada_gss.view(6, -1) + shared for blk in self.blocks])
        start = pooled.unsqueeze(1) + self.pos_start + self.lvl_embed.weight[0]
        kvs = [blk.ca.text_kv(ca_kv) for blk in self.blocks]
        text_k = torch.stack([k for k, _ in kvs])
        text_v = torch.stack([v for _, v in kvs])
        return TextCondition(start, modulation, head_modulation, text_k, text_v)

    # ---------------------------------------------------------------- source
    def source_pass(self, source_prefix: torch.Tensor, cond: TextCondition) -> SourceKV:
        """Source prefix [1, L_src, d_tok] -> every layer's source K/V and the SAR references.

        A step over the source tokens (finest level embedding) with an empty past and an empty
        SAR: the same blocks and weights as every scale. Its logits are never used: running the
        last block whole and the head on the source tokens is under 1% of an edit's FLOPs (0.7%
        at 2B-512, 0.5% at 8B; benchmarks/RESULTS.md)."""
        x = self.embed_tokens(source_prefix, self.schedule.num_scales - 1)
        empty = x.new_zeros(0, 2, self.cfg.heads, self.cfg.head_dim)
        depth = len(self.blocks)
        _, layer_k, layer_v = self.step(x, cond.modulation, cond.head_modulation, cond.text_k, cond.text_v,
                                        empty, empty, [empty] * depth, [empty] * depth)
        sar_k, sar_v = self.sar_pool(layer_k[0], layer_v[0])
        return SourceKV(sar_k, sar_v, layer_k, layer_v)

    def sar_pool(self, source_k: torch.Tensor, source_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 0's source K/V [L_src, 2, H, c] -> the SAR references [sum n_s, 2, H, c] of every scale."""
        return self._pool_to_scales(to_heads(source_k)), self._pool_to_scales(to_heads(source_v))

    def _pool_to_scales(self, x: torch.Tensor) -> torch.Tensor:
        """[2, H, L_src, c] -> [sum n_s, 2, H, c]: area-pooled to every scale, cache layout.

        Pools in fp32 and rounds once to the input's dtype, as `F.interpolate(mode='area')` does on bf16 K/V,
        with autocast off: a source pass under bf16 autocast (the official run) must not round the pooling
        products to bf16."""
        b, h, _, c = x.shape
        side = self.schedule.source_side
        grid = x.float().reshape(b, h, side, side, c)
        pooled = []
        with fp32_region(x):
            for s in range(self.schedule.num_scales):
                p = getattr(self, f"sar_pool_{s}")  # [side_s, side]
                y = torch.matmul(p, grid.transpose(2, 4))  # pool columns -> [b, h, c, cols_s, rows]
                y = torch.matmul(p, y.transpose(3, 4))  # pool rows -> [b, h, c, rows_s, cols_s]
                y = y.permute(0, 1, 3, 4, 2).reshape(b, h, -1, c)  # [b, h, n_s, c], row-major
                pooled.append(to_cache(y))
        return torch.cat(pooled, dim=0).to(x.dtype)

    # ------------------------------------------------------------------ step
    def step(
        self,
        x: torch.Tensor,  # [2, n, C]: embedded input of this scale
        modulation: torch.Tensor,
        head_modulation: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        sar_k: torch.Tensor,  # [n, 2, H, c]: this scale's pooled source reference (0 rows: source pass)
        sar_v: torch.Tensor,
        past_k: list[torch.Tensor],  # per layer [P_i, 2, H, c]; P_0 = cum_{s-1}, P_i = L_src + cum_{s-1}
        past_v: list[torch.Tensor],  # (the source pass: P_i = 0 everywhere)
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """One scale (or the source pass): logits [2, n, 2*d_tok] and the new K/V of every layer ([n, 2, H, c])."""
        n = x.shape[1]
        # Tokens before these in the flat sequence: L_src + cum_{s-1} at a scale, 0 in the source
        # pass; that is exactly layer 1's past length (depth >= 2 is checked in the config).
        cos, sin = self.step_rope(past_k[1].shape[0], n)
        new_k, new_v = [], []
        for i, blk in enumerate(self.blocks):
            prefix_k, prefix_v = past_k[i], past_v[i]
            if i == 0:  # SAR: the pooled source of this scale, then earlier targets
                prefix_k, prefix_v = torch.cat([sar_k, prefix_k]), torch.cat([sar_v, prefix_v])
            x, k, v = blk(x, modulation[i], cos, sin, text_k[i], text_v[i], prefix_k, prefix_v)
            new_k.append(k)
            new_v.append(v)
        return self.logits(x, head_modulation), new_k, new_v

    def step_rope(self, offset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of `n` tokens that start at flat sequence offset `offset` (spec 3.6)."""
        return self.rope_cos[offset : offset + n], self.rope_sin[offset : offset + n]

    def logits(self, x: torch.Tensor, head_modulation: torch.Tensor) -> torch.Tensor:
        """AdaLN before the head, then the bit-pair logits [2, n, 2*d_tok] (fp32 in the official code)."""
        scale, shift = head_modulation.unsqueeze(1).unbind(2)
        with fp32_region(x):
            return self.head(ada_layer_norm(x.float(), scale, shift, self.cfg.dim, self.cfg.norm_eps))

    def embed_tokens(self, tokens: torch.Tensor, scale: int) -> torch.Tensor:
        """Next-scale input [1, n, d_tok] -> embedded step input [2, n, C] for `scale`."""
        return (self.word_embed(tokens) + self.lvl_embed.weight[scale]).expand(2, -1, -1)
