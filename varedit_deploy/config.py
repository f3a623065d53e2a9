"""Model presets, scale schedules and the strict loader for manifest configs.

Every hyper-parameter of a VAREdit release is written down here once (docs/spec/transformer.md
section 1, docs/spec/vae-text.md section 1); everything else derives from these dataclasses.
A golden fixture's config.json is read into the same classes by `fixtures.py`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Side lengths of the h/w = 1.0 schedule (infinity/utils/dynamic_resolution.py); an image size
# (the official `pn`, in megapixels) takes a prefix of them. VAREdit sets every t to 1, so a scale
# is just (1, side, side).
SQUARE_SIDES: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
SCALES_PER_MEGAPIXELS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


@dataclass(frozen=True)
class Schedule:
    """The token grid of every scale, and the VAE latent grid it maps to."""

    sides: tuple[int, ...]
    vae_factor: int = 1  # 2 for spatially patchified (8B) models: VAE grid = 2x token grid

    @classmethod
    def from_megapixels(cls, megapixels: str, vae_factor: int = 1) -> "Schedule":
        if megapixels not in SCALES_PER_MEGAPIXELS:
            raise ConfigError(f"unknown image size {megapixels!r} (the official pn); expected one of "
                              f"{sorted(SCALES_PER_MEGAPIXELS)}")
        return cls(SQUARE_SIDES[: SCALES_PER_MEGAPIXELS[megapixels]], vae_factor)

    @property
    def num_scales(self) -> int:
        return len(self.sides)

    @property
    def tokens(self) -> tuple[int, ...]:
        """n_s: tokens of each scale."""
        return tuple(s * s for s in self.sides)

    @property
    def starts(self) -> tuple[int, ...]:
        """cum_{s-1}: target tokens before scale s."""
        out, acc = [], 0
        for n in self.tokens:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def source_side(self) -> int:
        return self.sides[-1]

    @property
    def source_tokens(self) -> int:
        """L_src: the source prefix has the finest token grid."""
        return self.sides[-1] ** 2

    def vae_side(self, scale: int) -> int:
        return self.sides[scale] * self.vae_factor

    @property
    def latent_side(self) -> int:
        return self.vae_side(self.num_scales - 1)

    def as_triples(self) -> list[list[int]]:
        return [[1, s, s] for s in self.sides]

    def vae_triples(self) -> list[list[int]]:
        return [[1, s * self.vae_factor, s * self.vae_factor] for s in self.sides]


@dataclass(frozen=True)
class TransformerConfig:
    """The Infinity-style transformer (docs/spec/transformer.md 1.1)."""

    depth: int
    dim: int
    heads: int
    codebook_dim: int
    patchify: bool
    text_channels: int = 2048
    text_maxlen: int = 512
    block_chunks: int = 8
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.depth < 2:  # the step reads its RoPE offset from layer 1's past (model/transformer.py)
            raise ConfigError(f"depth {self.depth}: VAREdit models have at least 2 blocks")
        if self.dim % self.heads:
            raise ConfigError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.text_channels % 128:
            raise ConfigError(f"text_channels {self.text_channels} must be a multiple of 128")
        if self.dim % self.pool_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by the {self.pool_heads} text-pool heads "
                              f"(text_channels {self.text_channels} / 128)")
        if (self.head_dim // 2) % 2:
            raise ConfigError(f"head dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def d_tok(self) -> int:
        """Bits per transformer token (4x the VAE code dim under 2x2 spatial patchify)."""
        return self.codebook_dim * (4 if self.patchify else 1)

    @property
    def num_logits(self) -> int:
        return 2 * self.d_tok

    @property
    def mlp_hidden(self) -> int:
        return round(self.dim * 4 / 256) * 256

    @property
    def pool_heads(self) -> int:
        """Heads of the text attention pool (TextAttentivePool)."""
        return self.text_channels // (128 if self.dim <= 4096 else 64)

    @property
    def pool_head_dim(self) -> int:
        return self.dim // self.pool_heads


@dataclass(frozen=True)
class VAEConfig:
    """The BSQ-VAE (docs/spec/vae-text.md 1.1-1.4)."""

    codebook_dim: int
    base_ch: int = 128
    num_res_blocks: int = 2
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    patch_size: int = 16

    def __post_init__(self) -> None:
        if 2 ** (len(self.ch_mult) - 1) != self.patch_size:
            raise ConfigError(
                f"VAE ch_mult {self.ch_mult} gives stride {2 ** (len(self.ch_mult) - 1)}, "
                f"not patch size {self.patch_size}"
            )
        if any((self.base_ch * m) % 32 for m in self.ch_mult):
            raise ConfigError("every VAE channel count must be divisible by 32 (GroupNorm)")


# What a sampling option may be (README "Limits"), checked wherever options are made: the CLI,
# the API and manifests all build a SamplingConfig. Official defaults: cfg 3-4, tau 0.1-1.
SEED_MAX = 2**63 - 1  # one seed for every backend and noise source (numpy and torch both take it)
SAMPLING_RANGES: dict[str, tuple[float, float, bool]] = {  # option: low, high, low included
    "cfg": (0.0, 20.0, True),  # 1 turns guidance off; far above 20 the logits only saturate
    "tau": (0.001, 10.0, True),  # below 0.001 sampling is greedy already; above 10 it is noise
    "top_p": (0.0, 1.0, False),
}


def sampling_range(name: str) -> str:
    """The accepted interval of a sampling option, as text: '[0, 20]', '(0, 1]'."""
    lo, hi, closed = SAMPLING_RANGES[name]
    return f"{'[' if closed else '('}{lo:g}, {hi:g}]"


def check_sampling_option(name: str, value: object) -> float:
    """`value` as a float if it is a finite number in the option's range; ConfigError otherwise."""
    lo, hi, closed = SAMPLING_RANGES[name]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (lo <= value if closed else lo < value) and value <= hi):  # type: ignore[operator]
        raise ConfigError(f"{name} must be a finite number in {sampling_range(name)}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_seed(seed: object) -> int:
    """`seed` as an int if it is an integer in [0, 2**63 - 1]; ConfigError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class SamplingConfig:
    """Per-edit generation options (the official loop uses the same cfg and tau at every scale)."""

    cfg: float = 4.0
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97
    seed: int = 0

    def __post_init__(self) -> None:
        for name in SAMPLING_RANGES:
            check_sampling_option(name, getattr(self, name))
        check_seed(self.seed)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ConfigError(f"top_k must be a non-negative integer, got {self.top_k!r}")


@dataclass(frozen=True)
class ModelConfig:
    """One VAREdit model at one resolution: transformer, VAE, schedule and release file names."""

    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    megapixels: str  # the official `pn`: "0.25M" for 512 px, "1M" for 1024 px (SCALES_PER_MEGAPIXELS)
    transformer_file: str | None = None
    vae_file: str | None = None
    text_encoder_dir: str | None = "flan-t5-xl"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.transformer.codebook_dim != self.vae.codebook_dim:
            raise ConfigError("transformer and VAE disagree on codebook_dim")

    @property
    def schedule(self) -> Schedule:
        return Schedule.from_megapixels(self.megapixels, 2 if self.transformer.patchify else 1)

    @property
    def image_size(self) -> int:
        return self.schedule.latent_side * self.vae.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`, strict about unknown and missing keys."""
        data = dict(data)
        try:
            tcfg = _strict(TransformerConfig, data.pop("transformer"), "transformer")
            vdata = dict(data.pop("vae"))
            vdata["ch_mult"] = tuple(vdata.get("ch_mult", ()))
            vcfg = _strict(VAEConfig, vdata, "vae")
            scfg = _strict(SamplingConfig, data.pop("sampling", {}), "sampling")
        except KeyError as e:
            raise ConfigError(f"model config lacks the section {e}") from None
        return _strict(cls, {**data, "transformer": tcfg, "vae": vcfg, "sampling": scfg}, "model")


def _strict(kind: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    try:
        return kind(**data)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _release(
    name: str, *, depth: int, dim: int, heads: int, megapixels: str, patchified: bool, transformer_file: str
) -> ModelConfig:
    """A released model: 2B (32-bit codes, VAE patch 16) or 8B (14-bit codes, 2x2 patchified, VAE patch 8)."""
    code = 14 if patchified else 32
    return ModelConfig(
        name=name,
        transformer=TransformerConfig(depth=depth, dim=dim, heads=heads, codebook_dim=code, patchify=patchified),
        vae=VAEConfig(
            codebook_dim=code,
            ch_mult=(1, 2, 4, 4) if patchified else (1, 2, 4, 4, 4),
            patch_size=8 if patchified else 16,
        ),
        megapixels=megapixels,
        transformer_file=transformer_file,
        vae_file="infinity_vae_d56_f8_14_patchify.pth" if patchified else "infinity_vae_d32reg.pth",
    )


def _tiny(name: str, *, patchified: bool, depth: int, dim: int = 64, heads: int = 2) -> ModelConfig:
    """Small random-weight models shaped like the releases (fixture sizes), for tests and demos."""
    code = 14 if patchified else 16
    return ModelConfig(
        name=name,
        transformer=TransformerConfig(
            depth=depth, dim=dim, heads=heads, codebook_dim=code, patchify=patchified,
            text_channels=256, block_chunks=depth,
        ),
        vae=VAEConfig(
            codebook_dim=code, base_ch=32, num_res_blocks=1,
            ch_mult=(1, 2, 4, 4) if patchified else (1, 2, 4, 4, 4), patch_size=8 if patchified else 16,
        ),
        megapixels="0.06M",
        text_encoder_dir=None,
        sampling=SamplingConfig(cfg=3.0, tau=1.0, seed=0),
    )


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _release("2b-512", depth=32, dim=2048, heads=16, megapixels="0.25M", patchified=False,
                 transformer_file="2B-512.pth"),
        _release("8b-512", depth=40, dim=3584, heads=28, megapixels="0.25M", patchified=True,
                 transformer_file="8B-512.pth"),
        _release("8b-1024", depth=40, dim=3584, heads=28, megapixels="1M", patchified=True,
                 transformer_file="8B-1024.pth"),
        _tiny("tiny-2b", patchified=False, depth=3),
        _tiny("tiny-8b", patchified=True, depth=2),
    )
}


def from_name(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(PRESETS)}")
    return PRESETS[key]
