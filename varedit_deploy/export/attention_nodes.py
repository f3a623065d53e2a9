"""The step's attentions as single ONNX nodes: how an export traces `model.attention.Attention`.

Traced inside `traced_attention(module, "fused")`, each attention becomes one ONNX `Attention`
node (opset 23), which TensorRT parses into one fused attention layer. Self-attention then reads
keys and values in the cache layout [L, 2, H, c] flattened to [1, L, 2H*c] (3-D form, the CFG
rows as heads), so a step never transposes its past; the exporter traces such graphs at opset 20
and declares 23 (`FUSED_OPSET`). "decomposed" traces the eager products (MatMul-Softmax-MatMul,
which every opset-17 consumer reads: JetPack 6's TensorRT 10.3 has no `Attention`). "plugin" is
"fused" with each self-attention node replaced by the project's TensorRT plugin
(plugins/trt_plugin.py): same inputs, output and attributes, in its own domain. Run eagerly, every
form computes what `model.attention` computes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..graph_io import ATTENTION_FORMS, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_ONNX_DOMAIN, PLUGIN_VERSION
from ..model.attention import EAGER, Attention, round_bf16

FUSED_OPSET = 23  # ONNX `Attention` (the exporter traces at 20, its newest, and declares 23)


class _OnnxAttention(torch.autograd.Function):
    """SDPA in PyTorch; one ONNX `Attention` node when exported. 3-D inputs [1, L, heads*c] with
    `heads` > 0, or 4-D [B, H, L, c] with `heads` 0."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        if not heads:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        return out.transpose(1, 2).reshape(q.shape)

    @staticmethod
    def symbolic(g, q, k, v, heads: int, scale: float):
        heads_attrs = {"q_num_heads_i": heads, "kv_num_heads_i": heads} if heads else {}
        out_type = q.type()
        if scale != 1.0:  # scaled as PyTorch's own export does: q and k each by sqrt(scale), in fp32 (an
            # Attention-scaled product rounds differently and flips the official bf16 rounding of its output)
            root = g.op("Constant", value_t=torch.tensor(np.sqrt(np.float32(scale)), dtype=torch.float32))
            q, k, scale = g.op("Mul", q, root), g.op("Mul", k, root), 1.0
        # (no softmax_precision attribute: TensorRT's parser rejects it; its fused kernels keep
        # the softmax in fp32)
        out = g.op("Attention", q, k, v, scale_f=scale, **heads_attrs)
        out.setType(out_type)
        return out


class _PluginAttention(_OnnxAttention):
    """`_OnnxAttention` in its 3-D form, exported as the plugin's node (TensorRT's ONNX parser finds
    the creator by op type, `plugin_version` and `plugin_namespace`)."""

    @staticmethod
    def symbolic(g, q, k, v, heads: int, scale: float):
        out = g.op(f"{PLUGIN_ONNX_DOMAIN}::{PLUGIN_NAME}", q, k, v, heads_i=heads, scale_f=scale,
                   plugin_version_s=PLUGIN_VERSION, plugin_namespace_s=PLUGIN_NAMESPACE)
        out.setType(q.type())
        return out


class FusedAttention(Attention):
    """Each attention product one ONNX `Attention` node (self-attention over the cache as it lies)."""

    node = _OnnxAttention

    def text(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = round_bf16(q), round_bf16(k), round_bf16(v)
        return round_bf16(_OnnxAttention.apply(q, k, v, 0, 1.0 / math.sqrt(q.shape[-1])))

    def over_cache(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        b, h, n, c = q.shape
        heads = int(b * h)  # static (CFG rows x heads): a plain attribute, not a traced size
        flat = q.permute(2, 0, 1, 3).reshape(1, n, heads * c)  # n query rows only
        out = self.node.apply(flat, keys.reshape(1, -1, heads * c), values.reshape(1, -1, heads * c), heads, 1.0)
        return out.reshape(n, b, h * c).transpose(0, 1)


class PluginAttention(FusedAttention):
    """`FusedAttention` with each self-attention our TensorRT plugin's node."""

    node = _PluginAttention


_FORMS: dict[str, Attention] = {"decomposed": EAGER, "fused": FusedAttention(), "plugin": PluginAttention()}


@contextlib.contextmanager
def traced_attention(module: nn.Module, form: str) -> Iterator[None]:
    """Within, every attention of `module` (and its submodules) is computed in `form`; restored on exit."""
    if form not in ATTENTION_FORMS:
        raise ValueError(f"unknown attention form {form!r}; choose one of {', '.join(ATTENTION_FORMS)}")
    holders = [m for m in module.modules() if isinstance(getattr(m, "attention", None), Attention)]
    saved = [m.attention for m in holders]
    for m in holders:
        m.attention = _FORMS[form]
    try:
        yield
    finally:
        for m, attention in zip(holders, saved):
            m.attention = attention
