import json

import pytest
import torch

from varedit_deploy.config import ModelConfig, Schedule, from_name
from varedit_deploy.fixtures import load_fixture_config
from varedit_deploy.errors import ConfigError
from varedit_deploy.model.transformer import VAREditTransformer
from varedit_deploy.model.vae import BSQVAE


@pytest.mark.parametrize(
    "name, total, per_block, vae_enc, vae_dec, vae_tensors",
    [
        ("2b-512", 2_204_564_032, 67_147_792, 45_025_696, 65_092_355, 268),
        ("8b-512", 8_375_791_824, 205_589_020, 33_139_598, 48_484_611, 224),
        ("8b-1024", 8_375_791_824, 205_589_020, 33_139_598, 48_484_611, 224),
    ],
)
def test_release_presets_match_the_official_parameter_counts(name, total, per_block, vae_enc, vae_dec, vae_tensors):
    config = from_name(name)
    with torch.device("meta"):
        tr, vae = VAREditTransformer(config), BSQVAE(config.vae)
    assert sum(p.numel() for p in tr.parameters()) == total
    assert sum(p.numel() for p in tr.blocks[0].parameters()) == per_block
    assert sum(p.numel() for p in vae.encoder.parameters()) == vae_enc
    assert sum(p.numel() for p in vae.decoder.parameters()) == vae_dec
    assert len(vae.state_dict()) == vae_tensors


def test_schedules_match_the_spec_tables():
    s512, s1024 = from_name("2b-512").schedule, from_name("8b-1024").schedule
    assert s512.sides == (1, 2, 4, 6, 8, 12, 16, 20, 24, 32)
    assert s512.total_tokens == 2521 and s512.source_tokens == 1024
    assert s1024.total_tokens == 10521 and s1024.source_tokens == 4096
    assert s1024.starts[-1] == 6425
    assert from_name("8b-512").schedule.latent_side == 64  # 8B VAE grid is 2x the token grid
    assert [from_name(n).image_size for n in ("2b-512", "8b-512", "8b-1024")] == [512, 512, 1024]
    t8 = from_name("8b-512").transformer
    assert (t8.d_tok, t8.num_logits, t8.mlp_hidden, t8.pool_heads, t8.pool_head_dim) == (56, 112, 14336, 16, 224)


def test_fixture_configs_load_and_agree_with_derived_fields(golden):
    config = load_fixture_config(golden / "config.json")
    raw = json.loads((golden / "config.json").read_text())
    assert config.schedule.as_triples() == raw["scale_schedule"]
    assert config.schedule.vae_triples() == raw["vae_scale_schedule"]
    assert config.image_size == raw["resolution"]


def test_fixture_config_rejects_unknown_keys_and_inconsistent_schedules(golden, tmp_path):
    raw = json.loads((golden / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "mystery": 1}))
    with pytest.raises(ConfigError, match="mystery"):
        load_fixture_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**raw, "scale_schedule": [[1, 1, 1]]}))
    with pytest.raises(ConfigError, match="scale_schedule"):
        load_fixture_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**raw, "depth": "x"}))  # a value of the wrong kind
    with pytest.raises(ConfigError, match="invalid values"):
        load_fixture_config(tmp_path / "config.json")


def test_unknown_names_and_round_trip():
    with pytest.raises(ConfigError, match="known models"):
        from_name("3b-512")
    with pytest.raises(ConfigError):
        Schedule.from_megapixels("2M")
    config = from_name("8b-1024")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict({**config.to_dict(), "extra": 1})


@pytest.mark.parametrize("fields, message", [
    ({"dim": 100, "heads": 3}, "not divisible by heads"),
    ({"text_channels": 300}, "multiple of 128"),
    ({"dim": 72, "heads": 2, "text_channels": 640}, "text-pool heads"),  # 640 / 128 = 5 pool heads
    ({"dim": 72, "heads": 12}, "multiple of 4 for 2-D RoPE"),  # head dim 6
])
def test_transformer_config_rejects_impossible_shapes(fields, message):
    from varedit_deploy.config import TransformerConfig

    base = {"depth": 2, "dim": 64, "heads": 2, "codebook_dim": 14, "patchify": True, "text_channels": 256}
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**{**base, **fields})


def test_vae_and_model_configs_reject_inconsistent_settings():
    import dataclasses

    from varedit_deploy.config import VAEConfig

    with pytest.raises(ConfigError, match="not patch size 16"):
        VAEConfig(codebook_dim=14, ch_mult=(1, 2, 4, 4), patch_size=16)
    with pytest.raises(ConfigError, match="divisible by 32"):
        VAEConfig(codebook_dim=14, base_ch=48, ch_mult=(1, 2, 4, 4), patch_size=8)
    tiny = from_name("tiny-8b")
    with pytest.raises(ConfigError, match="disagree on codebook_dim"):
        dataclasses.replace(tiny, vae=dataclasses.replace(tiny.vae, codebook_dim=16))
    data = tiny.to_dict()
    with pytest.raises(ConfigError, match="lacks the section 'vae'"):
        ModelConfig.from_dict({k: v for k, v in data.items() if k != "vae"})
    with pytest.raises(ConfigError, match="transformer: .*depth"):
        ModelConfig.from_dict({**data, "transformer": {k: v for k, v in data["transformer"].items() if k != "depth"}})


def test_fixture_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_fixture_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON file"):
        load_fixture_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"pn": "0.06M"}))
    with pytest.raises(ConfigError, match="missing keys .*'depth'"):
        load_fixture_config(tmp_path / "config.json")
