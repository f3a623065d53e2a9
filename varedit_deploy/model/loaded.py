"""A loaded VAREdit model: transformer, VAE and (optionally) text encoder, from any source.

Sources: a release folder (official `.pth` files + `flan-t5-xl/`), a fixture folder
(safetensors in the official layout + config.json, no T5), or random weights of any config
(tiny presets for tests and demos).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from ..errors import CheckpointError
from ..fixtures import load_fixture_config, weight_files
from .checkpoint import ReleaseFiles, load_transformer_weights, load_vae_weights, read_state_file
from .text import T5TextEncoder
from .transformer import VAREditTransformer
from .vae import BSQVAE
from .weights import params_on_meta, randomize


@dataclass
class VAREditModel:
    config: ModelConfig
    transformer: VAREditTransformer
    vae: BSQVAE
    text_encoder: T5TextEncoder | None = None

    @classmethod
    def from_release(
        cls, folder: str | Path, config: ModelConfig, text_precision: str = "fp16", with_text_encoder: bool = True
    ) -> "VAREditModel":
        """Parameters are the checkpoint's memory-mapped tensors where their dtype is the model's,
        converted tensor by tensor where not: never a second copy of the model."""
        files = ReleaseFiles.locate(folder, config, need_text_encoder=with_text_encoder)
        model = cls.skeleton(config)
        load_transformer_weights(model.transformer, read_state_file(files.transformer),
                                 config.transformer.text_maxlen, str(files.transformer))
        load_vae_weights(model.vae, read_state_file(files.vae), str(files.vae))
        if files.text_encoder is not None:
            model.attach_text_encoder(files.text_encoder, text_precision)
        return model

    @classmethod
    def from_fixture(cls, folder: str | Path) -> "VAREditModel":
        """A golden fixture's model (fixtures.py reads the format)."""
        transformer_file, vae_file = weight_files(folder)
        config = load_fixture_config(Path(folder) / "config.json")
        model = cls.skeleton(config)
        load_transformer_weights(model.transformer, read_state_file(transformer_file), config.transformer.text_maxlen,
                                 str(transformer_file))
        load_vae_weights(model.vae, read_state_file(vae_file), str(vae_file))
        return model

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0) -> "VAREditModel":
        model = cls.empty(config)
        randomize(model.transformer, seed)
        randomize(model.vae, seed + 1)
        return model

    @classmethod
    def empty(cls, config: ModelConfig) -> "VAREditModel":
        return cls(config, VAREditTransformer(config).eval(), BSQVAE(config.vae).eval())

    @classmethod
    def skeleton(cls, config: ModelConfig) -> "VAREditModel":
        """The modules with their parameters on `meta`: structure only, until weights are assigned."""
        with params_on_meta():
            return cls.empty(config)

    def attach_text_encoder(self, folder: str | Path, precision: str = "fp16") -> None:
        encoder = T5TextEncoder(folder, precision)
        if encoder.width != self.config.transformer.text_channels:
            raise CheckpointError(
                f"text encoder in {folder} has width {encoder.width}, the transformer expects "
                f"{self.config.transformer.text_channels}"
            )
        self.text_encoder = encoder
