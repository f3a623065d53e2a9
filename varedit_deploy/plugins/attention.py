"""Fused self-attention of one scale step, in Triton (docs/spec/transformer.md 3.5-3.7).

Two kernels (three with a split key range) replace the eager chain normalise -> temperature ->
RoPE -> concat caches -> SDPA:

* `prep_qkv`: from the raw qkv projection [B, n, 3, H, c], L2-normalise q and k per head,
  multiply q by its head's temperature, rotate both with the interleaved 2-D RoPE of this
  scale, write q to a [B, H, n, c] buffer and k, v straight into this scale's slot of the
  L-major KV cache [L, B, H, c] (no separate append or copy). Square root and division round
  to nearest, as PyTorch's do, so q matches the reference to float32 rounding on any device.
* `scale_attention`: flash-style attention (online softmax, scale 1, no mask) of this scale's
  queries over up to two key segments read in the cache layout: for layer 0 the pooled SAR
  reference of the scale, then the target cache up to and including this scale; for deeper
  layers one segment, the source prefix plus every target scale so far. Matrix products take
  operands in the cache's dtype (tensor cores for bf16/fp16), softmax and sums are fp32.
  Scales with few queries would launch only B*H blocks over up to ~15k keys, so there the
  key range is split across blocks (flash-decoding) and `_combine_splits_kernel` merges the
  partial results.
* `flat_attention`: the same online softmax over one key range for the op boundary of the
  exported step (the TensorRT plugin, `plugins.trt_plugin`): q [1, n, H*c] and keys/values
  [1, L, H*c] as the cache lies (the CFG rows are heads), out [1, n, H*c], any softmax scale.

All run under `TRITON_INTERPRET=1` on CPU tensors (how CI checks them against the reference);
`plugins.aot` compiles the same launches ahead of time for SM targets.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import KernelLaunch, native
from .plan import COMBINE_M, DEFAULT_SM_COUNT, AttentionPlan, plan_attention

@triton.jit
def _cast(x, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 -> DTYPE rounding to nearest even: the hardware conversion when compiled; spelled out
    for bf16 in Triton's CPU interpreter, whose conversion truncates."""
    if DTYPE == tl.float32:
        return x
    if NATIVE:
        return x.to(DTYPE, fp_downcast_rounding="rtne")
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


# Runtime integers are not specialised (n == 1 as a constant, multiples of 16): one compilation
# serves every scale, which keeps the first edit's JIT warm-up and the ahead-of-time set small.
@triton.jit(do_not_specialize=["n", "slot_start"])
def _prep_qkv_kernel(
    qkv_ptr, temperature_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    n, slot_start, B: tl.constexpr, H: tl.constexpr, C: tl.constexpr, BLOCK_T: tl.constexpr, NATIVE: tl.constexpr,
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

    q_norm = tl.maximum(tl.sqrt_rn(tl.sum(q_even * q_even + q_odd * q_odd, axis=1)), 1e-12)[:, None]
    k_norm = tl.maximum(tl.sqrt_rn(tl.sum(k_even * k_even + k_odd * k_odd, axis=1)), 1e-12)[:, None]
    temperature = tl.load(temperature_ptr + h)
    q_even = tl.div_rn(q_even, q_norm) * temperature
    q_odd = tl.div_rn(q_odd, q_norm) * temperature
    k_even = tl.div_rn(k_even, k_norm)
    k_odd = tl.div_rn(k_odd, k_norm)

    cos = tl.load(cos_ptr + t[:, None] * (C // 2) + half, mask=ok, other=0.0)
    sin = tl.load(sin_ptr + t[:, None] * (C // 2) + half, mask=ok, other=0.0)
    q_out = (((b * H + h) * n + t) * C)[:, None]  # q[b, h, t, :]
    tl.store(q_out_ptr + q_out + 2 * half, q_even * cos - q_odd * sin, mask=ok)
    tl.store(q_out_ptr + q_out + 2 * half + 1, q_even * sin + q_odd * cos, mask=ok)
    slot = ((((slot_start + t) * B + b) * H + h) * C)[:, None]  # cache[slot_start + t, b, h, :]
    cache_type: tl.constexpr = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + slot + 2 * half, _cast(k_even * cos - k_odd * sin, cache_type, NATIVE), mask=ok)
    tl.store(k_cache_ptr + slot + 2 * half + 1, _cast(k_even * sin + k_odd * cos, cache_type, NATIVE), mask=ok)
    tl.store(v_cache_ptr + slot + 2 * half, _cast(v_even, cache_type, NATIVE), mask=ok)
    tl.store(v_cache_ptr + slot + 2 * half + 1, _cast(v_odd, cache_type, NATIVE), mask=ok)


@triton.jit
def _mma_operand(x, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """x rounded to DTYPE; kept as DTYPE for tensor cores, or widened back to fp32 (same products,
    exact in fp32) where 16-bit dots are unavailable (Triton's CPU interpreter has no bf16 dot)."""
    x = _cast(x.to(tl.float32), DTYPE, NATIVE)
    return x if NATIVE else x.to(tl.float32)


@triton.jit
def _attend_segment(acc, m_i, l_i, q, k_ptr, v_ptr, first, last, b, h, B: tl.constexpr, H: tl.constexpr,
                    C: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, NATIVE: tl.constexpr):
    """Keys [first, last) of one segment into the running (acc, max, sum) of the online softmax."""
    cols = tl.arange(0, C)
    for start in range(first, last, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        valid = keys < last
        offs = ((keys[:, None] * B + b) * H + h) * C + cols[None, :]  # cache[key, b, h, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
        kind: tl.constexpr = k.dtype
        scores = tl.dot(_mma_operand(q, kind, NATIVE), tl.trans(_mma_operand(k, kind, NATIVE)),
                        input_precision=PRECISION)
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
def _row_block(n, H: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's batch-head (and its batch and head), query rows, which of them exist, channels."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return bh, bh // H, bh % H, rows, tl.arange(0, C), rows < n


@triton.jit
def _store_rows(out_ptr, out, b, h, rows, cols, row_ok, n, H: tl.constexpr, C: tl.constexpr, NATIVE: tl.constexpr):
    """out[b, row, h, :] (the layout the output projection reads), rounded to the buffer's dtype."""
    tl.store(out_ptr + ((b * n + rows[:, None]) * H + h) * C + cols[None, :],
             _cast(out, out_ptr.dtype.element_ty, NATIVE), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["len_a", "len_b", "n", "keys_per_split"])
def _scale_attention_kernel(
    q_ptr, ka_ptr, va_ptr, len_a, kb_ptr, vb_ptr, len_b, out_ptr, part_ptr, stats_ptr, n, keys_per_split,
    B: tl.constexpr, H: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, NATIVE: tl.constexpr,
):
    """Queries of one (row block, batch, head) over keys [split * keys_per_split, +keys_per_split) of
    the segments [a ; b]. One split writes the output; several write fp32 partials (acc, max, sum)."""
    bh, b, h, rows, cols, row_ok = _row_block(n, H, C, BLOCK_M)
    split = tl.program_id(2)
    q = tl.load(q_ptr + ((b * H + h) * n + rows[:, None]) * C + cols[None, :], mask=row_ok[:, None], other=0.0)
    acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lo = split * keys_per_split
    hi = lo + keys_per_split
    acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, ka_ptr, va_ptr, lo, tl.minimum(hi, len_a), b, h, B, H, C,
                                    BLOCK_N, PRECISION, NATIVE)
    acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, kb_ptr, vb_ptr, tl.maximum(lo - len_a, 0),
                                    tl.minimum(hi - len_a, len_b), b, h, B, H, C, BLOCK_N, PRECISION, NATIVE)
    if SPLIT == 1:
        _store_rows(out_ptr, acc / l_i[:, None], b, h, rows, cols, row_ok, n, H, C, NATIVE)
    else:
        part = (split * B * H + bh) * n + rows  # part[split, b, h, row, :], stats[split, b, h, row, (max, sum)]
        tl.store(part_ptr + part[:, None] * C + cols[None, :], acc, mask=row_ok[:, None])
        tl.store(stats_ptr + 2 * part, m_i, mask=row_ok)
        tl.store(stats_ptr + 2 * part + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["n"])
def _combine_splits_kernel(part_ptr, stats_ptr, out_ptr, n, B: tl.constexpr, H: tl.constexpr, C: tl.constexpr,
                           SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, NATIVE: tl.constexpr):
    """out = sum_s acc_s e^(m_s - m) / sum_s l_s e^(m_s - m), m the largest split maximum."""
    bh, b, h, rows, cols, row_ok = _row_block(n, H, C, BLOCK_M)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        m = tl.maximum(m, tl.load(stats_ptr + 2 * ((s * B * H + bh) * n + rows), mask=row_ok, other=0.0))
    acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        part = (s * B * H + bh) * n + rows
        weight = tl.exp(tl.load(stats_ptr + 2 * part, mask=row_ok, other=0.0) - m)
        total += tl.load(stats_ptr + 2 * part + 1, mask=row_ok, other=1.0) * weight
        acc += tl.load(part_ptr + part[:, None] * C + cols[None, :], mask=row_ok[:, None], other=0.0) * weight[:, None]
    _store_rows(out_ptr, acc / total[:, None], b, h, rows, cols, row_ok, n, H, C, NATIVE)


@triton.jit(do_not_specialize=["n", "keys"])
def _flat_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, n, keys, scale, H: tl.constexpr, C: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                           NATIVE: tl.constexpr):
    """Queries of one (row block, head) of q [1, n, H*C] over all `keys` rows of k, v [1, keys, H*C]
    (one batch of H heads: the cache layout with B = 1), scores scaled by `scale` through q."""
    bh, b, h, rows, cols, row_ok = _row_block(n, H, C, BLOCK_M)
    q = tl.load(q_ptr + (rows[:, None] * H + h) * C + cols[None, :], mask=row_ok[:, None], other=0.0)
    acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q.to(tl.float32) * scale, k_ptr, v_ptr, 0, keys, b, h, 1, H, C,
                                    BLOCK_N, PRECISION, NATIVE)
    _store_rows(out_ptr, acc / l_i[:, None], b, h, rows, cols, row_ok, n, H, C, NATIVE)


def prep_qkv_launch(qkv: torch.Tensor, temperature: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_start: int):
    """The launch of `prep_qkv` and the q buffer it fills. Tokens are independent (any block gives the
    same result): 32 per program compiled, more in the interpreter, which runs programs in Python."""
    block_t = 32 if native() else 512
    b, n, three, h, c = qkv.shape
    assert three == 3 and qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert temperature.dtype == torch.float32 and temperature.numel() == h
    q = torch.empty(b, h, n, c, device=qkv.device, dtype=torch.float32)
    args = dict(qkv_ptr=qkv, temperature_ptr=temperature, cos_ptr=cos, sin_ptr=sin, q_out_ptr=q,
                k_cache_ptr=k_cache, v_cache_ptr=v_cache, n=n, slot_start=slot_start, B=b, H=h, C=c,
                BLOCK_T=block_t, NATIVE=native())
    return KernelLaunch("prep_qkv", _prep_qkv_kernel, (math.ceil(n / block_t), b * h), args), q


def prep_qkv(qkv: torch.Tensor, temperature: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_start: int) -> torch.Tensor:
    """qkv [B, n, 3, H, c] -> rotated q [B, H, n, c] (fp32); rotated k and v written to cache[slot_start:+n].
    `temperature` [H] fp32 is `head_temperature` of the layer (computed once, not per step)."""
    launch, q = prep_qkv_launch(qkv, temperature, cos.contiguous(), sin.contiguous(), k_cache, v_cache, slot_start)
    launch()
    return q


def scale_attention_launches(q: torch.Tensor, segment_a: tuple[torch.Tensor, torch.Tensor] | None,
                             segment_b: tuple[torch.Tensor, torch.Tensor], plan: AttentionPlan | None = None,
                             sm_count: int = DEFAULT_SM_COUNT):
    """The launches of `scale_attention` (one, or the split and its merge) and the output buffer."""
    b, h, n, c = q.shape
    ka, va = segment_a if segment_a is not None else segment_b
    len_a = segment_a[0].shape[0] if segment_a is not None else 0
    kb, vb = segment_b
    plan = plan or plan_attention(n, len_a + kb.shape[0], b * h, sm_count)
    out = torch.empty(b, n, h, c, device=q.device, dtype=kb.dtype)
    if plan.split > 1:
        part = torch.empty(plan.split, b, h, n, c, device=q.device, dtype=torch.float32)
        stats = torch.empty(plan.split, b, h, n, 2, device=q.device, dtype=torch.float32)
    else:
        part = stats = out  # not read
    precision = "ieee" if kb.dtype == torch.float32 else "tf32"  # 16-bit operands ignore it
    m_blocks = math.ceil(n / plan.block_m)
    args = dict(q_ptr=q, ka_ptr=ka, va_ptr=va, len_a=len_a, kb_ptr=kb, vb_ptr=vb, len_b=kb.shape[0], out_ptr=out,
                part_ptr=part, stats_ptr=stats, n=n, keys_per_split=plan.keys_per_split, B=b, H=h, C=c,
                BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, SPLIT=plan.split, PRECISION=precision, NATIVE=native())
    launches = [KernelLaunch("scale_attention", _scale_attention_kernel, (m_blocks, b * h, plan.split), args,
                             plan.num_warps, plan.num_stages)]
    if plan.split > 1:
        merge = dict(part_ptr=part, stats_ptr=stats, out_ptr=out, n=n, B=b, H=h, C=c, SPLIT=plan.split,
                     BLOCK_M=COMBINE_M, NATIVE=native())
        launches.append(KernelLaunch("combine_splits", _combine_splits_kernel, (math.ceil(n / COMBINE_M), b * h),
                                     merge))
    return launches, out


def scale_attention(q: torch.Tensor, segment_a: tuple[torch.Tensor, torch.Tensor] | None,
                    segment_b: tuple[torch.Tensor, torch.Tensor], plan: AttentionPlan | None = None) -> torch.Tensor:
    """q [B, H, n, c] over keys/values [segment_a ; segment_b] (each [L, B, H, c]) -> out [B, n, H, c]
    in the cache's dtype. `plan` defaults to `plan_attention` for this device."""
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else DEFAULT_SM_COUNT
    launches, out = scale_attention_launches(q, segment_a, segment_b, plan, sm_count)
    for launch in launches:
        launch()
    return out


def flat_attention_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
                          sm_count: int = DEFAULT_SM_COUNT, plan: AttentionPlan | None = None):
    """The launch of `flat_attention` and its output buffer; tiles as `plan_attention` picks them
    (one launch: the key range is not split, `plan.split` is ignored)."""
    _, n, width = q.shape
    assert q.dtype == k.dtype == v.dtype and k.shape == v.shape and k.shape[2] == width and width % heads == 0
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    plan = plan or plan_attention(n, k.shape[1], heads, sm_count)
    out = torch.empty_like(q)
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=out, n=n, keys=k.shape[1], scale=float(scale), H=heads,
                C=width // heads, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", NATIVE=native())
    return KernelLaunch("flat_attention", _flat_attention_kernel, (math.ceil(n / plan.block_m), heads), args,
                        plan.num_warps, plan.num_stages), out


def flat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v per head: q [1, n, heads*c], k/v [1, L, heads*c] -> [1, n, heads*c] in
    q's dtype, fp32 softmax and sums (ONNX `Attention` in its 3-D form, no mask)."""
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else DEFAULT_SM_COUNT
    launch, out = flat_attention_launch(q, k, v, heads, scale, sm_count)
    launch()
    return out
