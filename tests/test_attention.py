"""Self-attention of shapes no fixture has (4 heads of 32, 7 heads of 16), against the spec head by head."""

import pytest
import torch

import spec_oracles
from varedit_deploy.config import TransformerConfig
from varedit_deploy.model.attention import cache_self_attention, self_attention
from varedit_deploy.model.rope import rope_table
from varedit_deploy.model.transformer import SelfAttention, to_cache


@pytest.mark.parametrize("dim, heads, offset", [(128, 4, 4096 + 6425), (112, 7, 1000)])
def test_self_attention_equals_the_per_head_spec(dim, heads, offset):
    """Oracle: spec_oracles.cosine_self_attention (per-head row slices of mat_qkv, float64 RoPE
    angles from the spec's position formula). `offset` picks the table rows: 1024 px's last
    scale, or a 512-px-style source-block offset."""
    cfg = TransformerConfig(depth=2, dim=dim, heads=heads, codebook_dim=14, patchify=True, text_channels=256)
    g = torch.Generator().manual_seed(dim)
    sa = SelfAttention(cfg).double()
    with torch.no_grad():
        for p in sa.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        sa.scale_mul_1H11[0, 0] = 5.5  # above ln 100: this head's temperature is clamped to 100
    n = 48
    x = torch.randn(2, n, dim, generator=g, dtype=torch.float64)
    cos, sin = (t[offset:offset + n].double() for t in rope_table(cfg.head_dim))
    with torch.no_grad():
        q, k, v = sa.qkv(x, cos, sin)
        ours = self_attention(q, k, v).transpose(1, 2).reshape(2, n, dim)
        assert torch.equal(cache_self_attention(q, to_cache(k), to_cache(v)), ours)  # the step's form: cache layout
    angles = torch.from_numpy(spec_oracles.rope_angles(cfg.head_dim, range(offset, offset + n)))
    ref = spec_oracles.cosine_self_attention(x, sa.mat_qkv.weight.detach(), sa.q_bias.detach(),
                                             sa.v_bias.detach(), sa.scale_mul_1H11.detach().view(-1), heads, angles)
    # The table's angles are float32 (spec 3.6), the oracle's float64: about 1e-7 apart at
    # temperature 4, 3e-5 with a head at the clamp (temperature 100 sharpens the softmax). A
    # layout error (wrong head rows, pairs, bias or clamp) is of the order of the output, 1 to 10.
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), float((ours - ref).abs().max())
