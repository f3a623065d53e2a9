"""The scale loop on any backend: text condition, source pass, then step/sample/next per scale.

The source pass is `source_embed`, one run of the `step` graph over the source tokens (empty
past, no SAR: every layer's source K/V land in rows [0, L_src) of the caches) and `sar_pool`
(layer 0's source K/V pooled to every scale): the transformer's weights exist once.

All buffers (KV caches, logits, bits, next inputs, summed codes) are allocated by the backend
once per pipeline from `loop_layout`, the one list of what the loop holds (the memory plan sums
the same list), and reused by every edit; each graph reads and writes them in place. The KV
caches and text K/V are held in the type the graphs take them in (16 bits in 16-bit artifacts,
engines and the torch fast path, as the official code holds them in bf16; int8 in an 8-bit-cache
artifact); everything the official code keeps in fp32 (residual inputs, AdaLN modulation,
logits, codes) stays fp32.

Host transfers per edit: uploads (the sampler constants, the whole edit's noise, teacher bits
when given, zeroed codes) are queued before the first graph, and nothing is read back until
`collect`, which reads the caller's buffers (the decoded image), the bits and guided logits when
asked, and every stage's timing in one synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from math import prod

import numpy as np

from ..artifact import Manifest
from ..config import TransformerConfig
from ..errors import ArtifactError, InputError
from ..graph_io import StepIO
from ..sampling import NoiseSource, SamplerInputs, draw_edit
from .backend import Backend
from .kv_cache import SOURCE, KVCache, StepCall

# Called after each scale's work is queued, with (scale, summed codes buffer): previews, cancellation
# and deadlines happen between scales; an exception raised by the hook ends the edit there. Reading
# the buffer is a host synchronisation on a device backend: the hook decides whether it needs one.
ScaleHook = Callable[[int, object], None]

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int8": 1}
TEXT_CHUNK = 64  # text buffers grow in steps of this many tokens, so their addresses rarely change


@dataclass(frozen=True)
class BufferSpec:
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "kv_cache" or "activations"

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * ITEMSIZE[self.dtype]


def loop_layout(t: TransformerConfig, tokens: tuple[int, ...], starts: tuple[int, ...], source_tokens: int,
                latent_side: int, cache_dtype: str) -> dict[str, BufferSpec]:
    """Every buffer the loop allocates for a pipeline, by name (text buffers: `text_layout`). The
    caches in `cache_dtype`, what the graphs take them in (16-bit, int8 for an 8-bit-cache artifact)."""
    cache = KVCache.layout(t.depth, t.heads, t.head_dim, source_tokens, starts, tokens)
    specs = {f"cache.{name}": BufferSpec(shape, cache_dtype, "kv_cache") for name, shape in cache.items()}

    def act(shape, dtype="float32"):
        return BufferSpec(tuple(shape), dtype, "activations")

    for s, n in enumerate(tokens):
        specs[f"x.{s}"] = act((2, n, t.dim))  # scale 0 is fed the start token
        specs[f"logits.{s}"] = act((2, n, t.num_logits))
        specs[f"bits.{s}"] = act((1, n, t.d_tok), "int64")
        specs[f"guided.{s}"] = act((n * t.d_tok, 2))
    rows = sum(tokens)
    specs["noise"] = act((rows * t.d_tok, 2))  # the whole edit's, uploaded at once
    specs["teacher"] = act((rows, t.d_tok), "int64")
    specs["summed.0"] = specs["summed.1"] = act((1, t.codebook_dim, latent_side, latent_side))
    specs["sampler"] = act((4,))  # cfg weights [2], 1/tau, drop threshold
    specs["modulation"] = act((t.depth, 2, 6, t.dim))
    specs["head_modulation"] = act((2, 2, t.dim))
    specs["prefix"] = act((1, source_tokens, t.d_tok))
    return specs


def text_capacity(length: int) -> int:
    """Tokens the text buffers are allocated for, for an instruction of `length` tokens."""
    return -(-length // TEXT_CHUNK) * TEXT_CHUNK


def text_layout(t: TransformerConfig, length: int, text_kv_dtype: str) -> dict[str, BufferSpec]:
    """T5 features and per-layer text K/V (in `text_kv_dtype`) of an instruction of `length` tokens."""
    kv = (t.depth, 2, t.heads, length, t.head_dim)
    return {"features": BufferSpec((1, length, t.text_channels), "float32", "activations"),
            "text_k": BufferSpec(kv, text_kv_dtype, "activations"),
            "text_v": BufferSpec(kv, text_kv_dtype, "activations")}


def shared_buffer_dtypes(backend: Backend, io: StepIO, depth: int) -> tuple[str, str]:
    """(cache dtype, text K/V dtype): what the graphs that share the caches and the text K/V take and
    give them in, asked of the backend (an artifact's files, or the engines built from them); an
    ArtifactError names every graph that disagrees, since one buffer serves them all."""
    cache, text = backend.tensor_dtype("step", io.past(0)[0]), backend.tensor_dtype("step", io.text_k)
    uses = [("step", name, cache) for i in range(depth) for name in (*io.past(i), *io.new(i))]
    uses += [("step", io.sar_k, cache), ("step", io.sar_v, cache), ("step", io.text_v, text)]
    uses += [("sar_pool", name, cache) for name in ("source_k", "source_v", "sar_k", "sar_v")]
    uses += [("text_cond", name, text) for name in ("text_k", "text_v")]
    wrong = [f"{graph} has {name} in {backend.tensor_dtype(graph, name)}, not {want}"
             for graph, name, want in uses if backend.tensor_dtype(graph, name) != want]
    if wrong:
        raise ArtifactError(f"the {backend.name} graphs of {backend.manifest.folder} disagree on the types of the buffers "
                            f"they share (caches {cache}, text K/V {text}): {'; '.join(wrong)}; export the artifact, "
                            "or build its engines, again, all graphs together")
    return cache, text


@dataclass
class LoopOutput:
    summed: object  # [1, d, H, W]: the loop's buffer (host or device), valid until the next run
    scales: int = 0  # how many scales ran
    marks: list[tuple[str, object, object]] = field(default_factory=list)  # (stage, start, end)
    bits: list[np.ndarray] | None = None  # per scale [1, n, d_tok]; only after `collect(record=True)`
    guided_logits: list[np.ndarray] | None = None  # per scale [n * d_tok, 2], likewise
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, after `collect` (varedit_deploy.timings)


class ScaleLoop:
    def __init__(self, manifest: Manifest, backend: Backend):
        self.backend = backend
        self.io = manifest.step_io
        self.tcfg, sched = manifest.config.transformer, manifest.schedule
        self.tokens, self.starts = tuple(sched["tokens"]), tuple(sched["starts"])
        self.source_tokens, self.latent_side = sched["source_tokens"], sched["latent_side"]
        t = self.tcfg
        self.cache_dtype, self.text_kv_dtype = shared_buffer_dtypes(backend, self.io, t.depth)
        specs = loop_layout(t, self.tokens, self.starts, self.source_tokens, self.latent_side, self.cache_dtype)
        buf = {name: backend.empty(spec.shape, spec.dtype) for name, spec in specs.items()}
        self.cache = KVCache.from_buffers({k.removeprefix("cache."): v for k, v in buf.items() if k.startswith("cache.")},
                                          self.source_tokens, self.starts, self.tokens)
        scales = range(len(self.tokens))
        self.x, self.logits = [buf[f"x.{s}"] for s in scales], [buf[f"logits.{s}"] for s in scales]
        self.bits, self.guided = [buf[f"bits.{s}"] for s in scales], [buf[f"guided.{s}"] for s in scales]
        rows = [0, *accumulate(self.tokens)]
        self.noise = [buf["noise"][a * t.d_tok:b * t.d_tok] for a, b in zip(rows, rows[1:])]
        self.teacher = [buf["teacher"][a:b].reshape(1, b - a, t.d_tok) for a, b in zip(rows, rows[1:])]
        self._noise_all, self._teacher_all, self._sampler = buf["noise"], buf["teacher"], buf["sampler"]
        self.summed = [buf["summed.0"], buf["summed.1"]]
        self.sampler_inputs = [buf["sampler"][0:2], buf["sampler"][2:3], buf["sampler"][3:4]]
        self.modulation, self.head_modulation, self.prefix = buf["modulation"], buf["head_modulation"], buf["prefix"]
        self._text_capacity = 0
        self._text_flat: dict[str, object] = {}
        self._text: dict[int, tuple] = {}  # per instruction length: features, text_k, text_v (views)

    def text_buffers(self, length: int) -> tuple:
        """Features [1, Lt, Ct5] and per-layer text K/V for an instruction of `length` tokens: views
        of buffers sized for the longest instruction so far, so that addresses (and the graphs
        captured on them) stay put from one instruction length to the next."""
        if length > self._text_capacity:
            self._text_capacity = text_capacity(length)
            specs = text_layout(self.tcfg, self._text_capacity, self.text_kv_dtype)
            self._text_flat = {name: self.backend.empty((prod(s.shape),), s.dtype) for name, s in specs.items()}
            self._text.clear()
        if length not in self._text:
            specs = text_layout(self.tcfg, length, self.text_kv_dtype)
            self._text[length] = tuple(self._text_flat[name][:prod(s.shape)].reshape(s.shape)
                                       for name, s in specs.items())
        return self._text[length]

    def _step_io(self, call: StepCall, text_k, text_v) -> tuple[dict, dict]:
        """Inputs and outputs of one `step` call, by the manifest's names; the source pass (SOURCE)
        has the last scale's token count, so it reads x[-1] (the source embedding) and writes
        logits[-1] (unused)."""
        io = self.io
        x, logits = (self.x[-1], self.logits[-1]) if call == SOURCE else (self.x[call], self.logits[call])
        sar_k, sar_v = self.cache.sar(call)
        inputs = {io.x: x, io.modulation: self.modulation, io.head_modulation: self.head_modulation,
                  io.text_k: text_k, io.text_v: text_v, io.sar_k: sar_k, io.sar_v: sar_v}
        outputs = {io.logits: logits}
        for i in range(self.tcfg.depth):
            inputs.update(zip(io.past(i), self.cache.past(i, call)))
            outputs.update(zip(io.new(i), self.cache.slot(i, call)))
        return inputs, outputs

    def _run(self, marks: list, key: str, graph: str, inputs, outputs) -> None:
        start = self.backend.mark()
        self.backend.graph(graph).run(inputs, outputs)
        marks.append((key, start, self.backend.mark()))

    def run(
        self,
        text_features,  # [1, Lt, Ct5]: a host array or a buffer from `text_buffers`
        source_prefix,  # [1, L_src, d_tok]: a host array or `self.prefix`
        sampler: SamplerInputs,
        noise: NoiseSource,
        teacher_bits: list[np.ndarray] | None = None,
        scales: int | None = None,
        on_scale: ScaleHook | None = None,
    ) -> LoopOutput:
        """Queue one edit's transformer work; nothing is read back before `collect`. `scales` stops
        after that many scales (a teacher-forced check of the first scales of a long schedule)."""
        t, backend = self.tcfg, self.backend
        features, text_k, text_v = self.text_buffers(text_features.shape[1])
        if features is not text_features:
            backend.write(features, text_features)
        if source_prefix is not self.prefix:
            backend.write(self.prefix, source_prefix)
        backend.write(self._sampler, np.concatenate(sampler.arrays()))
        backend.write(self._noise_all, draw_edit(noise, [n * t.d_tok for n in self.tokens]))
        scales_run = len(self.tokens) if scales is None else scales
        if teacher_bits is not None:
            if len(teacher_bits) < scales_run:
                raise InputError(f"teacher bits for {len(teacher_bits)} scales; this run has {scales_run}")
            teacher_rows = np.concatenate([np.asarray(b, np.int64).reshape(-1, t.d_tok)
                                           for b in teacher_bits[:scales_run]])
            # the first scales' rows: a run of `scales` needs no more
            backend.write(self._teacher_all[:len(teacher_rows)], teacher_rows)
        summed_in, summed_out = self.summed
        backend.write(summed_in, np.zeros((1, t.codebook_dim, self.latent_side, self.latent_side), np.float32))
        cfg_weights, inv_tau, threshold = self.sampler_inputs
        out = LoopOutput(summed_in)
        marks = out.marks
        self._run(marks, "text_condition", "text_cond", {"text_features": features},
                  {"start_token": self.x[0], "modulation": self.modulation,  # scale 0 is fed the start token
                   "head_modulation": self.head_modulation, "text_k": text_k, "text_v": text_v})

        self._run(marks, "source_pass", "source_embed", {"source_prefix": self.prefix}, {"x": self.x[-1]})
        self._run(marks, "source_pass", "step", *self._step_io(SOURCE, text_k, text_v))
        source_k, source_v = self.cache.source(0)
        self._run(marks, "source_pass", "sar_pool", {"source_k": source_k, "source_v": source_v},
                  {"sar_k": self.cache.sar_k, "sar_v": self.cache.sar_v})

        out.scales = scales_run
        for s in range(out.scales):
            first = len(marks)
            self._run(marks, "step", "step", *self._step_io(s, text_k, text_v))
            self._run(marks, "sample", "sample",
                      {"logits": self.logits[s], "noise": self.noise[s], "cfg_weights": cfg_weights,
                       "inv_tau": inv_tau, "drop_threshold": threshold},
                      {"bits": self.bits[s], "guided_logits": self.guided[s]})
            next_out = {"summed_codes_out": summed_out}
            if s + 1 < len(self.tokens):
                next_out["x_next"] = self.x[s + 1]
            fed_bits = self.bits[s] if teacher_bits is None else self.teacher[s]
            self._run(marks, "next_input", f"next_input_{s}", {"bits": fed_bits, "summed_codes": summed_in}, next_out)
            summed_in, summed_out = summed_out, summed_in
            marks.append((f"scale_{s}", marks[first][1], marks[-1][2]))
            if on_scale is not None:
                on_scale(s, summed_in)
        out.summed = summed_in
        return out

    def collect(self, out: LoopOutput, buffers=(), record: bool = False) -> list[np.ndarray]:
        """One host synchronisation: host copies of `buffers`, and (when `record`) every scale's
        bits and guided logits into `out`; then `out.timings_ms` from the marks (stages summed)."""
        buffers, scales_run = list(buffers), out.scales
        wanted = buffers + (self.bits[:scales_run] + self.guided[:scales_run] if record else [])
        host = self.backend.read_all(wanted)
        if record:
            out.bits = host[len(buffers):len(buffers) + scales_run]
            out.guided_logits = host[len(buffers) + scales_run:]
        out.timings_ms = {}
        for key, start, end in out.marks:
            out.timings_ms[key] = out.timings_ms.get(key, 0.0) + self.backend.seconds(start, end) * 1e3
        return host[:len(buffers)]
