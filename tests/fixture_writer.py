"""Write fixture and release folders in the official formats from our own models.

`write_fixture`: the format of shared/fixtures/README.md, to check that the parity tooling
works on fixtures of any shape (depth, width, chunks, text length, cfg, tau); the golden
numbers themselves come only from the official code. `write_release`: a release folder like
the published one (`2B-512.pth`, the VAE file, `flan-t5-xl/`) for a tiny model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from varedit_deploy.config import ModelConfig, from_name
from varedit_deploy.imaging import preprocess, to_uint8
from varedit_deploy.model.checkpoint import ours_to_official_transformer
from varedit_deploy.model.codes import latent_to_tokens, tokens_to_latent
from varedit_deploy.model.edit import generate
from varedit_deploy.model.loaded import VAREditModel
from varedit_deploy.sampling import SamplerInputs, TorchCPUNoise


def wrapped_vae_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our plain VAE names -> the official wrapper spelling (`x.conv.weight`, `x.norm.weight`)."""
    out = {}
    for key, value in state.items():
        owner, leaf = key.rsplit(".", 1)
        kind = "norm" if "norm" in owner.rsplit(".", 1)[-1] else "conv"
        out[f"{owner}.{kind}.{leaf}"] = value
    return out


def write_fixture(folder: Path, config: ModelConfig, photo: np.ndarray, text_len: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = VAREditModel.random(config, seed=seed)
    tr = config.transformer
    Image.fromarray(photo).save(folder / "source.png")
    source = torch.from_numpy(preprocess(Image.fromarray(photo), config.image_size))
    text = torch.randn(1, text_len, tr.text_channels, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        raw = model.vae.encoder(source)
        prefix = latent_to_tokens(raw, tr.patchify)
        gen = generate(model, text, prefix, SamplerInputs.from_params(config.sampling),
                       TorchCPUNoise(config.sampling.seed))
        decoded = model.vae.decoder(gen.summed)
    expected = {"raw_features": raw, "source_prefix": prefix, "summed_codes": gen.summed.unsqueeze(2),
                "decoded": decoded,
                "image_uint8_bgr": torch.from_numpy(to_uint8(decoded.numpy())[..., ::-1].copy())[None]}
    for s, (side, rec) in enumerate(zip(config.schedule.sides, gen.scales)):
        expected[f"logits_{s}"] = rec.guided_logits.reshape(1, -1, 2)
        expected[f"sampled_{s}"] = rec.bits.reshape(1, -1, 1)
        grid = tokens_to_latent(rec.bits, side, tr.patchify)  # [1, d, h, w]
        expected[f"bits_{s}"] = grid.permute(0, 2, 3, 1).unsqueeze(1)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(folder / "expected.safetensors"))
    save_file({"source_tensor": source[0], "text_features": text[0], "text_lens": torch.tensor([text_len])},
              str(folder / "inputs.safetensors"))
    save_file(ours_to_official_transformer(model.transformer.state_dict(), tr.block_chunks),
              str(folder / "transformer.safetensors"))
    save_file(wrapped_vae_state(model.vae.state_dict()), str(folder / "vae.safetensors"))
    s = config.sampling
    (folder / "config.json").write_text(json.dumps({
        "name": folder.name, "pn": config.megapixels, "codebook_dim": tr.codebook_dim, "patchify": int(tr.patchify),
        "vae_base_ch": config.vae.base_ch, "vae_res_blocks": config.vae.num_res_blocks, "depth": tr.depth,
        "dim": tr.dim, "heads": tr.heads, "text_channels": tr.text_channels, "text_len": text_len,
        "cfg": s.cfg, "tau": s.tau, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed,
        "resolution": config.image_size, "scale_schedule": config.schedule.as_triples(),
        "vae_patch_size": config.vae.patch_size, "vae_ch_mult": list(config.vae.ch_mult),
        "vae_scale_schedule": config.schedule.vae_triples(), "block_chunks": tr.block_chunks,
        "text_maxlen": tr.text_maxlen,
    }))
    return folder


def release_like(depth: int, chunks: int) -> ModelConfig:
    """A tiny model with the 2B release's file names and `chunks` block chunks."""
    tiny = from_name("tiny-2b")
    tr = dataclasses.replace(tiny.transformer, depth=depth, block_chunks=chunks)
    return dataclasses.replace(tiny, name="tiny-release", transformer=tr, transformer_file="2B-512.pth",
                               vae_file="infinity_vae_d32reg.pth", text_encoder_dir="flan-t5-xl")


def official_vae_state(model: VAREditModel, wrapped: bool) -> dict[str, torch.Tensor]:
    """Our VAE state dict in the official wrapper (`.conv.`/`.norm.`) or plain spelling, with masks."""
    state = {k: v.clone() for k, v in model.vae.state_dict().items()}
    out = wrapped_vae_state(state) if wrapped else state
    mask = 2 ** torch.arange(model.config.vae.codebook_dim - 1, -1, -1)
    out["quantizer.lfq.mask"] = out["quantize.lfq.mask"] = mask
    return out


def write_release(folder: Path, model: VAREditModel, chunks: int, nest: str | None, wrapped_vae: bool,
                  text_dir: Path) -> None:
    state = ours_to_official_transformer(model.transformer.state_dict(), chunks)
    state = {f"module.{k}": v for k, v in state.items()} if nest == "module" else state
    payload = {"trainer": {"gpt_fsdp": state}} if nest == "trainer" else state
    torch.save(payload, folder / "2B-512.pth")
    torch.save({"vae": official_vae_state(model, wrapped_vae)}, folder / "infinity_vae_d32reg.pth")
    (folder / "flan-t5-xl").symlink_to(text_dir)
