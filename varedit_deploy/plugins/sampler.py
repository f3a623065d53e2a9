"""Fused sampler and next-scale input in Triton (docs/spec/transformer.md 3.9-3.11), no host round trip.

* `sample_bits`: tau and CFG on the logits, the two-way softmax, the top-p threshold and
  `argmax(p / E)` with the given Exp(1) noise -> one bit per (token, channel).
* `accumulate_codes`: bits -> codes (2b - 1)/sqrt(d), bilinear up to the full latent grid (two
  taps per axis, half-pixel, PyTorch's edge rules) and added to the running sum in place.
* `next_tokens`: the running sum bilinearly down to the next scale's grid, pixel-unshuffled
  for patchified (8B) models, written as the next scale's tokens [1, n', d_tok].

Each is a plain elementwise/gather kernel over its output; CI checks them against the
reference modules under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import ModelConfig
from ..model.resample import bilinear_scale
from .launch import KernelLaunch, elementwise_block

BLOCK = 256


# Runtime integers are not specialised: one compilation serves every scale (see attention.py).
@triton.jit(do_not_specialize=["rows"])
def _sample_kernel(logits_ptr, noise_ptr, bits_ptr, rows, cfg_weights_ptr, inv_tau_ptr, threshold_ptr,
                   BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w_cond = tl.load(cfg_weights_ptr)  # device scalars: no host sync, CUDA-graph safe
    w_uncond = tl.load(cfg_weights_ptr + 1)
    inv_tau = tl.load(inv_tau_ptr)
    threshold = tl.load(threshold_ptr)
    ok = r < rows
    c0 = tl.load(logits_ptr + 2 * r, mask=ok, other=0.0) * inv_tau  # cond row, bit value 0
    c1 = tl.load(logits_ptr + 2 * r + 1, mask=ok, other=0.0) * inv_tau
    u0 = tl.load(logits_ptr + 2 * rows + 2 * r, mask=ok, other=0.0) * inv_tau  # uncond row
    u1 = tl.load(logits_ptr + 2 * rows + 2 * r + 1, mask=ok, other=0.0) * inv_tau
    l0 = c0 * w_cond + u0 * w_uncond
    l1 = c1 * w_cond + u1 * w_uncond
    m = tl.maximum(l0, l1)
    e0 = tl.exp(l0 - m)
    e1 = tl.exp(l1 - m)
    p0 = tl.div_rn(e0, e0 + e1)  # divisions round to nearest, as PyTorch's: a bit is a comparison
    p1 = tl.div_rn(e1, e0 + e1)
    drawn = (tl.div_rn(p1, tl.load(noise_ptr + 2 * r + 1, mask=ok, other=1.0))
             > tl.div_rn(p0, tl.load(noise_ptr + 2 * r, mask=ok, other=1.0)))
    bit = tl.where(p0 <= threshold, 1, tl.where(p1 <= threshold, 0, drawn.to(tl.int32)))
    tl.store(bits_ptr + r, bit.to(tl.int64), mask=ok)


@triton.jit
def _tap(dst, in_size, scale):
    """Bilinear taps of output index `dst` (align_corners=False, clamped like PyTorch); `scale` is
    `bilinear_scale(in_size, out_size)`, rounded once on the host as PyTorch rounds it."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    lo = src.to(tl.int32)
    hi = tl.minimum(lo + 1, in_size - 1)
    return lo, hi, src - lo.to(tl.float32)


@triton.jit
def _code_at(bits_ptr, ch, y, x, side, D: tl.constexpr, PATCH: tl.constexpr, inv_sqrt_d, ok):
    """Code value of VAE channel `ch` at VAE pixel (y, x) of this scale, read from the token bits."""
    if PATCH:
        token = (y // 2) * side + (x // 2)
        k = 4 * ch + 2 * (y % 2) + (x % 2)
        bit = tl.load(bits_ptr + token * (4 * D) + k, mask=ok, other=0)
    else:
        bit = tl.load(bits_ptr + (y * side + x) * D + ch, mask=ok, other=0)
    return bit.to(tl.float32) * (2.0 * inv_sqrt_d) - inv_sqrt_d


@triton.jit(do_not_specialize=["side", "grid_in", "full"])
def _accumulate_kernel(bits_ptr, summed_ptr, side, grid_in, up_scale, full, inv_sqrt_d, LAST: tl.constexpr,
                       D: tl.constexpr, PATCH: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < D * full * full
    ch = i // (full * full)
    y = (i // full) % full
    x = i % full
    if LAST:  # the last scale is already at full resolution
        value = _code_at(bits_ptr, ch, y, x, side, D, PATCH, inv_sqrt_d, ok)
    else:
        y0, y1, wy = _tap(y, grid_in, up_scale)
        x0, x1, wx = _tap(x, grid_in, up_scale)
        top = (_code_at(bits_ptr, ch, y0, x0, side, D, PATCH, inv_sqrt_d, ok) * (1.0 - wx)
               + _code_at(bits_ptr, ch, y0, x1, side, D, PATCH, inv_sqrt_d, ok) * wx)
        bottom = (_code_at(bits_ptr, ch, y1, x0, side, D, PATCH, inv_sqrt_d, ok) * (1.0 - wx)
                  + _code_at(bits_ptr, ch, y1, x1, side, D, PATCH, inv_sqrt_d, ok) * wx)
        value = top * (1.0 - wy) + bottom * wy
    tl.store(summed_ptr + i, tl.load(summed_ptr + i, mask=ok, other=0.0) + value, mask=ok)


@triton.jit(do_not_specialize=["next_side", "full"])
def _next_tokens_kernel(summed_ptr, tokens_ptr, next_side, down_scale, full,
                        D: tl.constexpr, PATCH: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d_tok = 4 * D if PATCH else D
    ok = i < next_side * next_side * d_tok
    token = i // d_tok
    k = i % d_tok
    if PATCH:
        ch = k // 4
        y = 2 * (token // next_side) + (k // 2) % 2
        x = 2 * (token % next_side) + k % 2
    else:
        ch = k
        y = token // next_side
        x = token % next_side
    y0, y1, wy = _tap(y, full, down_scale)
    x0, x1, wx = _tap(x, full, down_scale)
    base = summed_ptr + ch * full * full
    top = tl.load(base + y0 * full + x0, mask=ok, other=0.0) * (1.0 - wx) + tl.load(base + y0 * full + x1, mask=ok, other=0.0) * wx
    bottom = tl.load(base + y1 * full + x0, mask=ok, other=0.0) * (1.0 - wx) + tl.load(base + y1 * full + x1, mask=ok, other=0.0) * wx
    tl.store(tokens_ptr + i, top * (1.0 - wy) + bottom * wy, mask=ok)


def sample_bits_launch(logits: torch.Tensor, noise: torch.Tensor, cfg_weights: torch.Tensor, inv_tau: torch.Tensor,
                       drop_threshold: torch.Tensor, bits: torch.Tensor) -> KernelLaunch:
    rows = bits.numel()
    assert logits.is_contiguous() and noise.is_contiguous() and bits.is_contiguous() and logits.numel() == 4 * rows
    block = elementwise_block(BLOCK)
    args = dict(logits_ptr=logits, noise_ptr=noise, bits_ptr=bits, rows=rows, cfg_weights_ptr=cfg_weights,
                inv_tau_ptr=inv_tau, threshold_ptr=drop_threshold, BLOCK=block)
    return KernelLaunch("sample_bits", _sample_kernel, (triton.cdiv(rows, block),), args)


def sample_bits(logits: torch.Tensor, noise: torch.Tensor, cfg_weights: torch.Tensor, inv_tau: torch.Tensor,
                drop_threshold: torch.Tensor, d_tok: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [2, n, 2*d_tok] (fp32), Exp(1) noise [n*d_tok, 2] and the sampler constants as device
    tensors (`SamplerInputs`) -> bits [1, n, d_tok] int64."""
    bits = out if out is not None else torch.empty(1, logits.shape[1], d_tok, dtype=torch.int64, device=logits.device)
    sample_bits_launch(logits.contiguous(), noise.contiguous(), cfg_weights, inv_tau, drop_threshold, bits)()
    return bits


def accumulate_codes_launch(bits: torch.Tensor, summed: torch.Tensor, config: ModelConfig, scale: int) -> KernelLaunch:
    sched, t = config.schedule, config.transformer
    full = sched.latent_side
    total = t.codebook_dim * full * full
    assert bits.is_contiguous() and summed.is_contiguous() and summed.numel() == total
    args = dict(bits_ptr=bits, summed_ptr=summed, side=sched.sides[scale], grid_in=sched.vae_side(scale),
                up_scale=float(bilinear_scale(sched.vae_side(scale), full)), full=full,
                inv_sqrt_d=1.0 / math.sqrt(t.codebook_dim), LAST=scale == sched.num_scales - 1, D=t.codebook_dim,
                PATCH=t.patchify, BLOCK=elementwise_block(BLOCK))
    return KernelLaunch("accumulate_codes", _accumulate_kernel, (triton.cdiv(total, args["BLOCK"]),), args)


def accumulate_codes(bits: torch.Tensor, summed: torch.Tensor, config: ModelConfig, scale: int) -> None:
    """summed [1, d, H, W] += bilinear_up(codes of `bits` at `scale`), in place."""
    accumulate_codes_launch(bits.contiguous(), summed, config, scale)()


def next_tokens_launch(summed: torch.Tensor, config: ModelConfig, next_scale: int):
    sched, t = config.schedule, config.transformer
    side = sched.sides[next_scale]
    tokens = torch.empty(1, side * side, t.d_tok, device=summed.device, dtype=torch.float32)
    args = dict(summed_ptr=summed, tokens_ptr=tokens, next_side=side,
                down_scale=float(bilinear_scale(sched.latent_side, sched.vae_side(next_scale))),
                full=sched.latent_side, D=t.codebook_dim, PATCH=t.patchify, BLOCK=elementwise_block(BLOCK))
    return (KernelLaunch("next_tokens", _next_tokens_kernel, (triton.cdiv(tokens.numel(), args["BLOCK"]),), args),
            tokens)


def next_tokens(summed: torch.Tensor, config: ModelConfig, next_scale: int) -> torch.Tensor:
    """The running sum down to `next_scale`'s grid -> tokens [1, n', d_tok]."""
    launch, tokens = next_tokens_launch(summed, config, next_scale)
    launch()
    return tokens
