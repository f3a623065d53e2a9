"""One declarative spec per exported graph: the module to trace, its I/O names and dynamic axes.

Every module here is a thin adapter over `varedit_deploy.model` (no second copy of the math).
Graphs and where they run (see DESIGN.md): text_encoder, text_cond, vae_encoder, source_embed
and sar_pool once per edit; step once per scale and once more for the source pass (one graph,
one copy of the transformer blocks, symbolic lengths); sample once per scale; next_input_{s}
once per scale (static resampling matrices baked in); vae_decoder once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..graph_io import StepIO
from ..model.codes import NextScaleInput, latent_to_tokens
from ..model.loaded import VAREditModel
from ..model.sampler import BitSampler
from ..model.transformer import VAREditTransformer


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    attention: str = "decomposed"  # how its attentions are traced (attention_nodes.py)


class TextEncoderGraph(nn.Module):
    def __init__(self, t5: nn.Module):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.t5(input_ids=input_ids).last_hidden_state.float()


class TextCondGraph(nn.Module):
    def __init__(self, tr: VAREditTransformer):
        super().__init__()
        self.tr = tr

    def forward(self, text_features: torch.Tensor):
        return tuple(self.tr.text_condition(text_features))


class VAEEncoderGraph(nn.Module):
    def __init__(self, model: VAREditModel):
        super().__init__()
        self.encoder, self.patchify = model.vae.encoder, model.config.transformer.patchify

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return latent_to_tokens(self.encoder(image), self.patchify)


class SourceEmbedGraph(nn.Module):
    """Source prefix -> the source pass's step input (the finest scale's level embedding)."""

    def __init__(self, tr: VAREditTransformer):
        super().__init__()
        self.tr = tr

    def forward(self, source_prefix: torch.Tensor) -> torch.Tensor:
        return self.tr.embed_tokens(source_prefix, self.tr.schedule.num_scales - 1)


class SarPoolGraph(nn.Module):
    """Layer 0's source K/V (cache layout) -> the SAR references of every scale."""

    def __init__(self, tr: VAREditTransformer):
        super().__init__()
        self.tr = tr

    def forward(self, source_k: torch.Tensor, source_v: torch.Tensor):
        return self.tr.sar_pool(source_k, source_v)


class StepGraph(nn.Module):
    def __init__(self, tr: VAREditTransformer):
        super().__init__()
        self.tr, self.depth = tr, len(tr.blocks)

    def forward(self, x, modulation, head_modulation, text_k, text_v, sar_k, sar_v, *past):
        past_k, past_v = list(past[: self.depth]), list(past[self.depth :])
        logits, new_k, new_v = self.tr.step(x, modulation, head_modulation, text_k, text_v, sar_k, sar_v,
                                            past_k, past_v)
        return (logits, *new_k, *new_v)


class NextInputGraph(nn.Module):
    """Scale s: bits + summed codes -> new summed codes and scale s+1's embedded input."""

    def __init__(self, model: VAREditModel, scale: int):
        super().__init__()
        self.next_input = NextScaleInput(model.config, scale)
        self.tr, self.scale = model.transformer, scale

    def forward(self, bits: torch.Tensor, summed: torch.Tensor):
        summed, tokens = self.next_input(bits, summed)
        if tokens is None:
            return summed
        return summed, self.tr.embed_tokens(tokens, self.scale + 1)


def graph_specs(model: VAREditModel, t5: nn.Module | None, attention: str = "fused") -> list[GraphSpec]:
    """Specs for every graph of `model`; `t5` (fp32 T5 encoder) is None for fixtures without T5.
    `attention` is the form of the step's attentions (the other graphs' are small: opset 17).

    The modules may be skeletons (parameters on `meta`): the examples are made without running
    them, at magnitudes like a real edit's."""
    cfg = model.config
    tcfg, sched = cfg.transformer, cfg.schedule
    tr = model.transformer
    g = torch.Generator().manual_seed(0)
    depth, h, c, dim = tcfg.depth, tcfg.heads, tcfg.head_dim, tcfg.dim
    lt = 5  # example text length; the axis is dynamic

    def rand(*shape, scale: float = 1.0):
        return torch.randn(*shape, generator=g) * scale

    text = rand(1, lt, tcfg.text_channels)
    # What text_condition returns (its start token is not needed here).
    modulation, head_modulation = rand(depth, 2, 6, dim, scale=0.3), rand(2, 2, dim, scale=0.3)
    text_k, text_v = rand(depth, 2, h, lt, c), rand(depth, 2, h, lt, c)
    text_axes = {3: "text_len"}
    specs = []
    if t5 is not None:
        specs.append(GraphSpec("text_encoder", TextEncoderGraph(t5), (torch.tensor([[5, 9, 7, 1]]),),
                               ["input_ids"], ["text_features"],
                               {"input_ids": {1: "text_len"}, "text_features": {1: "text_len"}}))
    specs.append(GraphSpec(
        "text_cond", TextCondGraph(tr), (text,), ["text_features"],
        ["start_token", "modulation", "head_modulation", "text_k", "text_v"],
        {"text_features": {1: "text_len"}, "text_k": text_axes, "text_v": text_axes},
    ))
    size = cfg.image_size
    specs.append(GraphSpec("vae_encoder", VAEEncoderGraph(model), (rand(1, 3, size, size).clamp(-1, 1),),
                           ["image"], ["source_prefix"]))
    latent = sched.latent_side
    specs.append(GraphSpec("vae_decoder", model.vae.decoder, (rand(1, tcfg.codebook_dim, latent, latent) * 0.3,),
                           ["summed_codes"], ["image"]))
    n_src = sched.source_tokens
    specs.append(GraphSpec("source_embed", SourceEmbedGraph(tr), (rand(1, n_src, tcfg.d_tok),), ["source_prefix"],
                           ["x"]))
    specs.append(GraphSpec("sar_pool", SarPoolGraph(tr), (rand(n_src, 2, h, c), rand(n_src, 2, h, c)),
                           ["source_k", "source_v"], ["sar_k", "sar_v"]))
    # Trace the step at scale 1 (non-empty past everywhere); every length axis is symbolic, the
    # SAR's its own so that the source pass (no SAR, empty past) runs the same graph.
    n, p0 = sched.tokens[1], sched.starts[1]
    past = [rand(p0 if i == 0 else n_src + p0, 2, h, c) for i in range(depth)] * 2
    io = StepIO()
    axes: dict[str, dict[int, str]] = {io.x: {1: "tokens"}, io.text_k: text_axes, io.text_v: text_axes,
                                       io.sar_k: {0: "sar_tokens"}, io.sar_v: {0: "sar_tokens"},
                                       io.logits: {1: "tokens"}}
    for i in range(depth):  # layer 0 attends over the SAR and earlier targets, the others over the source too
        axes.update(dict.fromkeys(io.past(i), {0: "past_targets" if i == 0 else "past_len"}))
        axes.update(dict.fromkeys(io.new(i), {0: "tokens"}))
    specs.append(GraphSpec(
        "step", StepGraph(tr),
        (rand(2, n, dim), modulation, head_modulation, text_k, text_v, rand(n, 2, h, c), rand(n, 2, h, c), *past),
        io.inputs(depth), io.outputs(depth), axes, attention,
    ))
    rows = n * tcfg.d_tok
    specs.append(GraphSpec(
        "sample", BitSampler(tcfg.d_tok),
        (rand(2, n, tcfg.num_logits), torch.empty(rows, 2).exponential_(generator=g),
         torch.tensor([3.0, -2.0]), torch.tensor([1.0]), torch.tensor([0.03])),
        ["logits", "noise", "cfg_weights", "inv_tau", "drop_threshold"], ["bits", "guided_logits"],
        {"logits": {1: "tokens"}, "noise": {0: "rows"}, "bits": {1: "tokens"}, "guided_logits": {0: "rows"}},
    ))
    summed = torch.zeros(1, tcfg.codebook_dim, latent, latent)
    for s, n_s in enumerate(sched.tokens):
        bits = torch.randint(0, 2, (1, n_s, tcfg.d_tok), generator=g)
        last = s == sched.num_scales - 1
        specs.append(GraphSpec(f"next_input_{s}", NextInputGraph(model, s), (bits, summed), ["bits", "summed_codes"],
                               ["summed_codes_out"] if last else ["summed_codes_out", "x_next"]))
    return specs
