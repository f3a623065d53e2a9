import math

import pytest
import torch
import torch.nn.functional as F

from varedit_deploy.config import from_name
from varedit_deploy.model.codes import (
    NextScaleInput, bits_to_codes, latent_to_tokens, pixel_shuffle2, pixel_unshuffle2, tokens_to_latent,
)


def test_pixel_shuffle_matches_torch_channel_order():
    x = torch.randn(1, 14, 8, 6)
    assert torch.equal(pixel_unshuffle2(x), F.pixel_unshuffle(x, 2))
    y = torch.randn(1, 56, 3, 5)
    assert torch.equal(pixel_shuffle2(y), F.pixel_shuffle(y, 2))
    assert torch.equal(pixel_shuffle2(pixel_unshuffle2(x)), x)


@pytest.mark.parametrize("patchify", [False, True])
def test_tokens_latent_round_trip(patchify):
    latent = torch.randn(1, 14, 8, 8)
    tokens = latent_to_tokens(latent, patchify)
    side = 4 if patchify else 8
    assert tokens.shape == (1, side * side, 56 if patchify else 14)
    assert torch.equal(tokens_to_latent(tokens, side, patchify), latent)


def test_bits_to_codes_values():
    codes = bits_to_codes(torch.tensor([0, 1]), 32)
    assert torch.allclose(codes, torch.tensor([-1, 1]) / math.sqrt(32), atol=3e-8, rtol=0)


def _official_next_scale(bits, summed5, config, s):
    """The official loop (spec 3.11) with 5-D trilinear interpolation, written independently."""
    sched = config.schedule
    side = sched.sides[s]
    b = bits.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if config.transformer.patchify:
        b = F.pixel_shuffle(b, 2)
    d = config.transformer.codebook_dim
    codes = (b.float() * 2 / math.sqrt(d) - 1 / math.sqrt(d)).unsqueeze(2)
    full = (1, sched.latent_side, sched.latent_side)
    if s == sched.num_scales - 1:
        return summed5 + codes, None
    summed5 = summed5 + F.interpolate(codes, size=full, mode="trilinear")
    nxt = F.interpolate(summed5, size=(1, sched.vae_side(s + 1), sched.vae_side(s + 1)), mode="trilinear")[:, :, 0]
    if config.transformer.patchify:
        nxt = F.pixel_unshuffle(nxt, 2)
    return summed5, nxt.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("name", ["2b-512", "8b-1024"])
def test_next_scale_input_equals_official_trilinear_loop(name):
    config = from_name(name)
    sched = config.schedule
    g = torch.Generator().manual_seed(0)
    d = config.transformer.codebook_dim
    ours = torch.zeros(1, d, sched.latent_side, sched.latent_side)
    ref = ours.unsqueeze(2)
    for s, n in enumerate(sched.tokens):
        bits = torch.randint(0, 2, (1, n, config.transformer.d_tok), generator=g)
        ours, tok = NextScaleInput(config, s)(bits, ours)
        ref, ref_tok = _official_next_scale(bits, ref, config, s)
        assert torch.allclose(ours, ref[:, :, 0], atol=1e-6, rtol=0)
        if ref_tok is None:
            assert tok is None
        else:
            assert torch.allclose(tok, ref_tok, atol=1e-6, rtol=0)
