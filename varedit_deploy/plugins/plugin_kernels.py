"""The TensorRT plugin's kernels for one SM target, compiled ahead of time (at build, no GPU needed).

`flat_attention` in both tile configurations `plan_attention` chooses between, for the dtype and
head layout TensorRT configured the plugin with. Compilation runs in a fresh interpreter: a
process that runs Triton's CPU interpreter (the tests) cannot also compile for a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
from typing import Any

from .plan import BLOCK_N, LARGE, SMALL, AttentionPlan

DTYPES = ("float32", "float16", "bfloat16")


def compile_flat_attention(arch: int, dtype: str, heads: int, head_dim: int) -> list[dict[str, Any]]:
    """Binaries (as `cuda_launch.binary_to_json`) of `flat_attention` for sm_`arch`, in this process."""
    import torch

    from . import attention
    from .aot import compile_binary
    from .cuda_launch import binary_to_json

    q = torch.empty(1, 1, heads * head_dim, device="meta", dtype=getattr(torch, dtype))
    out = []
    for block_m, warps, stages in (SMALL, LARGE):
        plan = AttentionPlan(block_m, BLOCK_N, warps, stages, 1, 0)
        launch, _ = attention.flat_attention_launch(q, q, q, heads, 1.0, plan=plan)
        launch = dataclasses.replace(launch, args={**launch.args, "NATIVE": True})
        out.append(binary_to_json(block_m, compile_binary(launch, arch)))
    return out


@functools.cache
def flat_attention_binaries(arch: int, dtype: str, heads: int, head_dim: int) -> tuple[dict[str, Any], ...]:
    """`compile_flat_attention` in a fresh interpreter (without TRITON_INTERPRET), once per process."""
    if dtype not in DTYPES:
        raise ValueError(f"the attention plugin computes in {', '.join(DTYPES)}, not {dtype}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", __name__, str(arch), dtype, str(heads), str(head_dim)]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"compiling the attention plugin's kernels for sm{arch} failed:\n{done.stderr[-4000:]}")
    return tuple(json.loads(done.stdout))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="compile the attention plugin's kernels; JSON on stdout")
    p.add_argument("arch", type=int)
    p.add_argument("dtype", choices=DTYPES)
    p.add_argument("heads", type=int)
    p.add_argument("head_dim", type=int)
    a = p.parse_args(argv)
    print(json.dumps(compile_flat_attention(a.arch, a.dtype, a.heads, a.head_dim)))


if __name__ == "__main__":
    main()
