"""The golden fixture format, read in one place: config.json, the weights and the recorded tensors.

A fixture folder (made by the official VAREdit code on a small random-weight model; the shared
fixtures' README describes them) holds `config.json` (every hyper-parameter, in the official
names), `transformer.safetensors` and `vae.safetensors` (official key names), `inputs.safetensors`
(the preprocessed photo and stand-in text features) and `expected.safetensors` (what the official
code produced). Parity with them defines correct.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig, SamplingConfig, TransformerConfig, VAEConfig
from .errors import CheckpointError, ConfigError

WEIGHT_FILES = ("transformer.safetensors", "vae.safetensors")


# Keys of a fixture config.json that only describe the run or are derived from the others.
_FIXTURE_DERIVED = {"scale_schedule", "vae_scale_schedule", "resolution", "vae_patch_size",
                    "transformer_params", "vae_params", "torch_version", "text_len", "name"}
_FIXTURE_KEYS = {"pn", "codebook_dim", "patchify", "vae_base_ch", "vae_res_blocks", "depth", "dim",
                 "heads", "text_channels", "cfg", "tau", "top_k", "top_p", "seed", "vae_ch_mult",
                 "block_chunks", "text_maxlen"}


def load_fixture_config(path: str | Path) -> ModelConfig:
    """Read a fixture folder's config.json strictly."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    unknown = sorted(set(data) - _FIXTURE_KEYS - _FIXTURE_DERIVED)
    missing = sorted(_FIXTURE_KEYS - set(data))
    if unknown or missing:
        raise ConfigError(f"{path}: unknown keys {unknown}, missing keys {missing}")
    try:
        config = _fixture_model(data, path)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:  # a value of the wrong kind ("depth": "x")
        raise ConfigError(f"{path}: invalid values ({type(e).__name__}: {e})") from None
    _check_derived(config, data, path)
    return config


def _fixture_model(data: dict[str, Any], path: Path) -> ModelConfig:
    big = bool(data["patchify"])
    return ModelConfig(
        name=str(data.get("name", path.parent.name)),
        transformer=TransformerConfig(
            depth=data["depth"], dim=data["dim"], heads=data["heads"], codebook_dim=data["codebook_dim"],
            patchify=big, text_channels=data["text_channels"], text_maxlen=data["text_maxlen"],
            block_chunks=data["block_chunks"],
        ),
        vae=VAEConfig(
            codebook_dim=data["codebook_dim"], base_ch=data["vae_base_ch"],
            num_res_blocks=data["vae_res_blocks"], ch_mult=tuple(data["vae_ch_mult"]),
            patch_size=2 ** (len(data["vae_ch_mult"]) - 1),
        ),
        megapixels=data["pn"],
        text_encoder_dir=None,
        sampling=SamplingConfig(cfg=data["cfg"], tau=data["tau"], top_k=data["top_k"],
                                top_p=data["top_p"], seed=data["seed"]),
    )


def _check_derived(config: ModelConfig, data: dict[str, Any], path: Path) -> None:
    """A fixture's redundant fields must agree with what we derive, or our schedule is wrong."""
    sched = config.schedule
    checks = {
        "scale_schedule": sched.as_triples(),
        "vae_scale_schedule": sched.vae_triples(),
        "resolution": config.image_size,
        "vae_patch_size": config.vae.patch_size,
    }
    for key, derived in checks.items():
        if key in data and data[key] != derived:
            raise ConfigError(f"{path}: {key} is {data[key]}, but the config implies {derived}")


def weight_files(folder: str | Path) -> tuple[Path, Path]:
    """The transformer's and the VAE's weight files of a fixture folder, refused clearly when missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"fixture {folder}: no such folder")
    missing = [name for name in WEIGHT_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"fixture {folder} lacks {', '.join(missing)}")
    return folder / WEIGHT_FILES[0], folder / WEIGHT_FILES[1]


@dataclass
class FixtureData:
    """A fixture's config and its recorded tensors (inputs and what the official code produced)."""

    folder: Path
    config: ModelConfig
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]

    @classmethod
    def load(cls, folder: str | Path) -> "FixtureData":
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"fixture {folder}: no such folder")
        config = load_fixture_config(folder / "config.json")
        data = {}
        for name in ("inputs", "expected"):
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise ConfigError(f"fixture {folder} lacks {path.name}")
            data[name] = load_file(str(path))
        return cls(folder, config, data["inputs"], data["expected"])

    @property
    def text_features(self) -> np.ndarray:
        """The stand-in T5 features [1, Lt, Ct5] (real tokens only)."""
        lt = int(self.inputs["text_lens"][0])
        return self.inputs["text_features"][:lt][None].astype(np.float32)

    @property
    def pixels(self) -> np.ndarray:
        """The preprocessed source photo [1, 3, S, S] in [-1, 1]."""
        return self.inputs["source_tensor"][None]

    def teacher_bits(self) -> list[np.ndarray]:
        """The fixture's bits per scale in token layout [1, n, d_tok] (what the sampler emitted)."""
        d_tok = self.config.transformer.d_tok
        return [self.expected[f"sampled_{s}"].reshape(1, -1, d_tok) for s in range(self.config.schedule.num_scales)]
