"""A tiny T5 text encoder folder made on the spot (no downloads): sentencepiece + random T5.

It has the layout of a real `flan-t5-xl/` folder (`spiece.model`, `tokenizer_config.json`,
`config.json`, weights), so the tiny models run the same text path as the releases.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

_WORDS = (
    "make the sky purple add a hat to the cat remove person from background turn photo into "
    "painting change color of car red blue green yellow white black replace dog with lion put "
    "snow on mountains sunset night day winter summer style watercolor sketch cartoon brighter "
    "darker smile glasses beard old young flowers tree river house window door road city beach "
    "sea boat bird sun moon clouds rain fire light shadow face hair eyes hand table chair cup"
).split()


def _corpus(n: int = 2000) -> list[str]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (n,), generator=g)
    picks = torch.randint(0, len(_WORDS), (int(lengths.sum()),), generator=g).tolist()
    out, at = [], 0
    for length in lengths.tolist():
        words = [_WORDS[i] for i in picks[at : at + length]]
        out.append(" ".join(words).capitalize() + ".")
        at += length
    return out


def write_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    """Train a T5-layout unigram sentencepiece model (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, model_type="unigram",
        vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 512})
    )


def write_tiny_text_encoder(folder: str | Path, d_model: int, seed: int = 0) -> Path:
    """Write a tokenizer and a 2-layer random T5 encoder of width d_model into `folder`."""
    from transformers import T5Config, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    write_tokenizer(folder)
    config = T5Config(
        vocab_size=448, d_model=d_model, d_ff=2 * d_model, d_kv=32, num_heads=4, num_layers=2,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
        is_encoder_decoder=False, use_cache=False,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(str(folder))
    return folder
