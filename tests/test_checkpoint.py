import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from fixture_writer import official_vae_state, release_like, write_release
from varedit_deploy.config import TransformerConfig, from_name
from varedit_deploy.fixtures import load_fixture_config
from varedit_deploy.errors import CheckpointError
from varedit_deploy.model.checkpoint import (ReleaseFiles, load_transformer_weights, load_vae_weights,
                                             ours_to_official_transformer, read_state_file)
from varedit_deploy.model.loaded import VAREditModel


@pytest.mark.parametrize("depth, chunks, nest, wrapped", [(16, 8, None, True), (6, 3, "module", False),
                                                          (4, 1, "trainer", True)])
def test_release_folder_round_trip(tmp_path, tiny_text_dir, depth, chunks, nest, wrapped):
    config = release_like(depth, chunks)
    model = VAREditModel.random(config, seed=3)
    write_release(tmp_path, model, chunks, nest, wrapped, tiny_text_dir)
    loaded = VAREditModel.from_release(tmp_path, config, text_precision="fp32")
    for ours, theirs in ((model.transformer, loaded.transformer), (model.vae, loaded.vae)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.text_encoder is not None and loaded.text_encoder.width == 256


def test_official_layout_has_chunk_names_and_buffers():
    model = VAREditModel.random(release_like(16, 8))
    keys = ours_to_official_transformer(model.transformer.state_dict(), 8)
    assert "block_chunks.7.module.1.sa.mat_qkv.weight" in keys
    assert "block_chunks.3.module.0.ca.zero_k_bias" in keys and "text_proj_for_sos.ca.zero_k_bias" in keys
    assert not any(k.startswith("blocks.") for k in keys)


@pytest.fixture
def release(tmp_path, tiny_text_dir):
    config = release_like(4, 2)
    model = VAREditModel.random(config)
    write_release(tmp_path, model, 2, None, True, tiny_text_dir)
    return tmp_path, config, model


def _rewrite(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state["vae"] if "vae" in state else state)
    torch.save(state, path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("block_chunks.1.module.1.ffn.fc2.weight"), "missing: blocks.3.ffn.fc2.weight"),
    (lambda s: s.__setitem__("block_chunks.0.module.0.sa.extra", torch.zeros(1)), "unknown: blocks.0.sa.extra"),
    (lambda s: s.__setitem__("head.weight", torch.zeros(5, 64)), r"misshaped: head.weight: file \(5, 64\)"),
])
def test_transformer_mismatches_are_named(release, edit, message):
    folder, config, _ = release
    _rewrite(folder / "2B-512.pth", edit)
    with pytest.raises(CheckpointError, match=message):
        VAREditModel.from_release(folder, config, with_text_encoder=False)


def test_vae_missing_tensor_is_named(release):
    folder, config, _ = release
    _rewrite(folder / "infinity_vae_d32reg.pth", lambda s: s.pop("decoder.conv_out.conv.weight"))
    with pytest.raises(CheckpointError, match="missing: decoder.conv_out.weight"):
        VAREditModel.from_release(folder, config, with_text_encoder=False)


def test_short_cfg_uncond_is_padded_with_the_official_initial_rows(golden):
    """The fixtures hold cfg_uncond as the official `Infinity.__init__` made it, so a copy cut to 100
    rows must load back to the fixture's full tensor: the official loader pads with those rows."""
    state = dict(read_state_file(golden / "transformer.safetensors"))
    full = state["cfg_uncond"]
    model = VAREditModel.empty(load_fixture_config(golden / "config.json"))
    load_transformer_weights(model.transformer, {**state, "cfg_uncond": full[:100].clone()}, 512, "cut")
    assert torch.equal(model.transformer.cfg_uncond, full)
    load_transformer_weights(model.transformer, {**state, "cfg_uncond": torch.cat([full, full[:7]])}, 512, "long")
    assert torch.equal(model.transformer.cfg_uncond, full)  # a longer one is truncated


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_compiled_and_ddp_prefixes_are_stripped(release, prefix):
    folder, config, model = release
    for name in ("2B-512.pth", "infinity_vae_d32reg.pth"):
        _rewrite(folder / name, lambda s: [s.__setitem__(prefix + k, s.pop(k)) for k in list(s)])
    loaded = VAREditModel.from_release(folder, config, with_text_encoder=False)
    assert torch.equal(loaded.transformer.head.weight, model.transformer.head.weight)
    assert torch.equal(loaded.vae.decoder.conv_out.weight, model.vae.decoder.conv_out.weight)


def test_vae_dict_extras_are_ignored_and_named_as_the_official_loader_does(release, caplog):
    folder, config, model = release
    extras = {"discriminator.conv.weight": torch.zeros(2, 3), "encoder.extra_head.weight": torch.zeros(1)}
    _rewrite(folder / "infinity_vae_d32reg.pth", lambda s: s.update(extras))
    with caplog.at_level("WARNING", logger="varedit_deploy.model.checkpoint"):
        loaded = VAREditModel.from_release(folder, config, with_text_encoder=False)
    assert torch.equal(loaded.vae.encoder.conv_in.weight, model.vae.encoder.conv_in.weight)
    assert len(caplog.records) == 1
    assert "ignored 2 tensors" in caplog.text and "discriminator.conv.weight" in caplog.text
    _rewrite(folder / "infinity_vae_d32reg.pth", lambda s: s.__setitem__("decoder.conv_out.conv.weight",
                                                                           torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"misshaped: decoder.conv_out.weight"):  # still strict on shapes
        VAREditModel.from_release(folder, config, with_text_encoder=False)


def test_a_flat_vae_file_stays_strict(tmp_path):
    model = VAREditModel.random(from_name("tiny-2b"))
    torch.save({**official_vae_state(model, wrapped=True), "extra.weight": torch.zeros(1)}, tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match="unknown: extra.weight"):
        load_vae_weights(model.vae, read_state_file(tmp_path / "v.pth"), "v")


def test_missing_and_corrupt_files(release, tmp_path_factory):
    folder, config, _ = release
    (folder / "infinity_vae_d32reg.pth").unlink()
    with pytest.raises(CheckpointError, match=r"lacks files for tiny-release: vae"):
        ReleaseFiles.locate(folder, config)
    (folder / "infinity_vae_d32reg.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        VAREditModel.from_release(folder, config, with_text_encoder=False)
    torch.save([torch.zeros(1)], folder / "infinity_vae_d32reg.pth")  # loadable, but not a state dict
    with pytest.raises(CheckpointError, match="holds a list, not a dict of tensors"):
        VAREditModel.from_release(folder, config, with_text_encoder=False)
    with pytest.raises(CheckpointError, match="no such folder"):
        ReleaseFiles.locate(tmp_path_factory.mktemp("x") / "nope", config)


def test_safetensors_fixture_layout_loads(golden):
    model = VAREditModel.from_fixture(golden)
    assert model.transformer.blocks[0].sa.mat_qkv.weight.abs().sum() > 0


def test_text_encoder_width_mismatch(tmp_path, tiny_text_dir):
    config = dataclasses.replace(from_name("tiny-2b"),
                                 transformer=TransformerConfig(depth=2, dim=64, heads=2, codebook_dim=16,
                                                               patchify=False, text_channels=512, block_chunks=1))
    model = VAREditModel.random(config)
    with pytest.raises(CheckpointError, match="width 256"):
        model.attach_text_encoder(tiny_text_dir, "fp32")


def test_safetensors_transformer_file(tmp_path):
    model = VAREditModel.random(from_name("tiny-8b"))
    save_file(ours_to_official_transformer(model.transformer.state_dict(), 2), str(tmp_path / "t.safetensors"))
    other = VAREditModel.empty(from_name("tiny-8b"))
    load_transformer_weights(other.transformer, read_state_file(tmp_path / "t.safetensors"), 512, "t")
    assert torch.equal(other.transformer.head.weight, model.transformer.head.weight)


def test_fixture_weights_land_where_the_official_layout_puts_them(golden):
    """Oracle: the fixtures' files were written by the official code (docs/spec/transformer.md 5,
    docs/spec/vae-text.md 1.7): `block_chunks.{k}.module.{j}` is block k * (depth / chunks) + j, every
    other transformer name is ours, `zero_k_bias` buffers are zeros that no module holds; VAE
    names wrap convs and norms (`x.conv.weight`, `x.norm.weight`), and `lfq.mask` is a buffer."""
    import re

    from safetensors.torch import load_file

    model = VAREditModel.from_fixture(golden)
    cfg = model.config.transformer
    per_chunk = cfg.depth // cfg.block_chunks
    ours = model.transformer.state_dict()
    seen = set()
    for key, value in load_file(str(golden / "transformer.safetensors")).items():
        if key.endswith("zero_k_bias"):
            assert torch.all(value == 0), key
            continue
        m = re.fullmatch(r"block_chunks\.(\d+)\.module\.(\d+)\.(.+)", key)
        name = f"blocks.{int(m[1]) * per_chunk + int(m[2])}.{m[3]}" if m else key
        assert torch.equal(ours[name], value), key
        seen.add(name)
    assert seen == set(ours)
    ours = model.vae.state_dict()
    seen = set()
    for key, value in load_file(str(golden / "vae.safetensors")).items():
        if key.endswith("lfq.mask"):
            continue
        name = re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", key)
        assert torch.equal(ours[name], value), key
        seen.add(name)
    assert seen == set(ours)


@pytest.mark.parametrize("name, entries", [("2b-512", 694), ("8b-512", 862)])
def test_official_layout_has_the_spec_entry_counts(name, entries):
    """docs/spec/transformer.md 5: 694 (2B) and 862 (8B) state-dict entries, 2 * depth + 1 zero_k_bias."""
    config = from_name(name)
    with torch.device("meta"):
        model = VAREditModel.empty(config)
    keys = ours_to_official_transformer(model.transformer.state_dict(), 8)
    assert len(keys) == entries
    assert sum(k.endswith("zero_k_bias") for k in keys) == 2 * config.transformer.depth + 1
    per_chunk = config.transformer.depth // 8
    assert f"block_chunks.7.module.{per_chunk - 1}.ffn.fc2.weight" in keys
