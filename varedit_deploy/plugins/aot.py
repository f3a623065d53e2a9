"""Ahead-of-time compilation of the fused kernels for SM targets (no GPU needed), and what the compiler made.

`release_launches` builds every launch the fast path makes in one edit of a model, on `meta`
tensors at the model's real shapes, through the same launch builders the runtime calls (same
tiles, warps, stages and key splits). `compile_launch` compiles one for an SM target with
Triton's own argument specialisation (integers equal to 1 become constants, multiples of 16 and
16-byte-aligned pointers are marked divisible, exactly as the JIT does on a GPU), keeps PTX and
cubin, and reads what matters for speed out of ptxas's report and the SASS: registers, spills,
shared memory, tensor-core instructions.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig

# SASS matrix instructions: HMMA (fp16/bf16 mma.sync, sm80+), HGMMA (warpgroup wgmma, sm90a),
# and their integer/fp8 forms.
TENSOR_CORE_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "DMMA")
# SMs of the devices each target is planned for (the key split depends on it): H100 SXM / H200,
# L40S, Jetson AGX Orin 64 GB, A100, A10.
SM_COUNT = {90: 132, 89: 142, 87: 16, 86: 72, 80: 108}
_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    arch: int
    config: str  # tiles, split, warps, stages
    signature: str  # argument types as specialised
    ptx: str = field(repr=False)
    cubin: bytes = field(repr=False)
    num_warps: int
    registers: int  # per thread
    spill_bytes: int  # spill stores per thread (ptxas)
    stack_bytes: int  # stack frame per thread (ptxas)
    shared_bytes: int  # dynamic shared memory per block
    tensor_core_instructions: int  # in the SASS
    local_memory_instructions: int  # LDL/STL in the SASS
    instructions: int  # all SASS instructions

    def stats(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "arch", "config", "signature", "num_warps", "registers",
                                               "spill_bytes", "stack_bytes", "shared_bytes",
                                               "tensor_core_instructions", "local_memory_instructions",
                                               "instructions")}


def specialise(launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch, as Triton's JIT binder derives them on a GPU."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for p in launch.fn.params:
        value = launch.args[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize,
                                            not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constexprs[p.name] = value
        elif isinstance(attr, str) and attr:
            attrs[(p.num,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def _sass_counts(cubin: bytes) -> tuple[int, int, int]:
    """(tensor-core, local-memory, all) instruction counts of a cubin's SASS."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-sass", str(path)], check=True,
                              capture_output=True, text=True).stdout
    opcodes = [op.split(".")[0] for op in _SASS_LINE.findall(sass)]
    if not opcodes:
        raise RuntimeError("cuobjdump printed no SASS instructions")
    return (sum(op in TENSOR_CORE_OPCODES for op in opcodes), sum(op in ("LDL", "STL") for op in opcodes),
            len(opcodes))


def _ptxas_numbers(log: str, name: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, stack frame bytes) from ptxas -v for entry `name`."""
    entry = log[log.index(f"Function properties for {name}"):]
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", entry)
    regs = re.search(r"Used (\d+) registers", entry)
    if not (frame and regs):
        raise RuntimeError(f"no ptxas statistics for {name} in:\n{log}")
    return int(regs.group(1)), int(frame.group(2)), int(frame.group(1))


def _compile(launch, arch: int, log: io.StringIO):
    """Triton's compiled kernel of one launch for sm_`arch` (always freshly, so that ptxas reports
    into `log`), with the signature and constexprs it was specialised with."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = specialise(launch)
    src = triton.compiler.ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    return k, signature, constexprs


def compile_launch(launch, arch: int) -> CompiledKernel:
    """Compile one launch for sm_`arch` and read its statistics."""
    log = io.StringIO()
    k, signature, constexprs = _compile(launch, arch, log)
    registers, spills, stack = _ptxas_numbers(log.getvalue(), k.metadata.name)
    tensor_core, local, total = _sass_counts(k.asm["cubin"])
    sig = ",".join(v if v != "constexpr" else f"{constexprs[n]!r}" for n, v in signature.items()
                   if n in constexprs or v != "constexpr")
    return CompiledKernel(launch.name, arch, launch.config(), sig, k.asm["ptx"], k.asm["cubin"], k.metadata.num_warps,
                          registers, spills, stack, k.metadata.shared, tensor_core, local, total)


@dataclass(frozen=True)
class KernelBinary:
    """What launching a compiled kernel through the CUDA driver needs (no Triton at run time)."""

    arch: int
    entry: str  # the cubin's function name
    params: tuple[str, ...]  # Triton types of the runtime parameters, in order ("*fp16", "i32", "fp32")
    num_warps: int
    shared_bytes: int  # dynamic shared memory per block
    cubin: bytes = field(repr=False)


def compile_binary(launch, arch: int) -> KernelBinary:
    """Compile one launch for sm_`arch` for launching by hand (`plugins.cuda_launch`)."""
    k, signature, _ = _compile(launch, arch, io.StringIO())
    if k.metadata.global_scratch_size or k.metadata.profile_scratch_size:
        raise RuntimeError(f"{launch.name} needs Triton's scratch memory, which a hand launch does not provide")
    params = tuple(kind for kind in signature.values() if kind != "constexpr")
    return KernelBinary(arch, k.metadata.name, params, k.metadata.num_warps, k.metadata.shared, k.asm["cubin"])


@dataclass(frozen=True)
class PlannedLaunch:
    scale: int
    layer: str  # "0" (SAR + targets), ">=1" (source + targets) or "-" for the sampler kernels
    launch: object  # KernelLaunch


def release_launches(config: ModelConfig, cache_dtype, sm_count: int) -> list[PlannedLaunch]:
    """Every kernel launch of one edit of `config` with `cache_dtype` caches, on meta tensors."""
    import torch

    from . import attention, sampler

    t, sched = config.transformer, config.schedule
    meta, f32 = torch.device("meta"), torch.float32
    b, h, c = 2, t.heads, t.head_dim
    total = sched.total_tokens
    temperature = torch.empty(h, device=meta, dtype=f32)
    cos = torch.empty(sched.source_tokens + total, c // 2, device=meta, dtype=f32)
    sar = [torch.empty(total, b, h, c, device=meta, dtype=cache_dtype) for _ in range(2)]
    caches = {"0": [torch.empty(total, b, h, c, device=meta, dtype=cache_dtype) for _ in range(2)],
              ">=1": [torch.empty(sched.source_tokens + total, b, h, c, device=meta, dtype=cache_dtype)
                      for _ in range(2)]}
    summed = torch.empty(1, t.codebook_dim, sched.latent_side, sched.latent_side, device=meta, dtype=f32)
    out = []
    for s, (n, start) in enumerate(zip(sched.tokens, sched.starts)):
        for layer, (k_cache, v_cache) in caches.items():
            past = start + (0 if layer == "0" else sched.source_tokens)
            qkv = torch.empty(b, n, 3, h, c, device=meta, dtype=f32)
            prep, q = attention.prep_qkv_launch(qkv, temperature, cos[:n], cos[:n], k_cache, v_cache, past)
            segment_a = (sar[0][start:start + n], sar[1][start:start + n]) if layer == "0" else None
            launches, _ = attention.scale_attention_launches(q, segment_a, (k_cache[:past + n], v_cache[:past + n]),
                                                              sm_count=sm_count)
            out += [PlannedLaunch(s, layer, x) for x in (prep, *launches)]
        logits = torch.empty(b, n, t.num_logits, device=meta, dtype=f32)
        noise = torch.empty(n * t.d_tok, 2, device=meta, dtype=f32)
        bits = torch.empty(1, n, t.d_tok, device=meta, dtype=torch.int64)
        scalars = torch.empty(4, device=meta, dtype=f32)
        out.append(PlannedLaunch(s, "-", sampler.sample_bits_launch(logits, noise, scalars[0:2], scalars[2:3],
                                                                    scalars[3:4], bits)))
        out.append(PlannedLaunch(s, "-", sampler.accumulate_codes_launch(bits, summed, config, s)))
        if s + 1 < sched.num_scales:
            out.append(PlannedLaunch(s, "-", sampler.next_tokens_launch(summed, config, s + 1)[0]))
    return out


def compile_release(config: ModelConfig, cache_dtype, arch: int, kernels=None, progress=None,
                    compiled: dict | None = None) -> list[tuple[PlannedLaunch, CompiledKernel]]:
    """Compile every distinct launch of one edit for sm_`arch`, planned for that target's usual SM
    count; `kernels` selects by kernel name; `compiled` (shared between calls) compiles each
    identical specialisation once."""
    planned = release_launches(config, cache_dtype, SM_COUNT.get(arch, 132))
    compiled = {} if compiled is None else compiled
    out = []
    for p in planned:
        if kernels and p.launch.name not in kernels:
            continue
        signature, constexprs, attrs = specialise(p.launch)
        key = (arch, p.launch.name, p.launch.config(), tuple(signature.items()), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())))
        if key not in compiled:
            compiled[key] = compile_launch(p.launch, arch)
            if progress:
                progress(f"sm{arch} {config.name} {p.launch.name} {p.launch.config()}: "
                         f"{compiled[key].registers} registers, {compiled[key].spill_bytes} B spilled")
        out.append((p, compiled[key]))
    return out
