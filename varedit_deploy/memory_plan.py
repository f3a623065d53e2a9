"""`varedit-deploy plan`: what a model needs in memory per precision, and whether it fits a device.

Computed from the model config alone (docs/spec/transformer.md 1.2, 3.7; docs/spec/vae-text.md 4.2, 6).
Jetson boards share one memory between the OS, CPU and GPU: we reserve 4 GiB (8 GiB boards:
2.5 GiB) for the system. Activation figures are the peak of one graph at a time (the runtime
runs them one after another). Attention is counted fused (no score matrix) below fp32, as
TensorRT builds it for fp16/bf16; fp32 counts the full fp32 score matrix. The transformer's
weights count once: the source pass runs the step graph (one engine, one copy).

T5 runs once per edit, before everything else: run on the CPU it leaves the GPU memory; released
after encoding (`EditPipeline(..., keep_text_encoder=False)`) the peak is the larger of the two
phases instead of their sum. `plan --artifacts` sets the estimate beside what an exported
artifact (and its engines) really hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .builder.capabilities import supported
from .calibration.groups import blocks_quantised_by_default
from .config import ModelConfig
from .engine_set import read_engine_manifest
from .errors import ArtifactError, InputError
from .precisions import QUANTIZED_MODES
from .runtime.loop import loop_layout, text_capacity, text_layout

GIB = 2**30
T5_XL_PARAMS = 1_224_000_000  # Flan-T5-XL encoder (65.8 M of it the embedding)
T5_XL_WO_PARAMS = 24 * 5120 * 2048  # the FFN output layers, kept fp32 in the official fp16 load

DEVICES = {  # total memory in GiB, memory the system keeps
    "orin-agx-64": (64, 4.0), "orin-agx-32": (32, 4.0), "orin-nx-16": (16, 4.0), "orin-nx-8": (8, 2.5),
    "orin-nano-8": (8, 2.5), "thor-128": (128, 4.0),
}
DEVICE_SM = {"orin-agx-64": "sm87", "orin-agx-32": "sm87", "orin-nx-16": "sm87", "orin-nx-8": "sm87",
             "orin-nano-8": "sm87", "thor-128": "sm110"}  # Jetson runs full TensorRT (JetPack)
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
CACHE_DTYPE = {4: "float32", 2: "bfloat16", 1: "int8"}  # by bytes per element
ROWS = ("fp32", "bf16", "fp16", *QUANTIZED_MODES)  # the precisions `plan` prints
INT4_BLOCK = 128  # ModelOpt's block size for int4 weight-only (calibration/ptq.py)


@dataclass(frozen=True)
class MemoryPlan:
    precision: str
    transformer_weights: float
    text_encoder_weights: float
    vae_weights: float
    kv_cache: float
    activations: float
    workspace: float

    @property
    def total(self) -> float:
        return (self.transformer_weights + self.text_encoder_weights + self.vae_weights + self.kv_cache
                + self.activations + self.workspace)

    @property
    def t5_on_cpu(self) -> float:
        return self.total - self.text_encoder_weights

    @property
    def t5_released(self) -> float:
        """Peak when T5 is freed after encoding: its phase (T5 + workspace) or the rest, whichever is larger."""
        return max(self.text_encoder_weights + self.workspace, self.t5_on_cpu)


def transformer_params(config: ModelConfig) -> int:
    t = config.transformer
    c, depth = t.dim, t.depth
    per_block = 16 * c * c + 2 * c * t.mlp_hidden - 8 * c * c + 19 * c + t.heads  # 8C^2 of the FFN at ratio 4
    text = t.text_channels
    non_block = (t.text_maxlen * text + text + t.pool_heads * t.pool_head_dim + 2 * c * text + c
                 + c * c + c + text * c + c + c * c + c + c + 15 * c + t.d_tok * c + c + 6 * c * c + 6 * c
                 + 2 * c * c + 2 * c + t.num_logits * c + t.num_logits)
    return per_block * depth + non_block


def vae_params(config: ModelConfig) -> int:
    v = config.vae
    chans = [v.base_ch * m for m in v.ch_mult]

    def res(cin: int, cout: int) -> int:
        return 2 * cin + 9 * cin * cout + cout + 2 * cout + 9 * cout * cout + cout + (cin * cout + cout if cin != cout else 0)

    enc = 3 * 9 * v.base_ch + v.base_ch
    cin = v.base_ch
    for i, cout in enumerate(chans):
        enc += res(cin, cout) + sum(res(cout, cout) for _ in range(v.num_res_blocks - 1))
        enc += (9 * cout * cout + cout) if i < len(chans) - 1 else 0
        cin = cout
    enc += 2 * res(cin, cin) + 2 * cin + 9 * cin * v.codebook_dim + v.codebook_dim
    dec = 9 * v.codebook_dim * chans[-1] + chans[-1] + 2 * res(chans[-1], chans[-1])
    cin = chans[-1]
    for i in reversed(range(len(chans))):
        cout = chans[i]
        dec += res(cin, cout) + sum(res(cout, cout) for _ in range(v.num_res_blocks))
        dec += (9 * cout * cout + cout) if i > 0 else 0
        cin = cout
    dec += 2 * cin + 9 * cin * 3 + 3
    return enc + dec


def loop_buffer_bytes(config: ModelConfig, cache_dtype: str, text_kv_dtype: str, text_len: int) -> tuple[int, int]:
    """(KV caches, every other buffer) that the scale loop allocates, summed from the loop's own
    layout: caches in `cache_dtype`, text K/V in `text_kv_dtype`, the rest as the loop holds it
    (fp32, int64)."""
    t, sched = config.transformer, config.schedule
    specs = [*loop_layout(t, sched.tokens, sched.starts, sched.source_tokens, sched.latent_side, cache_dtype).values(),
             *text_layout(t, text_capacity(text_len), text_kv_dtype).values()]
    kv = sum(s.nbytes for s in specs if s.kind == "kv_cache")
    return kv, sum(s.nbytes for s in specs) - kv


def kv_cache_bytes(config: ModelConfig, bytes_per: int) -> int:
    """All layers, K and V, CFG batch 2: every layer holds the source and every target scale
    (runtime/kv_cache.py), plus the pooled SAR references of layer 0; the loop's own layout.
    `bytes_per` 1: an 8-bit cache (`quantize --kv-cache int8`)."""
    return loop_buffer_bytes(config, CACHE_DTYPE[bytes_per], "float32", 0)[0]


def buffer_dtypes(precision: str, kv_bytes: int | None = None) -> tuple[str, str]:
    """(cache, text K/V) element types of artifacts and engines of `precision`: fp32 for fp32, 16 bits
    otherwise (a quantised artifact's high precision), the cache 8-bit with `kv_bytes` 1."""
    text = "float32" if precision == "fp32" else "bfloat16"  # fp16 and bf16 alike: two bytes
    return (CACHE_DTYPE[kv_bytes] if kv_bytes else text), text


def block_matmuls(config: ModelConfig) -> list[tuple[int, int]]:
    """(K, N) of the weight products of one block that calibration quantises (calibration/groups.py): qkv,
    proj, cross-attention q and out, fc1, fc2 (the step), and the text's K/V projection (`text_cond`)."""
    c, h = config.transformer.dim, config.transformer.mlp_hidden
    return [(c, 3 * c), (c, c), (c, c), (c, c), (c, h), (h, c), (c, 2 * c)]


def quantized_matmul_bytes(k: int, n: int, mode: str, high_bytes: int = 2) -> int:
    """What one [K, N] weight product stores once ModelOpt quantises it (checked against artifacts in the
    tests): int8/fp8 weights with a per-channel scale and zero point, plus the activation's scale and zero
    point; int4 weights packed two per byte with one scale per block of 128 rows per column."""
    if mode == "int4":
        return (k * n + 1) // 2 + math.ceil(k / INT4_BLOCK) * n * high_bytes
    return k * n + n * (high_bytes + 1) + (high_bytes + 1)


def transformer_bytes(config: ModelConfig, precision: str) -> int:
    """Transformer weights at `precision`; a quantised precision quantises the block products of the
    default recipe (calibration/groups.py) and keeps the rest in fp16."""
    if precision not in QUANTIZED_MODES:
        return transformer_params(config) * BYTES[precision]
    blocks = len(blocks_quantised_by_default(precision, config.transformer.depth))
    shapes = block_matmuls(config)
    quantized_params = blocks * sum(k * n for k, n in shapes)
    return ((transformer_params(config) - quantized_params) * 2
            + blocks * sum(quantized_matmul_bytes(k, n, precision) for k, n in shapes))


def activation_bytes(config: ModelConfig, bytes_per: int, text_len: int, fused_attention: bool) -> int:
    """Peak of one graph: the largest step (or the source pass) or the VAE decoder."""
    t, sched = config.transformer, config.schedule
    worst = 0
    calls = [(n, sched.source_tokens + start + n) for n, start in zip(sched.tokens, sched.starts)]
    for n, keys in calls + [(sched.source_tokens, sched.source_tokens)]:  # (queries, keys); then the source pass
        hidden = 2 * n * (3 * t.dim + t.mlp_hidden + 2 * t.dim) * bytes_per
        scores = 0 if fused_attention else 2 * t.heads * n * max(keys, text_len) * 4  # fp32 scores
        worst = max(worst, hidden + scores)
    side = config.image_size  # VAE decoder peak: two full-resolution maps of the widest full-res level
    vae = 2 * 2 * config.vae.base_ch * 2 * side * side * bytes_per
    return max(worst, vae)


def plan(config: ModelConfig, precision: str, workspace_gib: float, text_len: int, kv_bytes: int | None = None) -> MemoryPlan:
    """Transformer weights at `precision`; T5, VAE and the graphs' activations in fp32 for an fp32 build
    and in 16 bits otherwise (no quantisation recipes for those parts). The KV cache and the loop's other
    buffers are what the runtime allocates (`loop_layout`) for engines of `precision`, which take the
    caches and text K/V in 16 bits below fp32 (`buffer_dtypes`), or 8-bit caches with `kv_bytes` 1."""
    act = 4 if precision == "fp32" else 2
    t5 = 0
    if config.text_encoder_dir:  # the official fp16 load keeps the FFN output layers in fp32
        t5 = T5_XL_PARAMS * 4 if act == 4 else T5_XL_PARAMS * 2 + T5_XL_WO_PARAMS * 2
    kv, loop_rest = loop_buffer_bytes(config, *buffer_dtypes(precision, kv_bytes), text_len)
    graph_peak = activation_bytes(config, act, text_len, fused_attention=precision != "fp32")
    return MemoryPlan(
        precision, transformer_bytes(config, precision) / GIB, t5 / GIB, vae_params(config) * act / GIB,
        kv / GIB, (graph_peak + loop_rest) / GIB, workspace_gib,
    )


def plan_data(config: ModelConfig, device: str | None, memory_gib: float | None, workspace_gib: float,
              text_len: int) -> dict:
    """`plan`'s table as data (what `plan --json` prints): one row per precision, GiB throughout."""
    if device is not None:
        if device not in DEVICES:
            raise InputError(f"unknown device {device!r}; known: {', '.join(DEVICES)} (or use --memory-gib)")
        total, reserved = DEVICES[device]
        budget, where = total - reserved, f"{device}: {total} GiB shared, {reserved} GiB kept for the system"
        can = supported("tensorrt", DEVICE_SM[device])
    else:
        budget, where = float(memory_gib), f"{memory_gib} GiB available"
        can = list(BYTES) + list(QUANTIZED_MODES)
    rows = []
    for precision in ROWS:
        p = plan(config, precision, workspace_gib, text_len)
        kv8 = plan(config, precision, workspace_gib, text_len, kv_bytes=1)
        if precision not in can:
            fits = f"no: no {precision} on {DEVICE_SM[device]}"
        else:  # the first way that fits, cheapest change first
            ways = [("yes", p.total), ("T5 freed", p.t5_released), ("8-bit KV", kv8.total),
                    ("T5 freed, 8-bit KV", kv8.t5_released)]
            fits = next((way for way, peak in ways if peak <= budget), "no")
        rows.append({"precision": precision, "transformer_gib": p.transformer_weights,
                     "text_encoder_gib": p.text_encoder_weights, "vae_gib": p.vae_weights,
                     "kv_cache_gib": p.kv_cache, "kv_cache_dtype": buffer_dtypes(precision)[0],
                     "activations_gib": p.activations, "workspace_gib": p.workspace, "total_gib": p.total,
                     "total_t5_freed_gib": p.t5_released, "total_8bit_kv_gib": kv8.total,
                     "total_t5_freed_8bit_kv_gib": kv8.t5_released, "fits": fits})
    kv, rest = loop_buffer_bytes(config, "bfloat16", "bfloat16", text_len)
    return {"model": config.name, "image_size": config.image_size, "scales": config.schedule.num_scales,
            "where": where, "budget_gib": budget, "text_len": text_len, "rows": rows,
            "torch_fast_path": {"kv_cache_gib": kv / GIB, "other_loop_buffers_gib": rest / GIB}}


def plan_table(data: dict) -> str:
    """`plan_data` as the table `plan` prints."""
    lines = [f"{data['model']} ({data['image_size']} px, {data['scales']} scales), {data['where']}, "
             f"budget {data['budget_gib']:.1f} GiB; below fp32, T5, VAE, activations, the KV cache and the text K/V "
             "are 16-bit (the engines take and give them so); activ. includes the loop's buffers",
             f"{'precision':<9} {'transformer':>11} {'T5-XL':>7} {'VAE':>6} {'KV cache':>9} {'activ.':>7} "
             f"{'workspace':>9} {'total':>7} {'T5 freed':>8} {'8-bit KV':>8}  fits"]
    for r in data["rows"]:
        lines.append(f"{r['precision']:<9} {r['transformer_gib']:>11.2f} {r['text_encoder_gib']:>7.2f} "
                     f"{r['vae_gib']:>6.2f} {r['kv_cache_gib']:>9.2f} {r['activations_gib']:>7.2f} "
                     f"{r['workspace_gib']:>9.2f} {r['total_gib']:>7.2f} {r['total_t5_freed_gib']:>8.2f} "
                     f"{r['total_8bit_kv_gib']:>8.2f}  {r['fits']}")
    lines.append("GiB. int8: W8A8 (TensorRT: Turing, Ampere, Orin); fp8: Ada, Hopper, Blackwell/Thor; int4: weight-only, "
                 "Ampere on. Quantised rows: the block weight products of the default recipe (int8/fp8 keep the first "
                 "and last blocks from depth 8 on), measured per weight as ModelOpt stores them; the rest in fp16 "
                 "(a sensitivity search may keep more). 8-bit KV: `quantize --kv-cache int8`. Attention counted fused "
                 "below fp32. T5 freed: T5 released after encoding (or run on the CPU), the peak is the larger phase; "
                 "8-bit KV: the total with an 8-bit cache. Engines built with --weight-streaming can keep part of "
                 "the transformer weights in host memory (slower).")
    fast = data["torch_fast_path"]
    lines.append(f"torch fast path (bf16 caches and text K/V, the loop's own allocation): KV cache "
                 f"{fast['kv_cache_gib']:.2f} GiB, other loop buffers {fast['other_loop_buffers_gib']:.2f} GiB "
                 f"(fp32 inputs, modulation, logits, codes; {data['text_len']}-token instruction)")
    return "\n".join(lines)


def artifact_data(manifest, engine_dirs: list, workspace_gib: float = 1.0, text_len: int = 77,
                  kv8: bool = False) -> dict:
    """What an artifact (and engine sets) hold, by model part and by graph, beside the estimate; the
    run-time buffers in the types its graphs (or each engine set) take them in. GiB throughout. `kv8`:
    also the same weights with an 8-bit KV cache (what `quantize --kv-cache int8` of it would run with)."""
    config, precision = manifest.config, manifest.precision
    act = 4 if precision == "fp32" else 2
    stored: dict[str, int] = {}
    for g in manifest.graphs.values():
        for part, n in g["weights"]["by_module"].items():
            stored[part] = stored.get(part, 0) + n
    on_disk = sum(f["bytes"] for g in manifest.graphs.values() for f in g["files"])
    summary = manifest.weights
    estimates = {"transformer": transformer_bytes(config, precision), "vae": vae_params(config) * act}
    if "text_encoder" in summary:  # the artifact's own T5 (a tiny one for random-weight exports)
        estimates["text_encoder"] = summary["text_encoder"]["parameters"] * act
    io = manifest.step_io
    step_types = {v["name"]: v["dtype"] for v in (*manifest.graphs["step"]["inputs"], *manifest.graphs["step"]["outputs"])}
    data = {
        "artifact": str(manifest.folder), "model": config.name, "precision": precision, "on_disk_gib": on_disk / GIB,
        "parts": [{"part": part, "estimate_gib": est / GIB, "artifact_gib": stored.get(part, 0) / GIB}
                  for part, est in estimates.items()],
        "constants_gib": (on_disk - sum(stored.values())) / GIB,
        "graphs": [{"graph": name, "mb_on_disk": manifest.graph_bytes(name) / 1e6,
                    "weights_mb": g["weights"]["bytes"] / 1e6, "precision": g["precision"]}
                   for name, g in manifest.graphs.items()],
        "runs": [_run_peak("artifact (ONNX Runtime)", config, precision, stored, manifest.kv_cache_dtype,
                           step_types[io.text_k], workspace_gib, text_len)],
        "engines": [],
    }
    if kv8 and manifest.kv_cache_dtype != "int8":
        data["runs"].append(_run_peak("its weights with an 8-bit KV cache", config, precision, stored, "int8",
                                      step_types[io.text_k], workspace_gib, text_len))
    for folder in engine_dirs:
        engines = read_engine_manifest(folder)
        try:
            data["engines"].append(_engine_set(folder, engines, config, act, summary))
            step = engines["engines"]["step"]
            types = step.get("io") or dict.fromkeys((io.past(0)[0], io.text_k),
                                                    buffer_dtypes(engines["precision"])[1])  # before `io` was recorded
            data["runs"].append(_run_peak(f"engines {Path(folder).name}", config, engines["precision"], stored,
                                          types[io.past(0)[0]], types[io.text_k], workspace_gib, text_len))
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{Path(folder) / 'engines.json'} is not a valid engine manifest "
                                f"({type(e).__name__}: {e}); rebuild the engines") from None
    return data


def _run_peak(where: str, config: ModelConfig, precision: str, stored: dict[str, int], cache_dtype: str,
              text_kv_dtype: str, workspace_gib: float, text_len: int) -> dict:
    """The peak of running the artifact's weights with buffers of these types (estimated activations)."""
    kv, loop_rest = loop_buffer_bytes(config, cache_dtype, text_kv_dtype, text_len)
    act = 4 if precision == "fp32" else 2
    activations = (activation_bytes(config, act, text_len, fused_attention=precision != "fp32") + loop_rest) / GIB
    t5 = stored.get("text_encoder", 0) / GIB
    rest = sum(v for k, v in stored.items() if k != "text_encoder") / GIB + kv / GIB + activations + workspace_gib
    return {"where": where, "kv_cache_dtype": cache_dtype, "text_kv_dtype": text_kv_dtype, "kv_cache_gib": kv / GIB,
            "activations_gib": activations, "workspace_gib": workspace_gib, "total_gib": t5 + rest,
            "total_t5_on_cpu_gib": rest, "total_t5_freed_gib": max(t5 + workspace_gib, rest)}


def _engine_set(folder, data: dict, config: ModelConfig, act: int, summary: dict) -> dict:
    """One engine set's entry of `artifact_data`: its bytes against the estimated weights."""
    b = BYTES.get(data["precision"], 2)  # quantised engines: the VAE and T5 stay 16-bit
    weights = transformer_bytes(config, data["precision"]) + vae_params(config) * min(b, act)
    weights += summary.get("text_encoder", {}).get("parameters", 0) * min(b, act)
    return {"folder": Path(folder).name, "precision": data["precision"],
            "gib": sum(rec["bytes"] for rec in data["engines"].values()) / GIB, "weights_estimate_gib": weights / GIB,
            "weights_stripped": bool(data.get("weights_stripped")),
            "engines": [{"graph": name, "mb": rec["bytes"] / 1e6, "profiles": len(rec["profiles"])}
                        for name, rec in data["engines"].items()]}


def artifact_table(data: dict) -> str:
    """`artifact_data` as the table `plan --artifacts` prints."""
    lines = [f"artifact {data['artifact']}: {data['model']}, {data['precision']} graphs, {data['on_disk_gib']:.2f} GiB "
             "on disk", f"{'part':<14} {'estimate GiB':>12} {'artifact GiB':>12} {'ratio':>7}"]
    for p in data["parts"]:
        lines.append(f"{p['part']:<14} {p['estimate_gib']:>12.3f} {p['artifact_gib']:>12.3f} "
                     f"{p['artifact_gib'] / p['estimate_gib']:>7.3f}")
    lines.append(f"{'graph, consts':<14} {'':>12} {data['constants_gib']:>12.3f}  (protos, RoPE tables, resampling "
                 "matrices)")
    lines.append(f"{'graph':<14} {'MB on disk':>10} {'weights MB':>10}  precision")
    for g in data["graphs"]:
        lines.append(f"{g['graph']:<14} {g['mb_on_disk']:>10.1f} {g['weights_mb']:>10.1f}  {g['precision']}")
    for e in data["engines"]:
        stripped = "; weights stripped (refitted from the artifact at load)" if e["weights_stripped"] else ""
        lines.append(f"engines {e['folder']}: {e['gib']:.3f} GiB for {len(e['engines'])} graphs; weights at "
                     f"{e['precision']} estimated {e['weights_estimate_gib']:.3f} GiB (ratio "
                     f"{e['gib'] / e['weights_estimate_gib']:.3f}; the rest is kernels){stripped}")
        lines += [f"  {r['graph']:<14} {r['mb']:>10.1f} MB, {r['profiles']} profile(s)" for r in e["engines"]]
    for r in data["runs"]:
        lines.append(f"at run time, {r['where']}: KV cache {r['kv_cache_gib']:.2f} GiB ({r['kv_cache_dtype']}), text "
                     f"K/V {r['text_kv_dtype']}, activations {r['activations_gib']:.2f} GiB (estimate), workspace "
                     f"{r['workspace_gib']:.2f} GiB; peak with this artifact's weights {r['total_gib']:.2f} GiB, "
                     f"T5 on the CPU {r['total_t5_on_cpu_gib']:.2f} GiB, T5 released after encoding "
                     f"{r['total_t5_freed_gib']:.2f} GiB")
    return "\n".join(lines)
