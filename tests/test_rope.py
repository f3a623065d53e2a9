import torch

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
