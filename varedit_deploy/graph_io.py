"""The names exported graphs are called by: the step graph's inputs and outputs, and our plugin node.

`export` writes `StepIO` into the artifact manifest (`step_io`) and every runtime reads it from
there, so each name is spelled once, here: the per-layer names are templates over the layer
index, as onnxruntime-genai's config declares its KV-cache names. The plugin identity is what a
`--attention plugin` export writes into its nodes, what `build` registers a creator for and what
engine manifests record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ArtifactError


@dataclass(frozen=True)
class StepIO:
    """Names of the step graph's tensors; `past_*` and `new_*` are templates over `{layer}`."""

    x: str = "x"  # [2, n, C] embedded input of the scale (the source tokens in the source pass)
    modulation: str = "modulation"  # [depth, 2, 6, C]
    head_modulation: str = "head_modulation"  # [2, 2, C]
    text_k: str = "text_k"  # [depth, 2, H, Lt, c]
    text_v: str = "text_v"
    sar_k: str = "sar_k"  # [n, 2, H, c] this scale's pooled source reference (0 rows: the source pass)
    sar_v: str = "sar_v"
    past_k: str = "past_k_{layer}"  # [P, 2, H, c] cache rows attended before this call's own
    past_v: str = "past_v_{layer}"
    new_k: str = "new_k_{layer}"  # [n, 2, H, c] this call's own K/V, written into the cache slot
    new_v: str = "new_v_{layer}"
    logits: str = "logits"  # [2, n, 2 * d_tok]

    def past(self, layer: int) -> tuple[str, str]:
        """The (key, value) input names of layer `layer`'s past."""
        return self.past_k.format(layer=layer), self.past_v.format(layer=layer)

    def new(self, layer: int) -> tuple[str, str]:
        """The (key, value) output names of layer `layer`'s new K/V."""
        return self.new_k.format(layer=layer), self.new_v.format(layer=layer)

    def inputs(self, depth: int) -> list[str]:
        """Every input, in the graph's order: the fixed ones, every layer's past keys, then values."""
        pasts = [self.past(i) for i in range(depth)]
        return [self.x, self.modulation, self.head_modulation, self.text_k, self.text_v, self.sar_k, self.sar_v,
                *(k for k, _ in pasts), *(v for _, v in pasts)]

    def outputs(self, depth: int) -> list[str]:
        """Every output, in the graph's order: the logits, every layer's new keys, then values."""
        news = [self.new(i) for i in range(depth)]
        return [self.logits, *(k for k, _ in news), *(v for _, v in news)]

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "StepIO":
        """Strict: every name present, nothing unknown, each per-layer name a `{layer}` template."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names or not all(isinstance(v, str) for v in data.values()):
            raise ArtifactError(f"the manifest's step_io must name exactly {sorted(names)}, got {data!r}")
        io = cls(**data)
        for field in ("past_k", "past_v", "new_k", "new_v"):
            if "{layer}" not in getattr(io, field):
                raise ArtifactError(f"the manifest's step_io.{field} {getattr(io, field)!r} has no {{layer}} template")
        return io


# Node metadata an export writes on every node that reads a weight: the model parameter it comes from
# (`blocks.3.ffn.fc2.weight`), which quantisation groups layers by (calibration/groups.py).
PARAMETER_KEY = "varedit.parameter"

# The TensorRT plugin that `export --attention plugin` writes for each self-attention
# (plugins/trt_plugin.py implements it). Raise the version on any change to its fields, their
# meaning or the kernels' interface: engines and artifacts record it and are refused on a mismatch.
# How an export writes the step's attentions (export/attention_nodes.py): ONNX `Attention` nodes,
# MatMul-Softmax-MatMul, or our TensorRT plugin; here, where the CLI reads it without torch.
ATTENTION_FORMS = ("fused", "decomposed", "plugin")
PLUGIN_NAME = "VareditScaleAttention"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "varedit"
PLUGIN_ONNX_DOMAIN = "varedit"


def plugin_record() -> dict[str, str]:
    """What the artifact and engine manifests record about the plugin."""
    return {"domain": PLUGIN_ONNX_DOMAIN, "op": PLUGIN_NAME, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE}
