"""Fused Triton kernels against the reference modules (Triton's interpreter on CPU, the GPU where present)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from varedit_deploy.config import SamplingConfig, from_name
from varedit_deploy.model.attention import self_attention
from varedit_deploy.model.codes import NextScaleInput
from varedit_deploy.model.loaded import VAREditModel
from varedit_deploy.model.sampler import guided_logits
from varedit_deploy.model.sampler import sample_bits as reference_sample_bits
from varedit_deploy.model.transformer import to_cache, to_heads
from varedit_deploy.plugins.attention import prep_qkv, scale_attention
from varedit_deploy.plugins.sampler import accumulate_codes, next_tokens, sample_bits
from varedit_deploy.runtime.gpu import gpu_available
from varedit_deploy.sampling import SamplerInputs

DEVICE = "cuda" if gpu_available() else "cpu"
# fp32 is exact math (interpreter: numpy); with 16-bit caches q, K, V are rounded in both, and the
# kernel also rounds the softmax probabilities for the P.V product, as flash attention does.
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.fixture(scope="module")
def model():
    return VAREditModel.random(from_name("tiny-8b"), seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer, scale", [(0, 0), (0, 4), (1, 3), (1, 6)])
def test_scale_step_attention_matches_the_reference(model, dtype, layer, scale):
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

    cache_k = torch.empty(past_len + n, 2, t.heads, t.head_dim, dtype=dtype, device=DEVICE)
    cache_v = torch.empty_like(cache_k)
    cache_k[:past_len], cache_v[:past_len] = past_k.to(dtype), past_v.to(dtype)
    q = prep_qkv(qkv.contiguous().to(DEVICE), blk.sa.scale_mul_1H11.detach().to(DEVICE), cos.to(DEVICE),
                 sin.to(DEVICE), cache_k, cache_v, past_len)
    sar = (sar_k.to(dtype).to(DEVICE), sar_v.to(dtype).to(DEVICE)) if layer == 0 else None
    out = scale_attention(q, sar, (cache_k, cache_v))
    assert torch.allclose(q.cpu(), q_ref, atol=1e-6, rtol=0)
    # |k| <= 1: one unit in the last place of the storage type (a float32 ulp apart can round apart)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}[dtype]
    assert torch.allclose(cache_k[past_len:].float().cpu(), to_cache(k_ref).to(dtype).float(), atol=ulp, rtol=0)
    assert torch.equal(cache_v[past_len:].cpu(), to_cache(v_ref).to(dtype))
    err = (out.float().cpu() - ref).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(1.0, ref.abs().max().item()), err


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


def test_kernels_compile_ahead_of_time_without_a_gpu():
    """Triton compiles every kernel to PTX and cubin for sm80, sm86, sm89 and sm90 on this machine."""
    code = ("import json; from varedit_deploy.plugins.aot import compile_kernels; "
            "from varedit_deploy.config import from_name; "
            "ks = compile_kernels(from_name('tiny-8b'), archs=(80, 86, 89, 90)); "
            "print(json.dumps([[k.name, k.arch, len(k.cubin), '.target sm_%d' % k.arch in k.ptx] for k in ks]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    compiled = json.loads(out.stdout.strip().splitlines()[-1])
    assert {(name, arch) for name, arch, _, _ in compiled} == {
        (n, a) for n in ("prep_qkv", "scale_attention", "sample_bits", "accumulate_codes", "next_tokens")
        for a in (80, 86, 89, 90)}
    assert all(size > 1000 and target_ok for _, _, size, target_ok in compiled)


def test_torch_fast_path_pipeline_reproduces_the_eager_reference(tiny_model, photos):
    """The torch backend (fused kernels, preallocated caches, same ScaleLoop) edits like the reference.
    On CPU it runs fp32 in Triton's interpreter; GPU hosts run bf16 with CUDA graphs (test_gpu.py)."""
    import numpy as np

    from varedit_deploy.model.edit import edit
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    if DEVICE == "cuda":
        pytest.skip("the GPU variant runs in bf16 with CUDA graphs: tests/test_gpu.py")
    ref = edit(tiny_model, photos["chelsea"], "make it red", noise=NumpyNoise(5))
    pipe = EditPipeline.from_model(tiny_model, device="cpu", dtype=torch.float32)  # fp32 on CPU: no casts
    ours = pipe.edit(photos["chelsea"], "make it red", noise=NumpyNoise(5))
    for a, rec in zip(ours.loop.bits, ref.generation.scales):
        assert np.array_equal(a, rec.bits.numpy())
    assert np.abs(np.asarray(ours.image, np.int32) - np.asarray(ref.image, np.int32)).max() <= 2
