"""Fused Triton kernels for the GPU fast path: scale-step attention (incl. SAR) and the sampler.

`attention` and `sampler` hold the kernels and their torch-facing launchers; `aot` compiles
them ahead of time (PTX and cubin per SM target) without a GPU, for shipping with engines.
"""
