"""Constant tables (RoPE, resampling and SAR pooling matrices) as buffers on the module's build device.

The tables are computed on the CPU, so their values (fixture-checked) do not depend on the device,
then placed where the module is being built: the default device (`with torch.device("cuda"):` or
`"meta"`). `torch.from_numpy` alone ignores that context and would leave a CPU buffer inside a
GPU model.
"""

from __future__ import annotations

import numpy as np
import torch


def constant(table: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A CPU-computed table, on the device modules are currently built on."""
    tensor = torch.from_numpy(table) if isinstance(table, np.ndarray) else table
    return tensor.to(torch.get_default_device())
