"""Loading the official release files strictly (docs/spec/transformer.md 5, docs/spec/vae-text.md 1.7).

The official loaders are non-strict: a renamed or misshaped tensor silently stays random.
Ours maps the official names onto our modules and then fails on any missing or misshaped
tensor, naming each one; unknown tensors fail too, except inside a VAE file's `vae` dict,
which the official loader reads leniently (we name what was ignored, in a note).

Release folder layout (as published): `2B-512.pth`, `8B-512.pth`, `8B-1024.pth`,
`infinity_vae_d32reg.pth`, `infinity_vae_d56_f8_14_patchify.pth`, `flan-t5-xl/`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError

# Nesting keys seen in trainer checkpoints; we descend through them to the flat state dict.
_NESTING_KEYS = ("trainer", "gpt_fsdp", "gpt_wo_ddp", "model", "state_dict", "module", "gpt")
# Key prefixes of wrapped modules: DDP (`module.`) and torch.compile (`_orig_mod.`), in any order.
_WRAPPER_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")
# Buffers the official Infinity.load_state_dict drops.
_DROPPED_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
_CHUNK_KEY = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_VAE_WRAPPER = re.compile(r"\.(conv|norm)\.(weight|bias)$")
_log = logging.getLogger(__name__)  # unconfigured, a warning reaches stderr as its bare message


def read_state_file(path: str | Path) -> Mapping[str, object]:
    """A `.pth` (torch.save) or `.safetensors` file -> its top-level dict, on the CPU.

    Both are memory-mapped: a tensor costs memory only when it is read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch/safetensors raise many types for corrupt files
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of tensors (a state dict)")
    return state


def unnest(state: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    """Descend through trainer nesting to the dict of tensors; strip `module.`/`_orig_mod.` prefixes."""
    while not any(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in _NESTING_KEYS if isinstance(state.get(k), Mapping)), None)
        if key is None:
            raise CheckpointError(f"{source}: no state dict found (top-level keys: {sorted(state)[:10]})")
        state = state[key]  # type: ignore[assignment]
    return {_WRAPPER_PREFIX.sub("", k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _block_index_map(keys: list[str]) -> dict[tuple[int, int], int]:
    """(chunk, index in chunk) -> block index, for any chunk count: chunks are consecutive."""
    pairs = sorted({(int(m[1]), int(m[2])) for k in keys if (m := _CHUNK_KEY.match(k))})
    return {pair: i for i, pair in enumerate(pairs)}


def official_to_ours_transformer(state: dict[str, torch.Tensor], text_maxlen: int) -> dict[str, torch.Tensor]:
    """Official Infinity names -> ours (`block_chunks.{k}.module.{j}` -> `blocks.{i}`)."""
    index = _block_index_map(list(state))
    out = {}
    for key, value in state.items():
        if key.endswith("zero_k_bias") or key.split(".")[-1] in _DROPPED_BUFFERS:
            continue
        if m := _CHUNK_KEY.match(key):
            key = f"blocks.{index[(int(m[1]), int(m[2]))]}.{m[3]}"
        out[key] = value
    if "cfg_uncond" in out:  # the official loader pads (with its initial rows) or truncates to text_maxlen
        rows = out["cfg_uncond"]
        if rows.shape[0] < text_maxlen:
            rows = torch.cat([rows, official_uncond_init(text_maxlen, rows.shape[1])[rows.shape[0]:].to(rows.dtype)])
        out["cfg_uncond"] = rows[:text_maxlen]
    return out


def official_uncond_init(text_maxlen: int, channels: int) -> torch.Tensor:
    """`cfg_uncond` as `Infinity.__init__` makes it: trunc-normal, std 1.2, bounds +-2, from a CPU
    generator seeded 0, divided by sqrt(channels) (docs/spec/vae-text.md 4); the official loader pads
    a shorter checkpoint tensor with its trailing rows."""
    rows = torch.empty(text_maxlen, channels)
    torch.nn.init.trunc_normal_(rows, std=1.2, generator=torch.Generator().manual_seed(0))
    return rows / channels**0.5


def ours_to_official_transformer(state: Mapping[str, torch.Tensor], chunks: int) -> dict[str, torch.Tensor]:
    """Our names -> the official layout with `chunks` block chunks and the zero_k_bias buffers."""
    depth = 1 + max(int(m[1]) for k in state if (m := _BLOCK_KEY.match(k)))
    if depth % chunks:
        raise ValueError(f"depth {depth} does not split into {chunks} chunks")
    per = depth // chunks
    out = {}
    for key, value in state.items():
        if m := _BLOCK_KEY.match(key):
            i, rest = int(m[1]), m[2]
            key = f"block_chunks.{i // per}.module.{i % per}.{rest}"
            if rest in ("sa.v_bias", "ca.v_bias"):
                out[key.replace("v_bias", "zero_k_bias")] = torch.zeros_like(value)
        out[key] = value
    out["text_proj_for_sos.ca.zero_k_bias"] = torch.zeros_like(state["text_proj_for_sos.ca.v_bias"])
    return out


def official_to_ours_vae(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Accept both official spellings (`x.conv.weight` wrapper and plain `x.weight`); drop the masks."""
    out = {}
    for key, value in state.items():
        if key.endswith("lfq.mask"):
            continue  # recomputable buffer, aliased under quantizer./quantize.
        if key not in expected:
            plain = _VAE_WRAPPER.sub(r".\2", key)
            if plain in expected:
                key = plain
        out[key] = value
    return out


def _expected(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state names, a tied tensor (T5's shared embedding) under its first name only."""
    seen, out = set(), {}
    for k, v in module.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = v
    return out


def check_state(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Fail with the name of every missing, unknown or misshaped tensor of `state` for `module`."""
    expected = _expected(module)
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unknown", unknown), ("misshaped", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match the model configuration; " + "; ".join(problems))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Put `state` into `module` after `check_state`."""
    check_state(module, state, source)
    expected = _expected(module)
    # assign: the module takes the (memory-mapped) tensors themselves; a dtype change converts one tensor
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)


def load_transformer_weights(model: nn.Module, raw: Mapping[str, object], text_maxlen: int, source: str) -> None:
    load_strict(model, official_to_ours_transformer(unnest(raw, source), text_maxlen), source)


def load_vae_weights(model: nn.Module, raw: Mapping[str, object], source: str) -> None:
    load_strict(model, vae_state(raw, source, set(model.state_dict())), source)


def vae_state(raw: Mapping[str, object], source: str, model_keys: set[str]) -> dict[str, torch.Tensor]:
    """The VAE's tensors in our names: from a release file's `vae` dict leniently about unknown
    tensors (ignored and named once, as the official `load_cnn` ignores them), from anything else
    as it is (a strict load then names every unknown tensor)."""
    release = isinstance(raw.get("vae"), Mapping)
    state = official_to_ours_vae(unnest(raw["vae"] if release else raw, source), model_keys)  # type: ignore[arg-type]
    ignored = sorted(set(state) - model_keys) if release else []
    if ignored:
        shown = ", ".join(ignored[:8]) + (", ..." if len(ignored) > 8 else "")
        _log.warning(f"note: {source}: ignored {len(ignored)} tensors the VAE does not have, as the official "
                     f"loader does: {shown}")
    return {k: v for k, v in state.items() if k not in ignored}


@dataclass(frozen=True)
class ReleaseFiles:
    """Where one model's files sit in a release folder."""

    transformer: Path
    vae: Path
    text_encoder: Path | None

    @classmethod
    def locate(cls, folder: str | Path, config: ModelConfig, need_text_encoder: bool = True) -> "ReleaseFiles":
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder}: no such folder")
        if config.transformer_file is None or config.vae_file is None:
            raise CheckpointError(f"model {config.name} has no release files; use a preset such as 2b-512")
        paths = {"transformer": folder / config.transformer_file, "vae": folder / config.vae_file}
        text = folder / config.text_encoder_dir if config.text_encoder_dir and need_text_encoder else None
        if text is not None:
            paths["text encoder"] = text / "config.json"
        lacking = [f"{what} ({p})" for what, p in paths.items() if not p.exists()]
        if lacking:
            raise CheckpointError(f"checkpoint folder {folder} lacks files for {config.name}: " + ", ".join(lacking))
        return cls(paths["transformer"], paths["vae"], text)
