import pytest
import sentencepiece as spm
import torch

from varedit_deploy.errors import InputError
from varedit_deploy.model.text import T5TextEncoder, dtype_argument

SENTENCES = ["make the sky purple", "  Add a hat   to the cat ", "replace dog\twith lion", "Ünïcode café", ""]


def test_tokenizer_ids_equal_sentencepiece_plus_eos(tiny_text_dir):
    enc = T5TextEncoder(tiny_text_dir, "fp32")
    sp = spm.SentencePieceProcessor(model_file=str(tiny_text_dir / "spiece.model"))
    for text in SENTENCES[:-1]:
        assert enc.tokenize(text) == sp.encode(text) + [1]


def test_unpadded_features_equal_padded_official_ones(tiny_text_dir):
    enc = T5TextEncoder(tiny_text_dir, "fp32")
    ids = enc.tokenize(SENTENCES[0])
    ours = enc.encode_ids(ids)
    padded = torch.zeros(1, 512, dtype=torch.int64)
    padded[0, : len(ids)] = torch.tensor(ids)
    mask = (torch.arange(512) < len(ids)).long()[None]
    with torch.inference_mode():
        official = enc.model(input_ids=padded, attention_mask=mask).last_hidden_state.float()[:, : len(ids)]
    assert ours.shape == (1, len(ids), 256)
    assert torch.allclose(ours, official, atol=2e-6, rtol=0)


def test_fp16_keeps_wo_in_fp32(tiny_text_dir):
    enc = T5TextEncoder(tiny_text_dir, "fp16")
    ffn = enc.model.encoder.block[0].layer[1].DenseReluDense
    assert ffn.wo.weight.dtype == torch.float32 and ffn.wi_0.weight.dtype == torch.float16
    assert enc.encode("make it red").dtype == torch.float32


def test_bad_instructions(tiny_text_dir):
    enc = T5TextEncoder(tiny_text_dir, "fp32")
    with pytest.raises(InputError, match="empty"):
        enc.tokenize("   ")
    with pytest.raises(InputError, match="at most 512"):
        enc.tokenize("sky " * 600)


@pytest.mark.parametrize("version, keyword", [("4.45.2", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                               ("4.56.0", "dtype"), ("4.57.0.dev0", "dtype"), ("5.24.0", "dtype")])
def test_the_dtype_keyword_follows_the_installed_transformers(version, keyword):
    assert dtype_argument(version) == keyword


def test_text_encoder_folder_errors(tiny_text_dir, tmp_path):
    import shutil

    from varedit_deploy.errors import CheckpointError
    from varedit_deploy.model.text import load_tokenizer

    with pytest.raises(CheckpointError, match="unknown text encoder precision 'int4'"):
        T5TextEncoder(tiny_text_dir, "int4")
    with pytest.raises(CheckpointError, match="no config.json"):
        T5TextEncoder(tmp_path, "fp32")
    broken = tmp_path / "t5"
    shutil.copytree(tiny_text_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="text encoder in .*cannot be loaded"):
        T5TextEncoder(broken, "fp32")
    (broken / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="tokenizer in .*cannot be loaded"):
        load_tokenizer(broken)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_t5_folders_are_read_whole(tiny_text_dir, tmp_path, fmt):
    """Sharded safetensors or sharded pytorch_model.bin (google/flan-t5-xl ships both), each with its
    index: the same tensors as the folder's single file."""
    import json

    from safetensors.torch import save_file

    from varedit_deploy.model.text import read_t5_weights

    whole = read_t5_weights(tiny_text_dir)
    names = sorted(whole)
    halves = {f"shard-{i}.{fmt}": {n: whole[n].clone() for n in names[i::2]} for i in range(2)}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for shard, tensors in halves.items():
        save_file(tensors, str(folder / shard)) if fmt == "safetensors" else torch.save(tensors, folder / shard)
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"weight_map": {n: s for s, t in halves.items() for n in t}}))
    sharded = read_t5_weights(folder)
    assert sorted(sharded) == names and all(torch.equal(sharded[n], whole[n]) for n in names)
