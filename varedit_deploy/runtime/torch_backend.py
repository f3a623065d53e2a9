"""Torch backend: the reference modules in bf16 with the fused Triton kernels, CUDA graphs per scale.

It plugs into the same `ScaleLoop` as the other backends: the loop's buffers (KV caches for the
whole schedule, per-scale inputs and logits) are torch tensors on the device; `step` writes each
layer's new K/V straight into the cache slot from the fused `prep_qkv` kernel and attends over
[SAR reference ;] cache with `scale_attention`; `sample` and `next_input_{s}` are the fused
sampler kernels. Text K/V come once per edit from `text_cond`, T5 runs on the real tokens only.
On a GPU every (graph, shapes, addresses) call runs once eagerly and is then captured as a CUDA
graph and replayed. On a CPU (Triton's interpreter) it runs eagerly: that is how CI checks it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..artifact import Manifest
from ..model.codes import latent_to_tokens
from ..model.loaded import VAREditModel
from ..model.sampler import guided_logits
from ..plugins.attention import prep_qkv, scale_attention
from ..plugins.sampler import accumulate_codes, next_tokens, sample_bits
from .backend import Backend, GraphRunner

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}


def _joined(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The cache rows [past ; new] as one view: the loop's slot starts where the past ends."""
    adjacent = (new.untyped_storage().data_ptr() == past.untyped_storage().data_ptr()
                and new.storage_offset() == past.storage_offset() + past.numel())
    assert adjacent, "cache views are not adjacent"
    shape = (past.shape[0] + new.shape[0], *past.shape[1:])
    return torch.as_strided(new, shape, new.stride(), new.storage_offset() - past.numel())


@dataclass
class TorchGraph(GraphRunner):
    name: str
    fn: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], None]
    cuda_graphs: bool

    def __post_init__(self) -> None:
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    def run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            if not self.cuda_graphs:
                self.fn(inputs, outputs)
            else:
                key = tuple((k, v.data_ptr(), tuple(v.shape)) for k, v in (*inputs.items(), *outputs.items()))
                graph = self.graphs.get(key)
                if graph is None:
                    self.fn(inputs, outputs)  # warm-up: lazy init, autotuning, allocator growth
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        self.fn(inputs, outputs)
                    self.graphs[key] = graph
                graph.replay()
            if next(iter(outputs.values())).is_cuda:
                torch.cuda.synchronize()  # per-stage timings are host clocks: finish before returning


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, manifest: Manifest, model: VAREditModel, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16, cuda_graphs: bool | None = None):
        super().__init__(manifest)
        self.device = torch.device(device)
        self.model, self.dtype = model, dtype
        tr = model.transformer.to(self.device)
        for blk in tr.blocks:  # as official: blocks in bf16, the rest (text, embeddings, head) fp32
            blk.to(dtype)
        model.vae.to(self.device)
        if model.text_encoder is not None:
            model.text_encoder.model.to(self.device)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs

    # --------------------------------------------------------------- buffers
    def empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=_TORCH_DTYPES[np.dtype(dtype)], device=self.device)

    def write(self, dst: torch.Tensor, src: np.ndarray) -> None:
        dst.copy_(torch.from_numpy(np.ascontiguousarray(src)).to(dst.dtype))

    def read(self, src: torch.Tensor) -> np.ndarray:
        return src.detach().cpu().numpy().copy()

    # ---------------------------------------------------------------- graphs
    def _load(self, name: str) -> GraphRunner:
        if name.startswith("next_input_"):
            scale = int(name.rsplit("_", 1)[1])
            return TorchGraph(name, lambda i, o: self._next_input(scale, i, o), self.cuda_graphs)
        fn = getattr(self, f"_{name}")
        eager = name in ("text_encoder", "text_cond", "vae_encoder", "vae_decoder", "source_embed", "sar_pool")
        return TorchGraph(name, fn, self.cuda_graphs and not eager)  # once-per-edit graphs need no capture

    def _autocast(self):
        if self.dtype == torch.float32:  # fp32 (CPU checks): no autocast at all
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _text_encoder(self, i, o) -> None:
        o["text_features"].copy_(self.model.text_encoder.model(input_ids=i["input_ids"]).last_hidden_state.float())

    def _text_cond(self, i, o) -> None:
        with self._autocast():
            out = self.model.transformer.text_condition(i["text_features"])
        for name, value in zip(("start_token", "modulation", "head_modulation", "text_k", "text_v"), out):
            o[name].copy_(value)

    def _vae_encoder(self, i, o) -> None:
        latent = self.model.vae.encoder(i["image"])
        o["source_prefix"].copy_(latent_to_tokens(latent, self.model.config.transformer.patchify))

    def _vae_decoder(self, i, o) -> None:
        with self._autocast():  # the official decoder runs under bf16 autocast
            o["image"].copy_(self.model.vae.decoder(i["summed_codes"]).float())

    def _source_embed(self, i, o) -> None:
        tr = self.model.transformer
        o["x"].copy_(tr.embed_tokens(i["source_prefix"], tr.schedule.num_scales - 1))

    def _sar_pool(self, i, o) -> None:
        sar_k, sar_v = self.model.transformer.sar_pool(i["source_k"], i["source_v"])
        o["sar_k"].copy_(sar_k)
        o["sar_v"].copy_(sar_v)

    def _step(self, i, o) -> None:
        tr = self.model.transformer
        x = i["x"]
        n = x.shape[1]
        cos, sin = tr.step_rope(i["past_k_1"].shape[0], n)  # the source pass too: see VAREditTransformer.step
        with self._autocast():
            for layer, blk in enumerate(tr.blocks):
                past = i[f"past_k_{layer}"].shape[0]
                cache_k = _joined(i[f"past_k_{layer}"], o[f"new_k_{layer}"])
                cache_v = _joined(i[f"past_v_{layer}"], o[f"new_v_{layer}"])
                sar = (i["sar_k"], i["sar_v"]) if layer == 0 else None

                def attend(y, blk=blk, cache_k=cache_k, cache_v=cache_v, past=past, sar=sar):
                    bias = torch.cat([blk.sa.q_bias, torch.zeros_like(blk.sa.q_bias), blk.sa.v_bias])
                    qkv = F.linear(y, blk.sa.mat_qkv.weight, bias).view(2, n, 3, blk.sa.heads, blk.sa.head_dim)
                    q = prep_qkv(qkv.contiguous(), blk.sa.scale_mul_1H11, cos, sin, cache_k, cache_v, past)
                    return scale_attention(q, sar, (cache_k, cache_v)).reshape(2, n, -1).to(y.dtype)

                x = blk.mix(x, i["modulation"][layer], i["text_k"][layer], i["text_v"][layer], attend)
            o["logits"].copy_(tr.logits(x.float(), i["head_modulation"]))

    def _sample(self, i, o) -> None:
        o["guided_logits"].copy_(guided_logits(i["logits"], i["cfg_weights"], i["inv_tau"]))
        sample_bits(i["logits"], i["noise"], i["cfg_weights"], i["inv_tau"], i["drop_threshold"],
                    self.model.config.transformer.d_tok, out=o["bits"])

    def _next_input(self, scale: int, i, o) -> None:
        summed = o["summed_codes_out"]
        summed.copy_(i["summed_codes"])
        accumulate_codes(i["bits"], summed, self.model.config, scale)
        if "x_next" in o:
            tokens = next_tokens(summed, self.model.config, scale + 1)
            o["x_next"].copy_(self.model.transformer.embed_tokens(tokens, scale + 1))
