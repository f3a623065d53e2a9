"""GPU benchmark: the eager reference in the official order of work vs the torch fast path.

    python benchmarks/gpu_fast_path.py [--models 2b-512 8b-512 8b-1024] [--runs 5] [--out benchmarks/results]

Each model runs in a process of its own (nothing of one model's memory is left when the next is
measured): random weights built on the GPU (blocks bf16, the rest fp32, as the official loader
leaves them) with a random Flan-T5-XL-shaped encoder in fp16; then

* eager, official order: T5 on the instruction padded to 512 tokens, the text condition and every
  layer's text K/V recomputed at every scale, KV caches grown by concatenation, SDPA, each scale's
  noise drawn on the host and uploaded;
* fast path: `EditPipeline.from_model` (T5 on the real tokens, text K/V once, preallocated bf16
  caches, fused Triton attention and sampler, one CUDA graph per scale, one synchronisation).

Equal work at equal precision: both start from the same PIL photo and instruction and end with
the same host image (pre- and post-processing included); T5 fp16 without autocast in both;
blocks bf16 under autocast, the head and AdaLN linears fp32, VAE encoder fp32, decoder bf16
autocast in both. Totals are host wall clocks after a synchronisation, stages are CUDA-event
times, medians of `--runs` edits after a warm-up. Also: peak memory of each path (collected and
reset between them), fraction of the bf16 roofline per scale, and, with the fast path
teacher-forced on the reference's bits under the same noise, logit error and bit agreement per
scale. Writes JSON, a RESULTS.md-ready markdown table and a PNG chart. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = 790.0  # dense bf16 measured on an H200 of this workplace (KINDS.md); H100: the same rate
INSTRUCTION = "replace the red car in front of the house with a blue bicycle and make the sky look like sunset"
PRECISION = ("T5 fp16 (no autocast); blocks bf16 under autocast, head and AdaLN linears fp32; VAE encoder fp32, "
             "decoder bf16 autocast; fast-path KV caches bf16")


def build(name: str, seed: int = 0):
    """Random weights directly on the GPU (no 8B model ever exists in host memory)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from varedit_deploy.config import from_name
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.model.text import T5TextEncoder, load_tokenizer
    from varedit_deploy.model.weights import randomize
    from varedit_deploy.model.tiny_text import write_tokenizer

    config = from_name(name)
    with torch.device("cuda"):
        model = VAREditModel.empty(config)
        for blk in model.transformer.blocks:  # as the official loader: blocks bf16, the rest fp32
            blk.to(torch.bfloat16)
        randomize(model.transformer, seed)
        randomize(model.vae, seed + 1)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_heads=32,
                                     num_layers=24, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                     is_encoder_decoder=False, use_cache=False)).half().eval()
    tmp = Path(tempfile.mkdtemp())
    write_tokenizer(tmp)
    t5.config.save_pretrained(str(tmp))
    encoder = T5TextEncoder.__new__(T5TextEncoder)  # attach the on-device T5 without a weights file
    encoder.tokenizer, encoder.model, encoder.folder, encoder.precision, encoder.device = (
        load_tokenizer(tmp), t5, tmp, "fp16", "cuda")
    model.text_encoder = encoder
    return model


def official_order_edit(model, photo, noise) -> tuple[dict[str, float], list, list]:
    """The eager reference arranged as the official code runs it (see module docstring)."""
    import torch

    from varedit_deploy.imaging import postprocess, preprocess
    from varedit_deploy.model.codes import NextScaleInput, latent_to_tokens
    from varedit_deploy.model.sampler import guided_logits, sample_bits
    from varedit_deploy.sampling import SamplerInputs

    tr, cfg = model.transformer, model.config
    sched = cfg.schedule
    events = {}

    def mark(name):
        events[name] = torch.cuda.Event(enable_timing=True)
        events[name].record()

    t0 = time.perf_counter()
    with torch.inference_mode():
        mark("start")
        ids = model.text_encoder.tokenize(INSTRUCTION)  # fp16 T5 outside autocast, as the official encode_prompt
        padded = torch.zeros(1, 512, dtype=torch.int64, device="cuda")
        padded[0, : len(ids)] = torch.tensor(ids)
        mask = (torch.arange(512, device="cuda") < len(ids)).long()[None]
        feats = model.text_encoder.model(input_ids=padded, attention_mask=mask).last_hidden_state.float()[:, : len(ids)]
        mark("text_encoder")
        pixels = torch.from_numpy(preprocess(photo, cfg.image_size)).cuda()
        prefix = latent_to_tokens(model.vae.encoder(pixels), cfg.transformer.patchify)
        mark("vae_encoder")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cond = tr.text_condition(feats)
            src = tr.source_pass(prefix, cond)
            mark("source_pass")
            h, c = cfg.transformer.heads, cfg.transformer.head_dim
            past_k = [torch.zeros(0, 2, h, c, device="cuda"), *src.layer_k[1:]]
            past_v = [torch.zeros(0, 2, h, c, device="cuda"), *src.layer_v[1:]]
            x = cond.start_token
            summed = torch.zeros(1, cfg.vae.codebook_dim, sched.latent_side, sched.latent_side, device="cuda")
            cw, it, th = (torch.from_numpy(a).cuda() for a in SamplerInputs.from_params(cfg.sampling).arrays())
            bits_out, guided_out = [], []
            for s, (start, n) in enumerate(zip(sched.starts, sched.tokens)):
                cond = tr.text_condition(feats)  # official: text K/V re-projected inside every call
                logits, new_k, new_v = tr.step(x, cond.modulation, cond.head_modulation, cond.text_k, cond.text_v,
                                               src.sar_k[start:start + n], src.sar_v[start:start + n], past_k, past_v)
                past_k = [torch.cat([p, k.to(p.dtype)]) for p, k in zip(past_k, new_k)]
                past_v = [torch.cat([p, v.to(p.dtype)]) for p, v in zip(past_v, new_v)]
                pair = guided_logits(logits.float(), cw, it)
                bits = sample_bits(pair, torch.from_numpy(noise.draw(pair.shape[0])).cuda(), th).view(1, n, -1)
                bits_out.append(bits)
                guided_out.append(pair)
                with torch.autocast("cuda", enabled=False):
                    summed, tokens = NextScaleInput(cfg, s).cuda()(bits, summed)
                if tokens is not None:
                    x = tr.embed_tokens(tokens, s + 1)
                mark(f"scale_{s}")
            image = model.vae.decoder(summed)
            mark("vae_decoder")
        postprocess(image.float().cpu().numpy(), photo.size)  # the host image: the same end point as the fast path
    total = time.perf_counter() - t0
    names = list(events)
    times = {n: events[p].elapsed_time(events[n]) / 1e3 for p, n in zip(names, names[1:])}
    times["transformer"] = sum(v for k, v in times.items() if k.startswith("scale_")) + times["source_pass"]
    times["total"] = total
    return times, [b.cpu().numpy() for b in bits_out], [g.cpu().numpy() for g in guided_out]


def step_flops(config) -> list[float]:
    """FLOPs of each scale step (linear layers + attention, CFG batch 2; docs/spec/transformer.md 6)."""
    t, sched = config.transformer, config.schedule
    p_tok = 14 * t.dim * t.dim * t.depth
    out = []
    for n, start in zip(sched.tokens, sched.starts):
        keys0, keys = n + start + n, sched.source_tokens + start + n
        attention = 4 * n * t.dim * (keys0 + keys * (t.depth - 1)) * 2
        out.append(2 * p_tok * 2 * n + attention)
    return out


def _fresh_peak() -> None:
    """Free what the last phase left (collect first: cycles hold tensors), then reset the peak."""
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def bench(name: str, runs: int, progress=print) -> dict:
    import torch

    from varedit_deploy.imaging import SAMPLE_PHOTO
    from varedit_deploy.imaging import load_image, preprocess
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise, SamplerInputs

    t0 = time.perf_counter()
    model = build(name)
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30
    progress(f"{name}: built in {build_s:.1f} s ({weights_gib:.1f} GiB of weights)")
    photo = load_image(SAMPLE_PHOTO)

    _fresh_peak()
    official_order_edit(model, photo, NumpyNoise(0))  # warm-up
    ref_runs = [official_order_edit(model, photo, NumpyNoise(0)) for _ in range(runs)]
    peak_ref = torch.cuda.max_memory_allocated() / 2**30
    progress(f"{name}: official order {statistics.median(r[0]['total'] for r in ref_runs) * 1e3:.1f} ms")

    _fresh_peak()
    t1 = time.perf_counter()
    pipe = EditPipeline.from_model(model, device="cuda", dtype=torch.bfloat16)
    pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0))  # warm-up: Triton compiles, CUDA-graph capture
    warmup_s = time.perf_counter() - t1
    fast_runs = [{k: v / 1e3 for k, v in pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0)).timings_ms.items()}
                 for _ in range(runs)]  # seconds here, as the official-order timings
    peak_fast = torch.cuda.max_memory_allocated() / 2**30
    progress(f"{name}: fast path {statistics.median(r['total'] for r in fast_runs) * 1e3:.1f} ms "
             f"(first edit {warmup_s:.1f} s)")

    # Agreement: the fast path teacher-forced on the reference's bits, with the same noise.
    _, ref_bits, ref_guided = ref_runs[-1]
    features = pipe.encode_text(INSTRUCTION)
    prefix = pipe.encode_image(preprocess(photo, model.config.image_size))
    loop = pipe.loop.run(features, prefix, SamplerInputs.from_params(model.config.sampling), NumpyNoise(0), ref_bits)
    pipe.loop.collect(loop, record=True)
    logit_err = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in zip(loop.guided_logits, ref_guided)]
    agree = [float(np.mean(a == b)) for a, b in zip(loop.bits, ref_bits)]
    overall = sum(a * b.size for a, b in zip(agree, ref_bits)) / sum(b.size for b in ref_bits)

    med_ref = {k: statistics.median(r[0][k] for r in ref_runs) for k in ref_runs[0][0]}
    med_fast = {k: statistics.median(r[k] for r in fast_runs) for k in fast_runs[0]}
    flops = step_flops(model.config)
    roofline = [f / med_fast[f"scale_{s}"] / 1e12 / PEAK_BF16_TFLOPS for s, f in enumerate(flops)]
    pipe.close()
    return {
        "model": name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": runs,
        "build_seconds": build_s, "fast_path_first_edit_seconds": warmup_s, "precision": PRECISION,
        "official_order_ms": {k: v * 1e3 for k, v in med_ref.items()},
        "fast_path_ms": {k: v * 1e3 for k, v in med_fast.items()},
        "speedup_end_to_end": med_ref["total"] / med_fast["total"],
        "roofline_fraction_per_scale": roofline, "weights_gib": weights_gib,
        "peak_memory_gib_official_order": peak_ref, "peak_memory_gib_fast_path": peak_fast,
        "logit_error_per_scale": logit_err, "bit_agreement_per_scale": agree, "bit_agreement": overall,
    }


def markdown(results: list[dict]) -> str:
    r0 = results[0]
    lines = [f"{r0['gpu']}, torch {r0['torch']}, medians of {r0['runs']} edits after a warm-up; {r0['precision']}.",
             "", "| model | official order ms | fast path ms | speedup | transformer ms (official / fast) "
             "| peak GiB (official / fast) | bits agree (teacher-forced) | worst logit error |",
             "|---|---:|---:|---:|---|---|---:|---:|"]
    for r in results:
        o, f = r["official_order_ms"], r["fast_path_ms"]
        lines.append(f"| {r['model']} | {o['total']:.1f} | {f['total']:.1f} | {r['speedup_end_to_end']:.2f}x "
                     f"| {o['transformer']:.1f} / {f['transformer']:.1f} "
                     f"| {r['peak_memory_gib_official_order']:.1f} / {r['peak_memory_gib_fast_path']:.1f} "
                     f"| {r['bit_agreement']:.5f} | {max(r['logit_error_per_scale']):.2e} |")
    for r in results:
        lines += ["", f"{r['model']} per scale (fast path ms, fraction of the bf16 roofline, bits agree):", "",
                  "| scale | " + " | ".join(str(s) for s in range(len(r["bit_agreement_per_scale"]))) + " |",
                  "|---|" + "---:|" * len(r["bit_agreement_per_scale"])]
        scales = range(len(r["bit_agreement_per_scale"]))
        lines.append("| ms | " + " | ".join(f"{r['fast_path_ms'][f'scale_{s}']:.2f}" for s in scales) + " |")
        lines.append("| roofline | " + " | ".join(f"{x:.2f}" for x in r["roofline_fraction_per_scale"]) + " |")
        lines.append("| bits agree | " + " | ".join(f"{x:.4f}" for x in r["bit_agreement_per_scale"]) + " |")
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["model"] for r in results]
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [r["official_order_ms"]["total"] for r in results], 0.4, label="eager, official order")
    ax.bar(xs + 0.2, [r["fast_path_ms"]["total"] for r in results], 0.4, label="fast path")
    for x, r in zip(xs, results):
        ax.text(x + 0.2, r["fast_path_ms"]["total"], f"{r['speedup_end_to_end']:.1f}x", ha="center", va="bottom")
    ax.set_xticks(xs, names)
    ax.set_ylabel("ms per edit (wall clock, same work)")
    ax.set_title(f"VAREdit edit latency on {results[0]['gpu']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["2b-512", "8b-512", "8b-1024"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--append", action="store_true", help="add to the results already in --out")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model, write --result
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_fast_path.py needs a CUDA GPU (torch.cuda.is_available() is False here)")
    if args.one:
        args.result.write_text(json.dumps(bench(args.one, args.runs, lambda m: print(m, flush=True))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "gpu_fast_path.json"
    results = json.loads(previous.read_text()) if args.append and previous.is_file() else []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            done = subprocess.run([sys.executable, __file__, "--one", name, "--runs", str(args.runs),
                                   "--result", str(result)])
            if done.returncode != 0:
                raise SystemExit(f"{name}: the benchmark process failed (exit {done.returncode})")
            results.append(json.loads(result.read_text()))
        r = results[-1]
        print(f"{name}: official order {r['official_order_ms']['total']:.1f} ms, fast path "
              f"{r['fast_path_ms']['total']:.1f} ms ({r['speedup_end_to_end']:.2f}x), bits agree "
              f"{r['bit_agreement']:.5f}, peak {r['peak_memory_gib_fast_path']:.1f} GiB", flush=True)
        (args.out / "gpu_fast_path.json").write_text(json.dumps(results, indent=1))
        (args.out / "gpu_fast_path.md").write_text(markdown(results))
    chart(results, args.out / "gpu_fast_path.png")


if __name__ == "__main__":
    main()
