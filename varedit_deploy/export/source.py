"""What an export reads: the model's structure, and its weights one tensor at a time.

Three sources, one code path: a model already in memory (fixtures, tiny models), a release
folder (memory-mapped official checkpoints, names checked strictly before anything is written)
and random weights (drawn per tensor, by name, in the export's dtype). For the last two the
modules are skeletons with their parameters on `meta`: nothing of the model is held in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..model.checkpoint import ReleaseFiles, check_state, official_to_ours_transformer, read_state_file, unnest, vae_state
from ..model.loaded import VAREditModel
from ..model.text import read_t5_weights, t5_skeleton
from ..model.weights import RandomWeights

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportSource:
    model: VAREditModel  # the modules to trace (a skeleton with parameters on `meta` is enough)
    t5: nn.Module | None  # the float32 T5 encoder to trace (skeleton), None for fixtures
    text_folder: Path | None  # the tokenizer files to ship
    weights: dict[str, Mapping[str, torch.Tensor]]  # per module: our parameter name -> tensor (lazy)
    description: str

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @classmethod
    def from_model(cls, model: VAREditModel) -> "ExportSource":
        """A model in memory; its T5 (if any) is read again in float32 from its folder, as shipped."""
        weights: dict[str, Mapping[str, torch.Tensor]] = {
            "transformer": dict(model.transformer.named_parameters()), "vae": dict(model.vae.named_parameters())}
        t5 = folder = None
        if model.text_encoder is not None:
            folder = model.text_encoder.folder
            t5, weights["text_encoder"] = _t5(folder)
        return cls(model, t5, folder, weights, f"{model.config.name} in memory")

    @classmethod
    def from_release(cls, folder: str | Path, config: ModelConfig) -> "ExportSource":
        files = ReleaseFiles.locate(folder, config)
        model = VAREditModel.skeleton(config)
        tr = official_to_ours_transformer(unnest(read_state_file(files.transformer), str(files.transformer)),
                                          config.transformer.text_maxlen)
        check_state(model.transformer, tr, str(files.transformer))
        vae = vae_state(read_state_file(files.vae), str(files.vae), set(model.vae.state_dict()))
        check_state(model.vae, vae, str(files.vae))
        weights: dict[str, Mapping[str, torch.Tensor]] = {"transformer": tr, "vae": vae}
        t5 = None
        if files.text_encoder is not None:
            t5, weights["text_encoder"] = _t5(files.text_encoder)
        return cls(model, t5, files.text_encoder, weights, f"release files in {folder}")

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, text_folder: Path | None = None,
               precision: str = "fp32") -> "ExportSource":
        """Random weights (those of `VAREditModel.random(config, seed)`) drawn per tensor in the
        export precision; `text_folder` is a T5 folder (e.g. a tiny random one)."""
        model = VAREditModel.skeleton(config)
        dtype = TORCH_DTYPES[precision]
        weights: dict[str, Mapping[str, torch.Tensor]] = {"transformer": RandomWeights(model.transformer, seed, dtype),
                                                          "vae": RandomWeights(model.vae, seed + 1, dtype)}
        t5 = None
        if text_folder is not None:
            t5, weights["text_encoder"] = _t5(text_folder)
        return cls(model, t5, text_folder, weights, f"random weights of {config.name} (seed {seed})")

    def owners(self) -> dict[int, tuple[str, str]]:
        """id(parameter) -> (module, parameter name), for every module of the export."""
        modules = {"transformer": self.model.transformer, "vae": self.model.vae, "text_encoder": self.t5}
        return {id(p): (key, name) for key, m in modules.items() if m is not None
                for name, p in m.named_parameters()}

    def tensor(self, module: str, name: str) -> np.ndarray:
        """One parameter's values as float32 (a transient copy of that tensor alone)."""
        return self.weights[module][name].detach().to(torch.float32).numpy()



def _t5(folder: Path) -> tuple[nn.Module, Mapping[str, torch.Tensor]]:
    """The T5 skeleton and its weights, strictly matched (a full T5 checkpoint's decoder is ignored)."""
    t5 = t5_skeleton(folder)
    state = read_t5_weights(folder)
    ours = {k: state[k] for k, _ in t5.named_parameters() if k in state}
    check_state(t5, ours, f"text encoder in {folder}")
    return t5, ours
