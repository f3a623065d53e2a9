"""Fused Triton kernels against the reference modules (Triton's interpreter on CPU, the GPU where present)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_GPU
from varedit_deploy.config import SamplingConfig, from_name
from varedit_deploy.model.attention import head_temperature, self_attention
from varedit_deploy.model.codes import NextScaleInput
from varedit_deploy.model.loaded import VAREditModel
from varedit_deploy.model.sampler import guided_logits
from varedit_deploy.model.sampler import sample_bits as reference_sample_bits
from varedit_deploy.model.transformer import to_cache, to_heads
from varedit_deploy.plugins.attention import flat_attention, prep_qkv, scale_attention
from varedit_deploy.plugins.plan import BLOCK_N, AttentionPlan, plan_attention
from varedit_deploy.plugins.sampler import accumulate_codes, next_tokens, sample_bits
from varedit_deploy.sampling import SamplerInputs

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if HAS_GPU else "cpu"
EPS32 = torch.finfo(torch.float32).eps


def attention_tolerance(dtype: torch.dtype, temperature: float) -> float:
    """Largest |out - ref| / max|ref| expected, the same on CPU and GPU. 16-bit caches: the output and
    the softmax weights of the P.V product are rounded to the cache dtype (flash attention does the
    same), one unit of its epsilon in all. fp32 arithmetic: scores carry rounding of the order of
    eps32 * |score| (|score| <= temperature), which the exponentials pass on to the weights; 16 units
    of that cover summation order, FMA contraction and the GPU's approximate exp2."""
    rounding = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    return rounding + 16 * EPS32 * max(1.0, temperature)


@pytest.fixture(scope="module")
def model():
    return VAREditModel.random(from_name("tiny-8b"), seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer, scale, split", [(0, 0, 1), (0, 4, 1), (0, 4, 3), (1, 3, 1), (1, 6, 1), (1, 6, 4)])
def test_scale_step_attention_matches_the_reference(model, dtype, layer, scale, split):
    tr = model.transformer
    sched, t = model.config.schedule, model.config.transformer
    blk = tr.blocks[layer]
    n, cum = sched.tokens[scale], sched.starts[scale]
    past_len = cum if layer == 0 else sched.source_tokens + cum
    offset = sched.source_tokens + cum
    cos, sin = tr.rope_cos[offset:offset + n], tr.rope_sin[offset:offset + n]
    g = torch.Generator().manual_seed(layer * 10 + scale)
    x = torch.randn(2, n, t.dim, generator=g)
    past_k = F.normalize(torch.randn(past_len, 2, t.heads, t.head_dim, generator=g), dim=-1)
    past_v = torch.randn(past_len, 2, t.heads, t.head_dim, generator=g)
    sar_k = F.normalize(torch.randn(n, 2, t.heads, t.head_dim, generator=g), dim=-1)
    sar_v = torch.randn(n, 2, t.heads, t.head_dim, generator=g)
    with torch.no_grad():
        q_ref, k_ref, v_ref = blk.sa.qkv(x, cos, sin)
        prefix_k, prefix_v = to_heads(past_k.to(dtype).float()), to_heads(past_v.to(dtype).float())
        if layer == 0:
            prefix_k = torch.cat([to_heads(sar_k.to(dtype).float()), prefix_k], 2)
            prefix_v = torch.cat([to_heads(sar_v.to(dtype).float()), prefix_v], 2)
        keys = torch.cat([prefix_k, k_ref.to(dtype).float()], 2)
        values = torch.cat([prefix_v, v_ref.to(dtype).float()], 2)
        ref = self_attention(q_ref.to(dtype).float(), keys, values).transpose(1, 2)  # autocast SDPA rounds q too
        bias = torch.cat([blk.sa.q_bias, torch.zeros_like(blk.sa.q_bias), blk.sa.v_bias])
        qkv = F.linear(x, blk.sa.mat_qkv.weight, bias).view(2, n, 3, t.heads, t.head_dim)
        temperature = head_temperature(blk.sa.scale_mul_1H11).reshape(-1)

    cache_k = torch.empty(past_len + n, 2, t.heads, t.head_dim, dtype=dtype, device=DEVICE)
    cache_v = torch.empty_like(cache_k)
    cache_k[:past_len], cache_v[:past_len] = past_k.to(dtype), past_v.to(dtype)
    q = prep_qkv(qkv.contiguous().to(DEVICE), temperature.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                 cache_k, cache_v, past_len)
    sar = (sar_k.to(dtype).to(DEVICE), sar_v.to(dtype).to(DEVICE)) if layer == 0 else None
    keys_total = keys.shape[2]
    plan = plan_attention(n, keys_total, 2 * t.heads)
    if split > 1:  # force the flash-decoding path: the key range in `split` parts, then the merge
        per_split = -(-keys_total // split // BLOCK_N) * BLOCK_N
        plan = AttentionPlan(plan.block_m, BLOCK_N, plan.num_warps, plan.num_stages, -(-keys_total // per_split),
                             per_split)
        assert plan.split == split
    out = scale_attention(q, sar, (cache_k, cache_v), plan)
    # q: square root and division round to nearest in the kernel, so only summation order and FMA
    # contraction differ from PyTorch: a few float32 units of the largest |q|.
    assert (q.cpu() - q_ref).abs().max() <= 4 * EPS32 * q_ref.abs().max()
    # |k| <= 1: one unit in the last place of the storage type (values a float32 ulp apart can round
    # apart), plus the float32 rounding itself.
    k_tol = torch.finfo(dtype).eps / 2 + 4 * EPS32
    assert (cache_k[past_len:].float().cpu() - to_cache(k_ref).to(dtype).float()).abs().max() <= k_tol
    assert torch.equal(cache_v[past_len:].cpu(), to_cache(v_ref).to(dtype))
    err = (out.float().cpu() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= attention_tolerance(dtype, temperature.max().item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, keys, scale", [(1, 70, 1.0), (9, 300, 1.0), (130, 200, 0.125)])
def test_flat_attention_matches_sdpa(dtype, n, keys, scale):
    """The plugin's kernel on the exported node's interface: q [1, n, heads*c] over the cache rows
    [1, L, heads*c] (2 CFG rows x 4 heads), cosine-attention magnitudes (|q| up to the temperature)."""
    heads, c, temperature = 8, 16, 20.0
    g = torch.Generator().manual_seed(n + keys)
    q = F.normalize(torch.randn(1, n, heads, c, generator=g), dim=-1) * temperature
    k = F.normalize(torch.randn(1, keys, heads, c, generator=g), dim=-1)
    v = torch.randn(1, keys, heads, c, generator=g)
    q, k, v = (t.reshape(1, t.shape[1], heads * c).to(dtype) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(*(t.float().view(1, -1, heads, c).transpose(1, 2) for t in (q, k, v)),
                                         scale=scale).transpose(1, 2).reshape(1, n, heads * c)
    out = flat_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), heads, scale)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float().cpu() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= attention_tolerance(dtype, temperature * scale), err


def test_attention_plan_splits_the_keys_only_where_blocks_are_few():
    """8B-1024 (56 batch-heads) on an H100/H200: the 1-token first scale over 4097 keys is split,
    the 4096-token last scale fills the GPU with large row blocks and is not."""
    first, last = plan_attention(1, 4097, 56, 132), plan_attention(4096, 14617, 56, 132)
    assert first.split > 1 and first.keys_per_split % BLOCK_N == 0
    assert (first.split - 1) * first.keys_per_split < 4097 <= first.split * first.keys_per_split
    assert last.split == 1 and last.block_m == 128
    assert plan_attention(4, 9, 56, 132).split == 1  # layer 0 of scale 1: too few keys to split


@pytest.mark.parametrize("name", ["tiny-2b", "tiny-8b"])
def test_fused_sampler_and_next_scale_input_match_the_reference(name):
    config = from_name(name)
    t, sched = config.transformer, config.schedule
    g = torch.Generator().manual_seed(1)
    params = SamplingConfig(cfg=3.0, tau=0.7, top_p=0.9)
    cw, it, th = (torch.from_numpy(a) for a in SamplerInputs.from_params(params).arrays())
    ref_summed = torch.zeros(1, t.codebook_dim, sched.latent_side, sched.latent_side)
    summed = ref_summed.clone().to(DEVICE)
    drawn = 0
    for s, n in enumerate(sched.tokens):
        logits = torch.randn(2, n, t.num_logits, generator=g) * 2
        noise = torch.empty(n * t.d_tok, 2).exponential_(generator=g)
        ref_bits = reference_sample_bits(guided_logits(logits, cw, it), noise, th).view(1, n, -1)
        bits = sample_bits(logits.to(DEVICE), noise.to(DEVICE), cw.to(DEVICE), it.to(DEVICE), th.to(DEVICE), t.d_tok)
        assert torch.equal(bits.cpu(), ref_bits)
        drawn += int(bits.sum())
        ref_summed, ref_tokens = NextScaleInput(config, s)(ref_bits, ref_summed)
        accumulate_codes(bits, summed, config, s)
        assert torch.allclose(summed.cpu(), ref_summed, atol=1e-6, rtol=0)
        if ref_tokens is not None:
            assert torch.allclose(next_tokens(summed, config, s + 1).cpu(), ref_tokens, atol=1e-6, rtol=0)
    assert 0 < drawn < sum(sched.tokens) * t.d_tok


@pytest.mark.parametrize("arch", [90, 89, 87])
def test_attention_kernels_use_tensor_cores_and_never_spill(arch, tmp_path):
    """benchmarks/kernel_report.py on this machine (no GPU): every launch of an edit of 2b-512 and
    8b-1024, every scale, bf16 and fp16 caches, compiled for sm90 (H100/H200), sm89 (L40S) and
    sm87 (Jetson Orin). No kernel spills or exceeds the target's shared memory; every 16-bit
    attention configuration runs its products on tensor cores."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--arch", f"sm{arch}",
                    "--json", str(out), "--quiet"], env=env, check=True, capture_output=True, text=True)
    kernels = json.loads(out.read_text())["kernels"]
    names = {k["name"] for k in kernels}  # combine_splits where a key range is split (not on Orin's 16 SMs)
    assert {"prep_qkv", "scale_attention", "sample_bits", "accumulate_codes", "next_tokens"} <= names
    assert names <= {"prep_qkv", "scale_attention", "combine_splits", "sample_bits", "accumulate_codes",
                     "next_tokens"}
    for k in kernels:
        assert k["spill_bytes"] == 0 and k["local_memory_instructions"] == 0, k
        assert k["shared_bytes"] <= k["shared_limit"], k
    attention = [k for k in kernels if k["name"] == "scale_attention"]
    assert {(k["model"], k["cache_dtype"]) for k in attention} == {
        (m, d) for m in ("2b-512", "8b-1024") for d in ("bfloat16", "float16")}
    assert all(k["tensor_core_instructions"] > 0 for k in attention), attention
    for model, scales in (("2b-512", 10), ("8b-1024", 13)):  # every scale, layer 0 and deeper layers
        uses = {u for k in attention if k["model"] == model for u in k["uses"]}
        assert uses == {f"{s}:{layer}" for s in range(scales) for layer in ("0", ">=1")}
