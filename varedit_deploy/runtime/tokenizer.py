"""Instruction -> T5 token ids without torch or transformers (the `tokenizers` library alone).

The artifact ships `tokenizer.json`, the file the official T5TokenizerFast runs, so ids
(special-token strings, normalisation, the appended `</s>`) are identical to the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ArtifactError, InputError, missing_dependency


class Tokenizer:
    def __init__(self, path: Path, max_tokens: int = 512):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise missing_dependency("tokenizers", "ort") from None
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ArtifactError(f"tokenizer {path}: cannot be loaded ({e})") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_tokens = max_tokens

    def encode(self, instruction: str) -> np.ndarray:
        """[1, L] int64 ids including `</s>`; refuses empty and over-long instructions."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise InputError("the instruction is empty; say what to change, e.g. 'make the sky purple'")
        ids = self._tok.encode(instruction, add_special_tokens=True).ids
        if len(ids) > self.max_tokens:
            raise InputError(
                f"the instruction is {len(ids)} tokens long; the text encoder takes at most {self.max_tokens} "
                "(including the end token): shorten it"
            )
        return np.asarray([ids], dtype=np.int64)
