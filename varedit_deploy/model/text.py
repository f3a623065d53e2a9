"""The Flan-T5 text path (docs/spec/vae-text.md 4): tokenizer and encoder through transformers.

Only the real tokens (instruction pieces + `</s>`) are encoded: T5 has relative positions
only and padded keys get zero weight, so the official 512-token padding changes nothing at
the valid positions and costs up to 512/L times the work. Precision "fp16" mirrors the
official load (fp16 weights, the FFN `wo` kept in fp32 by transformers); "bf16" and "fp32"
are the alternatives.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, InputError, require

MAX_TOKENS = 512
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _transformers():
    transformers = require("transformers", "export")
    transformers.utils.logging.disable_progress_bar()
    return transformers


def dtype_argument(version: str) -> str:
    """The `from_pretrained` keyword for the weights' dtype: transformers 4.56 renamed `torch_dtype`
    to `dtype`; older versions store an unknown `dtype` in the config, which then fails to save."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_tokenizer(folder: str | Path):
    """AutoTokenizer as the official code loads it (legacy=True, model_max_length 512)."""
    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(folder), legacy=True)
    except Exception as e:
        raise CheckpointError(f"tokenizer in {folder}: cannot be loaded ({type(e).__name__}: {e})") from None
    tok.model_max_length = MAX_TOKENS
    return tok


def tokenize(tokenizer, instruction: str) -> list[int]:
    """Instruction -> token ids including `</s>`; refuses empty and over-long instructions."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError("the instruction is empty; say what to change, e.g. 'make the sky purple'")
    ids = tokenizer(text=[instruction], truncation=False, add_special_tokens=True)["input_ids"][0]
    if len(ids) > MAX_TOKENS:
        raise InputError(
            f"the instruction is {len(ids)} tokens long; the text encoder takes at most {MAX_TOKENS} "
            "(including the end token): shorten it"
        )
    return list(ids)


class T5TextEncoder:
    """Tokenizer + T5 encoder; `encode(text)` -> [1, L, C] float32 features of the real tokens."""

    def __init__(self, folder: str | Path, precision: str = "fp16", device: str = "cpu"):
        if precision not in _DTYPES:
            raise CheckpointError(f"unknown text encoder precision {precision!r}; use one of {sorted(_DTYPES)}")
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"text encoder folder {folder}: no config.json (expected a flan-t5-xl folder)")
        tf = _transformers()
        self.tokenizer = load_tokenizer(folder)
        try:
            dtype = {dtype_argument(tf.__version__): _DTYPES[precision]}
            model = tf.T5EncoderModel.from_pretrained(str(folder), **dtype)
        except Exception as e:
            raise CheckpointError(f"text encoder in {folder}: cannot be loaded ({type(e).__name__}: {e})") from None
        self.model = model.to(device).eval()
        self.folder, self.precision, self.device = folder, precision, device

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    def tokenize(self, instruction: str) -> list[int]:
        return tokenize(self.tokenizer, instruction)

    @torch.inference_mode()
    def encode_ids(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.int64, device=self.device)
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        return out.last_hidden_state.float()

    def encode(self, instruction: str) -> torch.Tensor:
        return self.encode_ids(self.tokenize(instruction))


def t5_skeleton(folder: str | Path):
    """The float32 T5 encoder of `folder` with its parameters on `meta` (structure only)."""
    from .weights import params_on_meta

    tf = _transformers()
    with params_on_meta():
        model = tf.T5EncoderModel(tf.T5Config.from_pretrained(str(folder)))
    return model.float().eval()


def read_t5_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a transformers T5 folder, memory-mapped: `model.safetensors` or `pytorch_model.bin`,
    or either sharded with its index (google/flan-t5-xl ships both). Decoder weights come along unread."""
    import json

    from .checkpoint import read_state_file

    folder = Path(folder)
    for index in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json"):
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a shard index ({type(e).__name__}: {e})") from None
            return {k: v for shard in shards for k, v in read_state_file(folder / shard).items()}  # type: ignore[misc]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return dict(read_state_file(folder / name))  # type: ignore[arg-type]
    raise CheckpointError(f"text encoder folder {folder} has no weights (model.safetensors or pytorch_model.bin)")
