"""Ahead-of-time compilation of the fused kernels to PTX/cubin for given SM targets (no GPU needed).

The signatures are those a model's shapes imply (head dim, heads, code dims); the result is
what a TensorRT plugin or a deployment without a JIT compiler ships.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..model.attention import MAX_SCALE_MUL

DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    arch: int
    ptx: str
    cubin: bytes
    num_warps: int
    shared_bytes: int


def kernel_sources(config: ModelConfig, cache_dtype: str = "bf16"):
    """(name, jit function, signature, constexprs) of every fused kernel for this model."""
    from . import attention, sampler

    t = config.transformer
    cache = f"*{DTYPES[cache_dtype]}"
    f32 = "*fp32"
    shape = {"B": 2, "H": t.heads, "C": t.head_dim}
    return [
        ("prep_qkv", attention._prep_qkv_kernel,
         {"qkv_ptr": f32, "scale_mul_ptr": f32, "cos_ptr": f32, "sin_ptr": f32, "q_out_ptr": f32,
          "k_cache_ptr": cache, "v_cache_ptr": cache, "n": "i32", "slot_start": "i32",
          "B": "constexpr", "H": "constexpr", "C": "constexpr", "MAX_LOG": "constexpr", "BLOCK_T": "constexpr"},
         {**shape, "MAX_LOG": MAX_SCALE_MUL, "BLOCK_T": 32}),
        ("scale_attention", attention._scale_attention_kernel,
         {"q_ptr": f32, "ka_ptr": cache, "va_ptr": cache, "len_a": "i32", "kb_ptr": cache, "vb_ptr": cache,
          "len_b": "i32", "out_ptr": cache, "n": "i32", "B": "constexpr", "H": "constexpr", "C": "constexpr",
          "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "PRECISION": "constexpr", "NATIVE": "constexpr"},
         {**shape, "BLOCK_M": 64, "BLOCK_N": 64, "PRECISION": "ieee" if cache_dtype == "fp32" else "tf32",
          "NATIVE": True}),
        ("sample_bits", sampler._sample_kernel,
         {"logits_ptr": f32, "noise_ptr": f32, "bits_ptr": "*i64", "rows": "i32", "cfg_weights_ptr": f32,
          "inv_tau_ptr": f32, "threshold_ptr": f32, "BLOCK": "constexpr"},
         {"BLOCK": sampler.BLOCK}),
        ("accumulate_codes", sampler._accumulate_kernel,
         {"bits_ptr": "*i64", "summed_ptr": f32, "side": "i32", "grid_in": "i32", "full": "i32",
          "inv_sqrt_d": "fp32", "LAST": "constexpr", "D": "constexpr", "PATCH": "constexpr", "BLOCK": "constexpr"},
         {"LAST": False, "D": t.codebook_dim, "PATCH": t.patchify, "BLOCK": sampler.BLOCK}),
        ("next_tokens", sampler._next_tokens_kernel,
         {"summed_ptr": f32, "tokens_ptr": f32, "next_side": "i32", "grid_out": "i32", "full": "i32",
          "D": "constexpr", "PATCH": "constexpr", "BLOCK": "constexpr"},
         {"D": t.codebook_dim, "PATCH": t.patchify, "BLOCK": sampler.BLOCK}),
    ]


def compile_kernels(config: ModelConfig, archs: tuple[int, ...] = (80, 86, 89, 90),
                    cache_dtype: str = "bf16") -> list[CompiledKernel]:
    import triton
    from triton.backends.compiler import GPUTarget

    out = []
    for name, fn, signature, constexprs in kernel_sources(config, cache_dtype):
        for arch in archs:
            src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            out.append(CompiledKernel(name, arch, k.asm["ptx"], k.asm["cubin"], k.metadata.num_warps,
                                      k.metadata.shared))
    return out
