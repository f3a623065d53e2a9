"""One kernel launch as data: the kernel, its grid, every argument and the launch options.

The launchers build a `KernelLaunch` and call it; the ahead-of-time compiler (`aot`) takes the
same object, built on `meta` tensors at a release model's shapes, and compiles exactly what the
launcher would run (same block sizes, warps, stages and argument specialisation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


def native() -> bool:
    """Compiled kernels (a GPU), not Triton's CPU interpreter: selects hardware rounding and 16-bit dots."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def elementwise_block(gpu_block: int) -> int:
    """Elements per program of a kernel whose output elements are each computed alone (no sum across
    them, so the block cannot change a result): `gpu_block` compiled; 16384 in the interpreter, which
    runs every program in Python."""
    return gpu_block if native() else 16384


@dataclass(frozen=True)
class KernelLaunch:
    name: str
    fn: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: dict[str, Any]  # by parameter name: tensors, ints, floats and constexpr values
    num_warps: int = 4
    num_stages: int = 3

    def config(self) -> str:
        """What distinguishes this compilation: constexpr choices and launch options."""
        blocks = ",".join(f"{k}={v}" for k, v in self.args.items() if k.startswith(("BLOCK", "SPLIT")))
        return f"{blocks},warps={self.num_warps},stages={self.num_stages}"

    def __call__(self) -> None:
        self.fn[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)
