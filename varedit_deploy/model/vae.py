"""The BSQ-VAE encoder and decoder (docs/spec/vae-text.md 1.2-1.4).

Plain convolutional nets: GroupNorm(32, eps 1e-6) + SiLU ResNet blocks, asymmetric-pad
stride-2 downsampling, nearest x2 upsampling, no attention. GroupNorm takes its statistics row
by row (`group_norm`) so that every backend keeps float32 accuracy at 1024 px. The encoder
returns only the raw latent (the official one also keeps every block output alive); the
quantizer has no parameters, so bits <-> codes live in `codes.py`. Parameter names are the official "plain"
spelling; the checkpoint loader also accepts the `.conv.`/`.norm.` wrapper spelling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.group_norm` on [B, C, H, W], with every mean taken over image rows first, then over the rows.

    A group at 1024 px holds about 1M values. ONNX Runtime's CPU kernels (InstanceNormalization,
    and ReduceMean over a whole group) sum them in a few long float32 runs and lose about 1e-5
    relative; a mean of W values per row, then a mean of those row means, keeps every sum at
    most a few thousand long (2e-7 relative, as accurate as torch: benchmarks/vae_group_norm.py).
    For equal-length rows the mean of row means is the group mean, so this is GroupNorm itself.
    Export traces it as ReduceMean/Sub/Pow/Sqrt/Div, which the fp16 lowering keeps in fp32
    (build/precision.py).
    """
    b, c, h, w = x.shape
    rows = x.reshape(b, groups, (c // groups) * h, w)
    mean = rows.mean(-1, keepdim=True).mean(-2, keepdim=True)
    centred = rows - mean
    var = centred.pow(2).mean(-1, keepdim=True).mean(-2, keepdim=True)
    normed = (centred / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return normed * weight[:, None, None] + bias[:, None, None]


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm's parameters and names (the checkpoints' layout), computed by `group_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _norm(ch: int) -> GroupNorm:
    return GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right/bottom only; never symmetric


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(name, resample)


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.block_2 = ResnetBlock(ch, ch), ResnetBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """Image [B, 3, S, S] in [-1, 1] -> raw latent [B, d, S/f, S/f] (no quantisation)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.base_ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.base_ch
        for i, cout in enumerate(chans):
            blocks = [ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)]
            last = i == len(chans) - 1
            self.down.append(_Level(blocks, None if last else Downsample(cout), "downsample"))
            cin = cout
        self.mid = _Mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Summed codes [B, d, h, w] -> image [B, 3, f*h, f*w], clamped to [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_ch * m for m in cfg.ch_mult]
        cin = chans[-1]
        self.conv_in = nn.Conv2d(cfg.codebook_dim, cin, 3, padding=1)
        self.mid = _Mid(cin)
        levels: list[nn.Module] = [None] * len(chans)  # type: ignore[list-item]
        for i in reversed(range(len(chans))):
            cout = chans[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1)]
            levels[i] = _Level(blocks, Upsample(cout) if i > 0 else None, "upsample")
            cin = cout
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level; runs last
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h))).clamp(-1.0, 1.0)


class BSQVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
