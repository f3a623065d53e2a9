"""The eager reference edit loop: image + instruction -> edited image (spec 3.1-3.11).

`generate` runs the transformer over every scale with a growing KV cache (concatenation is
fine for a reference; the runtime preallocates), `edit` adds the text encoder, the VAE and
the official pre/post-processing. `teacher_bits` replays given bits instead of the sampled
ones, so later scales can be compared with the fixtures exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..config import SamplingConfig
from ..errors import InputError
from ..imaging import as_rgb, postprocess, preprocess
from ..sampling import NoiseSource, SamplerInputs, TorchCPUNoise
from ..timings import ms_since
from .codes import NextScaleInput, latent_to_tokens
from .loaded import VAREditModel
from .sampler import guided_logits, sample_bits


@dataclass
class ScaleRecord:
    guided_logits: torch.Tensor  # [n * d_tok, 2] after tau and CFG, as they reach the sampler
    bits: torch.Tensor  # [1, n, d_tok] as sampled


@dataclass
class Generation:
    summed: torch.Tensor  # [1, d, H, W] accumulated codes, the decoder input
    scales: list[ScaleRecord] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)  # see varedit_deploy.timings


@torch.inference_mode()
def generate(
    model: VAREditModel,
    text_features: torch.Tensor,  # [1, Lt, Ct5]
    source_prefix: torch.Tensor,  # [1, L_src, d_tok]
    sampler: SamplerInputs,
    noise: NoiseSource,
    teacher_bits: list[torch.Tensor] | None = None,
) -> Generation:
    tr, cfg = model.transformer, model.config
    sched = cfg.schedule
    cfg_weights, inv_tau, threshold = (torch.from_numpy(a) for a in sampler.arrays())
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    cond = tr.text_condition(text_features)
    timings["text_condition"] = ms_since(t0)
    t1 = time.perf_counter()
    src = tr.source_pass(source_prefix, cond)
    timings["source_pass"] = ms_since(t1)

    h, c = cfg.transformer.heads, cfg.transformer.head_dim
    # Layer 0 attends over the SAR reference instead of its own source K/V (spec 3.7).
    past_k = [text_features.new_zeros(0, 2, h, c), *src.layer_k[1:]]
    past_v = [text_features.new_zeros(0, 2, h, c), *src.layer_v[1:]]
    x = cond.start_token
    summed = text_features.new_zeros(1, cfg.vae.codebook_dim, sched.latent_side, sched.latent_side)
    out = Generation(summed)
    for s, (start, n) in enumerate(zip(sched.starts, sched.tokens)):
        ts = time.perf_counter()
        logits, new_k, new_v = tr.step(
            x, cond.modulation, cond.head_modulation, cond.text_k, cond.text_v,
            src.sar_k[start : start + n], src.sar_v[start : start + n], past_k, past_v,
        )
        past_k = [torch.cat([p, k]) for p, k in zip(past_k, new_k)]
        past_v = [torch.cat([p, v]) for p, v in zip(past_v, new_v)]
        pair = guided_logits(logits, cfg_weights, inv_tau)
        bits = sample_bits(pair, torch.from_numpy(noise.draw(pair.shape[0])), threshold).view(1, n, -1)
        out.scales.append(ScaleRecord(pair, bits))
        fed_bits = bits if teacher_bits is None else teacher_bits[s]
        summed, tokens = NextScaleInput(cfg, s)(fed_bits, summed)
        if tokens is not None:
            x = tr.embed_tokens(tokens, s + 1)
        timings[f"scale_{s}"] = ms_since(ts)
    out.summed, out.timings_ms = summed, timings
    return out


@dataclass
class EditResult:
    image: Image.Image
    timings_ms: dict[str, float]  # milliseconds per stage and part (varedit_deploy.timings)
    generation: Generation


@torch.inference_mode()
def edit(
    model: VAREditModel,
    image: Image.Image | np.ndarray,
    instruction: str,
    sampling: SamplingConfig | None = None,
    noise: NoiseSource | None = None,
) -> EditResult:
    """The eager reference edit; the noise defaults to the official CPU stream of the seed."""
    if model.text_encoder is None:
        raise InputError("this model has no text encoder attached; load it from a release folder")
    sampling = sampling or model.config.sampling
    noise = noise or TorchCPUNoise(sampling.seed)
    img = as_rgb(image)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    features = model.text_encoder.encode(instruction)
    t1 = time.perf_counter()
    pixels = torch.from_numpy(preprocess(img, model.config.image_size))
    raw = model.vae.encoder(pixels)
    prefix = latent_to_tokens(raw, model.config.transformer.patchify)
    t2 = time.perf_counter()
    gen = generate(model, features, prefix, SamplerInputs.from_params(sampling), noise)
    t3 = time.perf_counter()
    decoded = model.vae.decoder(gen.summed)
    result = postprocess(decoded.numpy(), img.size)
    t4 = time.perf_counter()
    timings.update(text_encoder=(t1 - t0) * 1e3, vae_encoder=(t2 - t1) * 1e3, transformer=(t3 - t2) * 1e3,
                   vae_decoder=(t4 - t3) * 1e3)
    timings.update(gen.timings_ms)
    timings["total"] = (t4 - t0) * 1e3
    return EditResult(result, timings, gen)
