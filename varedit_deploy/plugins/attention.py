"""Fused self-attention of one scale step, in Triton (spec/transformer.md 3.5-3.7).

Two kernels replace the eager chain normalise -> temperature -> RoPE -> concat caches -> SDPA:

* `prep_qkv`: from the raw qkv projection [B, n, 3, H, c], L2-normalise q and k per head,
  multiply q by its head's temperature exp(min(scale_mul, ln 100)), rotate both with the
  interleaved 2-D RoPE of this scale, write q to a [B, H, n, c] buffer and k, v straight into
  this scale's slot of the L-major KV cache [L, B, H, c] (no separate append or copy).
* `scale_attention`: flash-style attention (online softmax, scale 1, no mask) of this scale's
  queries over up to two key segments read in the cache layout: for layer 0 the pooled SAR
  reference of the scale, then the target cache up to and including this scale; for deeper
  layers one segment, the source prefix plus every target scale so far.

Both run under `TRITON_INTERPRET=1` on CPU tensors (how CI checks them against the reference).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..model.attention import MAX_SCALE_MUL


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE rounding to nearest even, spelled out for bf16 so that Triton's CPU
    interpreter (which truncates) rounds like the hardware and PyTorch do."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _prep_qkv_kernel(
    qkv_ptr, scale_mul_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    n, slot_start, B: tl.constexpr, H: tl.constexpr, C: tl.constexpr, MAX_LOG: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    block = tl.program_id(0)  # a block of tokens of one (batch, head)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = (t < n)[:, None]
    half = tl.arange(0, C // 2)[None, :]
    row = (((b * n + t) * 3) * H * C + h * C)[:, None]  # qkv[b, t, 0, h, :]
    q_even = tl.load(qkv_ptr + row + 2 * half, mask=ok, other=0.0).to(tl.float32)
    q_odd = tl.load(qkv_ptr + row + 2 * half + 1, mask=ok, other=0.0).to(tl.float32)
    k_even = tl.load(qkv_ptr + row + H * C + 2 * half, mask=ok, other=0.0).to(tl.float32)
    k_odd = tl.load(qkv_ptr + row + H * C + 2 * half + 1, mask=ok, other=0.0).to(tl.float32)
    v_even = tl.load(qkv_ptr + row + 2 * H * C + 2 * half, mask=ok, other=0.0).to(tl.float32)
    v_odd = tl.load(qkv_ptr + row + 2 * H * C + 2 * half + 1, mask=ok, other=0.0).to(tl.float32)

    q_norm = tl.maximum(tl.sqrt(tl.sum(q_even * q_even + q_odd * q_odd, axis=1)), 1e-12)[:, None]
    k_norm = tl.maximum(tl.sqrt(tl.sum(k_even * k_even + k_odd * k_odd, axis=1)), 1e-12)[:, None]
    temperature = tl.exp(tl.minimum(tl.load(scale_mul_ptr + h).to(tl.float32), MAX_LOG))
    q_even = q_even / q_norm * temperature
    q_odd = q_odd / q_norm * temperature
    k_even = k_even / k_norm
    k_odd = k_odd / k_norm

    cos = tl.load(cos_ptr + t[:, None] * (C // 2) + half, mask=ok, other=0.0)
    sin = tl.load(sin_ptr + t[:, None] * (C // 2) + half, mask=ok, other=0.0)
    q_out = (((b * H + h) * n + t) * C)[:, None]  # q[b, h, t, :]
    tl.store(q_out_ptr + q_out + 2 * half, q_even * cos - q_odd * sin, mask=ok)
    tl.store(q_out_ptr + q_out + 2 * half + 1, q_even * sin + q_odd * cos, mask=ok)
    slot = ((((slot_start + t) * B + b) * H + h) * C)[:, None]  # cache[slot_start + t, b, h, :]
    cache_type: tl.constexpr = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + slot + 2 * half, _cast(k_even * cos - k_odd * sin, cache_type), mask=ok)
    tl.store(k_cache_ptr + slot + 2 * half + 1, _cast(k_even * sin + k_odd * cos, cache_type), mask=ok)
    tl.store(v_cache_ptr + slot + 2 * half, _cast(v_even, cache_type), mask=ok)
    tl.store(v_cache_ptr + slot + 2 * half + 1, _cast(v_odd, cache_type), mask=ok)


@triton.jit
def _mma_operand(x, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """x rounded to DTYPE; kept as DTYPE for tensor cores, or widened back to fp32 (same products,
    exact in fp32) where 16-bit dots are unavailable (Triton's CPU interpreter has no bf16 dot)."""
    x = _cast(x.to(tl.float32), DTYPE)
    return x if NATIVE else x.to(tl.float32)


@triton.jit
def _attend_segment(acc, m_i, l_i, q, k_ptr, v_ptr, length, b, h, B: tl.constexpr, H: tl.constexpr,
                    C: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, NATIVE: tl.constexpr):
    """Matrix products on operands in the cache's dtype (bf16/fp16 or fp32), fp32 softmax and sums."""
    cols = tl.arange(0, C)
    for start in range(0, length, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        valid = keys < length
        offs = ((keys[:, None] * B + b) * H + h) * C + cols[None, :]  # cache[key, b, h, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
        kind: tl.constexpr = k.dtype
        k = _mma_operand(k, kind, NATIVE)
        scores = tl.dot(_mma_operand(q, kind, NATIVE), tl.trans(k), input_precision=PRECISION)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(_mma_operand(p, kind, NATIVE), _mma_operand(v, kind, NATIVE),
                                            input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _scale_attention_kernel(
    q_ptr, ka_ptr, va_ptr, len_a, kb_ptr, vb_ptr, len_b, out_ptr, n,
    B: tl.constexpr, H: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, NATIVE: tl.constexpr,
):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, C)
    row_ok = rows < n
    q = tl.load(q_ptr + ((b * H + h) * n + rows[:, None]) * C + cols[None, :], mask=row_ok[:, None], other=0.0)
    acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, ka_ptr, va_ptr, len_a, b, h, B, H, C, BLOCK_N, PRECISION,
                                    NATIVE)
    acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, kb_ptr, vb_ptr, len_b, b, h, B, H, C, BLOCK_N, PRECISION,
                                    NATIVE)
    out = acc / l_i[:, None]
    tl.store(out_ptr + ((b * n + rows[:, None]) * H + h) * C + cols[None, :],  # out[b, row, h, :]
             _cast(out, out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prep_qkv(qkv: torch.Tensor, scale_mul: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_start: int, block_t: int = 32) -> torch.Tensor:
    """qkv [B, n, 3, H, c] -> rotated q [B, H, n, c] (fp32); rotated k and v written to cache[slot_start:+n]."""
    b, n, three, h, c = qkv.shape
    assert three == 3 and qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    q = torch.empty(b, h, n, c, device=qkv.device, dtype=torch.float32)
    grid = (math.ceil(n / block_t), b * h)
    _prep_qkv_kernel[grid](qkv, scale_mul.reshape(-1).contiguous(), cos.contiguous(), sin.contiguous(), q,
                           k_cache, v_cache, n, slot_start, B=b, H=h, C=c, MAX_LOG=MAX_SCALE_MUL, BLOCK_T=block_t)
    return q


def scale_attention(q: torch.Tensor, segment_a: tuple[torch.Tensor, torch.Tensor] | None,
                    segment_b: tuple[torch.Tensor, torch.Tensor], block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """q [B, H, n, c] over keys/values [segment_a ; segment_b] (each [L, B, H, c]) -> out [B, n, H, c]."""
    b, h, n, c = q.shape
    ka, va = segment_a if segment_a is not None else segment_b
    len_a = segment_a[0].shape[0] if segment_a is not None else 0
    kb, vb = segment_b
    out = torch.empty(b, n, h, c, device=q.device, dtype=kb.dtype)
    grid = (math.ceil(n / block_m), b * h)
    precision = "ieee" if kb.dtype == torch.float32 else "tf32"  # 16-bit operands ignore it
    _scale_attention_kernel[grid](q, ka, va, len_a, kb, vb, kb.shape[0], out, n,
                                  B=b, H=h, C=c, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision,
                                  NATIVE=os.environ.get("TRITON_INTERPRET") != "1")
    return out
