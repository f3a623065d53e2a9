"""The scale loop on any backend: text condition, source pass, then step/sample/next per scale.

All buffers (KV caches, logits, bits, next inputs, summed codes) are allocated by the backend
once per pipeline from the manifest's schedule and reused by every edit; each graph reads and
writes them in place. Host transfers: the text features and source prefix in, each scale's
noise in, the bits and guided logits out (for the caller), the summed codes out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..artifact import Manifest
from ..sampling import NoiseSource, SamplerInputs
from .backend import Backend
from .kv_cache import KVCache


@dataclass
class LoopOutput:
    summed: object  # [1, d, H, W]: the loop's buffer (host or device), valid until the next run
    bits: list[np.ndarray] = field(default_factory=list)  # per scale [1, n, d_tok], as sampled
    guided_logits: list[np.ndarray] = field(default_factory=list)  # per scale [n * d_tok, 2]
    timings: dict[str, float] = field(default_factory=dict)


class ScaleLoop:
    def __init__(self, manifest: Manifest, backend: Backend):
        self.backend = backend
        cfg = manifest.config
        self.tcfg, sched = cfg.transformer, manifest.data["schedule"]
        self.tokens, self.starts = tuple(sched["tokens"]), tuple(sched["starts"])
        self.source_tokens, self.latent_side = sched["source_tokens"], sched["latent_side"]
        t, empty, f32 = self.tcfg, backend.empty, np.float32
        self.cache = KVCache.allocate(t.depth, t.heads, t.head_dim, self.source_tokens, self.starts, self.tokens,
                                      dtype=manifest.kv_cache_dtype, empty=empty)
        self.x = [empty((2, n, t.dim), f32) for n in self.tokens]
        self.logits = [empty((2, n, t.num_logits), f32) for n in self.tokens]
        self.bits = [empty((1, n, t.d_tok), np.int64) for n in self.tokens]
        self.guided = [empty((n * t.d_tok, 2), f32) for n in self.tokens]
        self.noise = [empty((n * t.d_tok, 2), f32) for n in self.tokens]
        self.teacher = [empty((1, n, t.d_tok), np.int64) for n in self.tokens]
        self.summed = [empty((1, t.codebook_dim, self.latent_side, self.latent_side), f32) for _ in range(2)]
        self.sampler_inputs = [empty((2,), f32), empty((1,), f32), empty((1,), f32)]
        self.modulation = empty((t.depth, 2, 6, t.dim), f32)
        self.head_modulation = empty((2, 2, t.dim), f32)
        self.prefix = empty((1, self.source_tokens, t.d_tok), f32)
        self._text: dict[int, tuple] = {}  # per instruction length: features, text_k, text_v

    def text_buffers(self, length: int) -> tuple:
        """Features [1, Lt, Ct5] and per-layer text K/V for an instruction of `length` tokens."""
        if length not in self._text:
            t = self.tcfg
            kv = (t.depth, 2, t.heads, length, t.head_dim)
            self._text[length] = (self.backend.empty((1, length, t.text_channels), np.float32),
                                  self.backend.empty(kv, np.float32), self.backend.empty(kv, np.float32))
        return self._text[length]

    def _timed(self, timings: dict[str, float], key: str, graph: str, inputs, outputs) -> None:
        t0 = time.perf_counter()
        self.backend.graph(graph).run(inputs, outputs)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    def run(
        self,
        text_features,  # [1, Lt, Ct5]: a host array or a buffer from `text_buffers`
        source_prefix,  # [1, L_src, d_tok]: a host array or `self.prefix`
        sampler: SamplerInputs,
        noise: NoiseSource,
        teacher_bits: list[np.ndarray] | None = None,
    ) -> LoopOutput:
        t, be = self.tcfg, self.backend
        timings: dict[str, float] = {}
        features, text_k, text_v = self.text_buffers(text_features.shape[1])
        if features is not text_features:
            be.write(features, text_features)
        if source_prefix is not self.prefix:
            be.write(self.prefix, source_prefix)
        for dst, src in zip(self.sampler_inputs, sampler.arrays()):
            be.write(dst, src)
        cfg_weights, inv_tau, threshold = self.sampler_inputs
        self._timed(timings, "text_condition", "text_cond", {"text_features": features},
                    {"start_token": self.x[0], "modulation": self.modulation,  # scale 0 is fed the start token
                     "head_modulation": self.head_modulation, "text_k": text_k, "text_v": text_v})

        src_out = {"sar_k": self.cache.sar_k, "sar_v": self.cache.sar_v}
        for i in range(1, t.depth):
            src_out[f"source_k_{i}"], src_out[f"source_v_{i}"] = self.cache.source(i)
        self._timed(timings, "source_pass", "source_pass",
                    {"source_prefix": self.prefix, "modulation": self.modulation, "text_k": text_k,
                     "text_v": text_v}, src_out)

        summed_in, summed_out = self.summed
        be.write(summed_in, np.zeros((1, t.codebook_dim, self.latent_side, self.latent_side), np.float32))
        out = LoopOutput(summed_in)
        for s, n in enumerate(self.tokens):
            ts = time.perf_counter()
            sar_k, sar_v = self.cache.sar(s)
            step_in = {"x": self.x[s], "modulation": self.modulation, "head_modulation": self.head_modulation,
                       "text_k": text_k, "text_v": text_v, "sar_k": sar_k, "sar_v": sar_v}
            step_out = {"logits": self.logits[s]}
            for i in range(t.depth):
                step_in[f"past_k_{i}"], step_in[f"past_v_{i}"] = self.cache.past(i, s)
                step_out[f"new_k_{i}"], step_out[f"new_v_{i}"] = self.cache.slot(i, s)
            self._timed(timings, "step", "step", step_in, step_out)

            be.write(self.noise[s], noise.draw(n * t.d_tok))
            self._timed(timings, "sample", "sample",
                        {"logits": self.logits[s], "noise": self.noise[s], "cfg_weights": cfg_weights,
                         "inv_tau": inv_tau, "drop_threshold": threshold},
                        {"bits": self.bits[s], "guided_logits": self.guided[s]})
            out.bits.append(be.read(self.bits[s]))
            out.guided_logits.append(be.read(self.guided[s]))

            fed = self.bits[s]
            if teacher_bits is not None:
                be.write(self.teacher[s], np.asarray(teacher_bits[s], np.int64))
                fed = self.teacher[s]
            next_out = {"summed_codes_out": summed_out}
            if s + 1 < len(self.tokens):
                next_out["x_next"] = self.x[s + 1]
            self._timed(timings, "next_input", f"next_input_{s}", {"bits": fed, "summed_codes": summed_in}, next_out)
            summed_in, summed_out = summed_out, summed_in
            timings[f"scale_{s}"] = time.perf_counter() - ts
        out.summed, out.timings = summed_in, timings
        return out
