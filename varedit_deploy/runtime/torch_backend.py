"""Torch backend: the reference modules in bf16 with the fused Triton kernels, CUDA graphs per scale.

It plugs into the same `ScaleLoop` as the other backends: the loop's buffers are torch tensors on
the device, the KV caches and text K/V in the compute dtype (bf16: what the attention kernel's
tensor cores read); `step` writes each layer's new K/V straight into the cache slot from the
fused `prep_qkv` kernel and attends over [SAR reference ;] cache with `scale_attention`; `sample`
and `next_input_{s}` are the fused sampler kernels. Text K/V come once per edit from `text_cond`,
T5 runs on the real tokens only. Precision follows the official run (docs/spec/transformer.md 3.12):
blocks in bf16 under autocast, the text condition's AdaLN linears and the head in fp32.

On a GPU nothing synchronises the host between graphs: uploads go through pinned staging
memory, marks are CUDA events, and `read_all` waits once. Every (graph, shapes, addresses) call
of a per-scale graph runs once eagerly and is then captured as a CUDA graph and replayed. All
captures share one memory pool: a graph's temporaries are dead once it has run (its results are
copied into the loop's buffers), and graphs replay one at a time on one stream, so one pool the
size of the largest step serves them all (one pool per graph would hold ~31 for 2B). On a CPU
(Triton's interpreter) it runs eagerly: that is how CI checks it, in fp32 and in bf16.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..artifact import Manifest
from ..graph_io import StepIO
from ..model.attention import head_temperature
from ..model.codes import latent_to_tokens
from ..model.loaded import VAREditModel
from ..model.sampler import guided_logits
from ..plugins.attention import prep_qkv, scale_attention
from ..plugins.sampler import accumulate_codes, next_tokens, sample_bits
from .backend import Backend, GraphRunner

_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}
# Captured graphs kept per runner (a step graph per scale and instruction length); the oldest go first.
MAX_GRAPHS = 128


def _dtype_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def _joined(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The cache rows [past ; new] as one view: the loop's slot starts where the past ends."""
    adjacent = (new.untyped_storage().data_ptr() == past.untyped_storage().data_ptr()
                and new.storage_offset() == past.storage_offset() + past.numel())
    assert adjacent, "cache views are not adjacent"
    shape = (past.shape[0] + new.shape[0], *past.shape[1:])
    return torch.as_strided(new, shape, new.stride(), new.storage_offset() - past.numel())


class Stages:
    """What each graph computes, on the model alone. Runners hold this, not the backend, so that
    backend -> runners -> stages has no cycle and dropping a pipeline frees its device memory."""

    def __init__(self, model: VAREditModel, io: StepIO, device: torch.device, dtype: torch.dtype):
        self.model, self.io, self.device, self.dtype = model, io, device, dtype
        self.config = model.config
        with torch.no_grad():  # per layer, once: the kernel takes the temperature, not scale_mul
            self.temperature = [head_temperature(blk.sa.scale_mul_1H11).reshape(-1).contiguous()
                                for blk in model.transformer.blocks]

    def autocast(self):
        if self.dtype == torch.float32:  # fp32 (CPU checks): no autocast at all
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def text_encoder(self, i, o) -> None:
        o["text_features"].copy_(self.model.text_encoder.model(input_ids=i["input_ids"]).last_hidden_state.float())

    def text_cond(self, i, o) -> None:
        with self.autocast():
            out = self.model.transformer.text_condition(i["text_features"])
        for name, value in zip(("start_token", "modulation", "head_modulation", "text_k", "text_v"), out):
            o[name].copy_(value)

    def vae_encoder(self, i, o) -> None:
        latent = self.model.vae.encoder(i["image"])
        o["source_prefix"].copy_(latent_to_tokens(latent, self.config.transformer.patchify))

    def vae_decoder(self, i, o) -> None:
        with self.autocast():  # the official decoder runs under bf16 autocast
            o["image"].copy_(self.model.vae.decoder(i["summed_codes"]).float())

    def source_embed(self, i, o) -> None:
        tr = self.model.transformer
        with self.autocast():  # the official word_embed runs under autocast
            o["x"].copy_(tr.embed_tokens(i["source_prefix"], tr.schedule.num_scales - 1))

    def sar_pool(self, i, o) -> None:
        sar_k, sar_v = self.model.transformer.sar_pool(i["source_k"], i["source_v"])
        o["sar_k"].copy_(sar_k)
        o["sar_v"].copy_(sar_v)

    def step(self, i, o) -> None:
        tr, io = self.model.transformer, self.io
        x = i[io.x]
        rows, n = x.shape[:2]  # rows: the CFG pair (2), or 2B for a batch of B edits (gpu_batch_steps.py)
        # the source pass too: see VAREditTransformer.step
        cos, sin = tr.step_rope(i[io.past(1)[0]].shape[0], n)
        with self.autocast():
            for layer, blk in enumerate(tr.blocks):
                (past_k, past_v), (new_k, new_v) = io.past(layer), io.new(layer)
                past = i[past_k].shape[0]
                cache_k, cache_v = _joined(i[past_k], o[new_k]), _joined(i[past_v], o[new_v])
                sar = (i[io.sar_k], i[io.sar_v]) if layer == 0 else None

                def attend(y, blk=blk, cache_k=cache_k, cache_v=cache_v, past=past, sar=sar, layer=layer):
                    bias = torch.cat([blk.sa.q_bias, torch.zeros_like(blk.sa.q_bias), blk.sa.v_bias])
                    qkv = F.linear(y, blk.sa.mat_qkv.weight, bias).view(rows, n, 3, blk.sa.heads, blk.sa.head_dim)
                    q = prep_qkv(qkv.contiguous(), self.temperature[layer], cos, sin, cache_k, cache_v, past)
                    return scale_attention(q, sar, (cache_k, cache_v)).reshape(rows, n, -1)

                x = blk.mix(x, i[io.modulation][layer], i[io.text_k][layer], i[io.text_v][layer], attend)
        o[io.logits].copy_(tr.logits(x, i[io.head_modulation]))  # fp32 head, autocast off inside

    def sample(self, i, o) -> None:
        o["guided_logits"].copy_(guided_logits(i["logits"], i["cfg_weights"], i["inv_tau"]))
        sample_bits(i["logits"], i["noise"], i["cfg_weights"], i["inv_tau"], i["drop_threshold"],
                    self.config.transformer.d_tok, out=o["bits"])

    def next_input(self, scale: int, i, o) -> None:
        summed = o["summed_codes_out"]
        summed.copy_(i["summed_codes"])
        accumulate_codes(i["bits"], summed, self.config, scale)
        if "x_next" in o:
            tokens = next_tokens(summed, self.config, scale + 1)
            with self.autocast():  # the official word_embed runs under autocast too
                o["x_next"].copy_(self.model.transformer.embed_tokens(tokens, scale + 1))


class TorchGraph(GraphRunner):
    """One graph: eager, or captured once per (shapes, addresses) as a CUDA graph into the backend's
    shared memory pool `pool` and replayed."""

    def __init__(self, name: str, fn, cuda_graphs: bool, pool=None):
        self.name, self.fn, self.cuda_graphs, self.pool = name, fn, cuda_graphs, pool
        self.graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()

    def run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            if not self.cuda_graphs:
                self.fn(inputs, outputs)
                return
            key = tuple((k, v.data_ptr(), tuple(v.shape)) for k, v in (*inputs.items(), *outputs.items()))
            graph = self.graphs.get(key)
            if graph is None:
                self.fn(inputs, outputs)  # warm-up: Triton compiles, lazy init, allocator growth
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):  # synchronises: only on the first call with these buffers
                    self.fn(inputs, outputs)
                self.graphs[key] = graph
                if len(self.graphs) > MAX_GRAPHS:
                    self.graphs.popitem(last=False)[1].reset()
            else:
                self.graphs.move_to_end(key)
            graph.replay()

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, manifest: Manifest, model: VAREditModel, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16, cuda_graphs: bool | None = None):
        super().__init__(manifest)
        self.device = torch.device(device)
        self.dtype = dtype
        self.compute_dtype = str(dtype).removeprefix("torch.")
        tr = model.transformer.to(self.device)
        for blk in tr.blocks:  # as official: blocks in bf16, the rest (text, embeddings, head) fp32
            blk.to(dtype)
            # Autocast computes layer_norm in fp32 with the bf16-rounded affine weights; holding those
            # in fp32 is the same arithmetic on CUDA and lets CPU autocast (no such cast) run it too.
            blk.ca_norm.float()
        model.vae.to(self.device)
        if model.text_encoder is not None:
            model.text_encoder.model.to(self.device)
        self.stages = Stages(model, manifest.step_io, self.device, dtype)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None  # one for every capture

    # --------------------------------------------------------------- buffers
    def empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=_TORCH_DTYPES[_dtype_name(dtype)], device=self.device)

    def write(self, dst: torch.Tensor, src: np.ndarray) -> None:
        host = torch.from_numpy(np.ascontiguousarray(src)).to(dst.dtype)
        if host.shape != dst.shape:
            raise ValueError(f"copy of {tuple(host.shape)} into {tuple(dst.shape)}")
        if dst.is_cuda:  # pinned staging: the copy is queued, the host goes on (the allocator keeps it alive)
            dst.copy_(host.pin_memory(), non_blocking=True)
        else:
            dst.copy_(host)

    def read_all(self, buffers) -> list[np.ndarray]:
        hosts = []
        for buffer in buffers:
            src = buffer.detach()
            if src.dtype == torch.bfloat16:  # numpy has no bf16
                src = src.float()
            host = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
            host.copy_(src, non_blocking=src.is_cuda)
            hosts.append(host)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the one wait
        return [h.numpy() for h in hosts]

    def mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if self.device.type != "cuda":
            return end - start
        return start.elapsed_time(end) / 1e3

    # ---------------------------------------------------------------- graphs
    def _load(self, name: str) -> GraphRunner:
        st = self.stages
        if name.startswith("next_input_"):
            scale = int(name.rsplit("_", 1)[1])
            return TorchGraph(name, lambda i, o: st.next_input(scale, i, o), self.cuda_graphs, self.graph_pool)
        eager = name in ("text_encoder", "text_cond", "vae_encoder", "vae_decoder", "source_embed", "sar_pool")
        return TorchGraph(name, getattr(st, name), self.cuda_graphs and not eager,  # once-per-edit: no capture
                          self.graph_pool)

    def close(self) -> None:
        """Release every captured graph (the shared memory pool goes with the last of them)."""
        for runner in self._graphs.values():
            runner.close()
        super().close()
