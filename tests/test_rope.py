import numpy as np
import torch

import spec_oracles
from varedit_deploy.model.rope import _table_positions, apply_rope, rope_table


def test_table_layout_and_the_512px_quirk():
    pos = _table_positions()
    assert len(pos) == 4096 + 10521
    assert tuple(pos[0]) == (64, 64) and tuple(pos[4095]) == (127, 127)
    # At 512 px every offset < 4096 reads the source block: SOS (e = 1024) and the last token.
    assert tuple(pos[1024]) == (80, 64)
    assert tuple(pos[3544]) == (119, 88)
    # 1024 px targets sit at star-normalised positions in [0, 64): scale 64 is the identity grid.
    last = pos[4096 + 6425 :]
    assert last[:, 0].max() == 63 and tuple(last[65]) == (1, 1)
    cos, sin = rope_table(128)
    assert cos.shape == (14720, 64) and cos.shape[0] % 128 == 0
    assert torch.all(cos[14617:] == 0) and torch.all(sin[14617:] == 0)


def test_rotation_is_interleaved_pairs_and_preserves_norm():
    cos, sin = rope_table(32)
    x = torch.randn(2, 3, 5, 32)
    y = apply_rope(x, cos[100:105], sin[100:105])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    angle = torch.atan2(sin[100, 0], cos[100, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    assert torch.allclose(y[..., 0, 0], c * x[..., 0, 0] - s * x[..., 0, 1], atol=1e-6)
    assert torch.allclose(y[..., 0, 1], s * x[..., 0, 0] + c * x[..., 0, 1], atol=1e-6)


def test_table_equals_the_spec_formula_at_every_entry():
    """Oracle: docs/spec/transformer.md 3.6 in float64 (positions by integer rounding), all 14,617
    entries, the 1024-px targets included. The official table computes the angles in float32:
    up to 127 rad times a float32-rounded frequency, so about 1e-5 apart at most."""
    cos, sin = rope_table(128)
    angles = spec_oracles.rope_angles(128)
    assert angles.shape == (14617, 64)
    assert np.abs(cos[:14617].double().numpy() - np.cos(angles)).max() < 2e-5
    assert np.abs(sin[:14617].double().numpy() - np.sin(angles)).max() < 2e-5
    assert cos.shape == (14720, 64) and torch.all(cos[14617:] == 0) and torch.all(sin[14617:] == 0)
    small = rope_table(32)[0][:14617].double().numpy()  # another head size, other frequencies
    assert np.abs(small - np.cos(spec_oracles.rope_angles(32))).max() < 2e-5
