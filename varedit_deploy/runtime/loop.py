"""The scale loop on any backend: text condition, source pass, then step/sample/next per scale.

All buffers (KV caches, logits, bits, next inputs, summed codes) are allocated once per
pipeline from the manifest's schedule and reused by every edit; each graph reads and writes
them in place through the backend's bindings.
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
    summed: np.ndarray  # [1, d, H, W]
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
        t = self.tcfg
        self.cache = KVCache.allocate(t.depth, t.heads, t.head_dim, self.source_tokens, self.starts, self.tokens)
        self.x = [np.zeros((2, n, t.dim), np.float32) for n in self.tokens]
        self.logits = [np.zeros((2, n, t.num_logits), np.float32) for n in self.tokens]
        self.bits = [np.zeros((1, n, t.d_tok), np.int64) for n in self.tokens]
        self.guided = [np.zeros((n * t.d_tok, 2), np.float32) for n in self.tokens]
        self.summed = [np.zeros((1, t.codebook_dim, self.latent_side, self.latent_side), np.float32) for _ in range(2)]

    def _timed(self, timings: dict[str, float], key: str, graph: str, inputs, outputs) -> None:
        t0 = time.perf_counter()
        self.backend.graph(graph).run(inputs, outputs)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    def run(
        self,
        text_features: np.ndarray,  # [1, Lt, Ct5]
        source_prefix: np.ndarray,  # [1, L_src, d_tok]
        sampler: SamplerInputs,
        noise: NoiseSource,
        teacher_bits: list[np.ndarray] | None = None,
    ) -> LoopOutput:
        t = self.tcfg
        timings: dict[str, float] = {}
        lt = text_features.shape[1]
        start = self.x[0][:, :1]  # scale 0's input is the start token, [2, 1, C]
        modulation = np.empty((t.depth, 2, 6, t.dim), np.float32)
        head_modulation = np.empty((2, 2, t.dim), np.float32)
        text_k = np.empty((t.depth, 2, t.heads, lt, t.head_dim), np.float32)
        text_v = np.empty_like(text_k)
        self._timed(timings, "text_condition", "text_cond", {"text_features": text_features},
                    {"start_token": start, "modulation": modulation, "head_modulation": head_modulation,
                     "text_k": text_k, "text_v": text_v})

        src_out = {"sar_k": self.cache.sar_k, "sar_v": self.cache.sar_v}
        for i in range(1, t.depth):
            src_out[f"source_k_{i}"], src_out[f"source_v_{i}"] = self.cache.source(i)
        self._timed(timings, "source_pass", "source_pass",
                    {"source_prefix": source_prefix, "modulation": modulation, "text_k": text_k, "text_v": text_v},
                    src_out)

        cfg_weights, inv_tau, threshold = sampler.arrays()
        summed_in, summed_out = self.summed
        summed_in.fill(0.0)
        out = LoopOutput(summed_in)
        for s, n in enumerate(self.tokens):
            ts = time.perf_counter()
            sar_k, sar_v = self.cache.sar(s)
            step_in = {"x": self.x[s], "modulation": modulation, "head_modulation": head_modulation,
                       "text_k": text_k, "text_v": text_v, "sar_k": sar_k, "sar_v": sar_v}
            step_out = {"logits": self.logits[s]}
            for i in range(t.depth):
                step_in[f"past_k_{i}"], step_in[f"past_v_{i}"] = self.cache.past(i, s)
                step_out[f"new_k_{i}"], step_out[f"new_v_{i}"] = self.cache.slot(i, s)
            self._timed(timings, "step", "step", step_in, step_out)

            noise_s = np.ascontiguousarray(noise.draw(n * t.d_tok), dtype=np.float32)
            self._timed(timings, "sample", "sample",
                        {"logits": self.logits[s], "noise": noise_s, "cfg_weights": cfg_weights,
                         "inv_tau": inv_tau, "drop_threshold": threshold},
                        {"bits": self.bits[s], "guided_logits": self.guided[s]})
            out.bits.append(self.bits[s].copy())
            out.guided_logits.append(self.guided[s].copy())

            fed = self.bits[s] if teacher_bits is None else np.ascontiguousarray(teacher_bits[s], dtype=np.int64)
            next_out = {"summed_codes_out": summed_out}
            if s + 1 < len(self.tokens):
                next_out["x_next"] = self.x[s + 1]
            self._timed(timings, "next_input", f"next_input_{s}", {"bits": fed, "summed_codes": summed_in}, next_out)
            summed_in, summed_out = summed_out, summed_in
            timings[f"scale_{s}"] = time.perf_counter() - ts
        out.summed, out.timings = summed_in.copy(), timings
        return out
