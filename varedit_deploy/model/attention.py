"""The two attention flavours of VAREdit, in the precision the official code runs them.

Self-attention is cosine attention (scale 1); cross-attention and the text pool go through
flash-attn in the official code, which receives bfloat16 q/k/v even in a float32 run and
returns bfloat16. `bf16_flash_attention` reproduces that rounding (fixtures need it: without
it logits move by about 2e-3). The fixtures' flash-attn stand-in ran SDPA in float32 on the
rounded inputs; using SDPA here too (rather than matmul-softmax-matmul) makes the float32
result, and so every later bf16 rounding decision, the same as theirs.

Exported inside `attention_export("fused")`, each attention becomes one ONNX `Attention` node
(opset 23), which TensorRT parses into one fused attention layer. Self-attention then reads
keys and values in the cache layout [L, 2, H, c] flattened to [1, L, 2H*c] (3-D form, the CFG
rows as heads), so a step never transposes its past; the exporter traces such graphs at opset
20 and declares 23 (`FUSED_OPSET`). "decomposed" (the default outside an export) is the
matmul-softmax-matmul form every opset-17 consumer reads (JetPack 6's TensorRT 10.3 has no
`Attention`). "plugin" is "fused" with each self-attention node replaced by the project's
TensorRT plugin (plugins/trt_plugin.py): same inputs, output and attributes, in its own domain.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..plugins.trt_plugin import ONNX_DOMAIN, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

# exp(scale_mul) is clamped at 100; the official constant is the float32 log(100).
MAX_SCALE_MUL = float(torch.log(torch.tensor(100.0)))


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


ATTENTION_FORMS = ("fused", "decomposed", "plugin")
FUSED_OPSET = 23  # ONNX `Attention` (the exporter traces at 20, its newest, and declares 23)
_form = "decomposed"


@contextlib.contextmanager
def attention_export(form: str) -> Iterator[None]:
    """Export every attention traced inside in `form` (see the module docstring)."""
    global _form
    if form not in ATTENTION_FORMS:
        raise ValueError(f"unknown attention form {form!r}; choose one of {', '.join(ATTENTION_FORMS)}")
    saved, _form = _form, form
    try:
        yield
    finally:
        _form = saved


def _fused() -> bool:
    return _form in ("fused", "plugin") and torch.onnx.is_in_onnx_export()


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
        out = g.op(f"{ONNX_DOMAIN}::{PLUGIN_NAME}", q, k, v, heads_i=heads, scale_f=scale,
                   plugin_version_s=PLUGIN_VERSION, plugin_namespace_s=PLUGIN_NAMESPACE)
        out.setType(q.type())
        return out


def bf16_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over [B, H, L, c] with bf16 inputs/output, fp32 softmax/accumulation, scale 1/sqrt(c)."""
    q, k, v = _round_bf16(q), _round_bf16(k), _round_bf16(v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if _fused():
        return _round_bf16(_OnnxAttention.apply(q, k, v, 0, scale))
    return _round_bf16(F.scaled_dot_product_attention(q, k, v, scale=scale))


def head_temperature(scale_mul: torch.Tensor) -> torch.Tensor:
    """The learned per-head temperature of cosine attention, exp(min(scale_mul, ln 100)): clamped in
    the parameter's dtype (bf16 blocks clamp in bf16), exponentiated in fp32 as under autocast."""
    return scale_mul.clamp_max(MAX_SCALE_MUL).float().exp()


def cosine_qk(q: torch.Tensor, k: torch.Tensor, scale_mul: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise q and k per head and apply the learned per-head temperature to q."""
    return F.normalize(q, dim=-1) * head_temperature(scale_mul), F.normalize(k, dim=-1)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention with softmax scale 1 ([B, H, Lq, c] x [B, H, Lk, c])."""
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def cache_self_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q [B, H, n, c] over keys/values in the cache layout [L, B, H, c] -> [B, n, H*c].

    Fused, the cache rows are read as they lie ([1, L, B*H*c]: the CFG rows become heads); else
    they are turned into the attention layout first."""
    b, h, n, c = q.shape
    if _fused():
        heads = int(b * h)  # static (CFG rows x heads): a plain attribute, not a traced size
        flat = q.permute(2, 0, 1, 3).reshape(1, n, heads * c)  # n query rows only
        node = _PluginAttention if _form == "plugin" else _OnnxAttention
        out = node.apply(flat, keys.reshape(1, -1, heads * c), values.reshape(1, -1, heads * c), heads, 1.0)
        return out.reshape(n, b, h * c).transpose(0, 1)
    return self_attention(q, keys.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3)).transpose(1, 2).reshape(b, n, -1)
