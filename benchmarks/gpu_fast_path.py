"""GPU benchmark: the eager reference in the official order of work vs the torch fast path.

    python benchmarks/gpu_fast_path.py [--models 2b-512 8b-512 8b-1024] [--runs 10] [--out DIR] [--chart]

Each model runs in a process of its own (nothing of one model's memory is left when the next is
measured): random weights built on the GPU (blocks bf16, the rest fp32, as the official loader
leaves them) with a random Flan-T5-XL-shaped encoder in fp16; then

* eager, official order: T5 on the instruction padded to 512 tokens, the text condition and every
  layer's text K/V recomputed at every scale, KV caches grown by concatenation, SDPA, each scale's
  noise drawn on the host and uploaded; what the official code builds once (the next-scale
  resamplers, the sampler's constants) is built once here too, outside the timed edits;
* fast path: `EditPipeline.from_model` (T5 on the real tokens, text K/V once, preallocated bf16
  caches, fused Triton attention and sampler, one CUDA graph per scale, one synchronisation).

Equal work at equal precision: both start from the same PIL photo and instruction and end with
the same host image (pre- and post-processing included); T5 fp16 without autocast in both;
blocks bf16 under autocast, the head, AdaLN linears and SAR pooling fp32 (pooling rounds once,
`model/transformer.py`), VAE encoder fp32, decoder bf16 autocast in both.

Order of work per model, so that a run cut short still says the most: build; one edit of each path
(the warm-up: Triton compiles, CUDA graphs are captured), which also gives the reference's bits and
logits; the agreement (the fast path teacher-forced on those bits under the same noise), with both
paths' logits checked finite (NaN logits sample all-zero bits on both sides: agreement 1.0 would be
a lie, so it is then reported as none and the run fails); the peak memory of each path over one
edit; then `--runs` timed edits of each, interleaved (official, fast, official, ...) so that drift
hits both alike, reported as median, minimum and maximum. Totals are host wall clocks after a
synchronisation, stages CUDA-event times. gpu_fast_path.json and .md under --out are rewritten after
every phase and every timed pair; each model's entry says how far it got (`status`). Without a GPU
it stops at once with exit status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from varedit_deploy.fileio import write_text  # noqa: E402

PEAK_BF16_TFLOPS = 790.0  # dense bf16 measured on an H200 of this workplace (KINDS.md); H100: the same rate
INSTRUCTION = "replace the red car in front of the house with a blue bicycle and make the sky look like sunset"
PRECISION = ("T5 fp16 (no autocast); blocks bf16 under autocast, head, AdaLN linears and SAR pooling fp32; "
             "VAE encoder fp32, decoder bf16 autocast; fast-path KV caches bf16")
NO_GPU = 2  # exit status when there is no GPU (benchmarks/gpu_check.sh stops its run on it)


def build(name: str, seed: int = 0):
    """Random weights directly on the GPU (no 8B model ever exists in host memory)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from varedit_deploy.config import from_name
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.model.text import T5TextEncoder, load_tokenizer
    from varedit_deploy.model.tiny_text import write_tokenizer
    from varedit_deploy.model.weights import randomize

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


class Marks:
    """Named points of the device's work: CUDA events on a GPU, the host clock on a CPU (tests)."""

    def __init__(self, device: str):
        import torch

        self.cuda, self.points = device == "cuda", {}
        self._torch = torch

    def mark(self, name: str) -> None:
        if self.cuda:
            self.points[name] = self._torch.cuda.Event(enable_timing=True)
            self.points[name].record()
        else:
            self.points[name] = time.perf_counter()

    def seconds(self) -> dict[str, float]:
        """Seconds from each point to the next, by the later point's name (after a synchronisation)."""
        names = list(self.points)
        if self.cuda:
            return {n: self.points[p].elapsed_time(self.points[n]) / 1e3 for p, n in zip(names, names[1:])}
        return {n: self.points[n] - self.points[p] for p, n in zip(names, names[1:])}


class OfficialOrder:
    """The eager reference arranged as the official code runs it (see the module docstring). What the
    official code builds once per run (the next-scale resamplers, the sampler's constants) is built
    here, once, so that a timed edit holds only the work an official edit does."""

    def __init__(self, model, device: str = "cuda"):
        import torch

        from varedit_deploy.model.codes import NextScaleInput
        from varedit_deploy.sampling import SamplerInputs

        self.model, self.device = model, device
        cfg = model.config
        with torch.device(device):
            self.next_inputs = [NextScaleInput(cfg, s) for s in range(cfg.schedule.num_scales)]
        self.sampler = [torch.from_numpy(a).to(device) for a in SamplerInputs.from_params(cfg.sampling).arrays()]

    def edit(self, photo, noise) -> tuple[dict[str, float], list[np.ndarray], list[np.ndarray]]:
        """(seconds per stage and in total, bits per scale, guided logits per scale) of one edit."""
        import torch

        from varedit_deploy.imaging import postprocess, preprocess
        from varedit_deploy.model.codes import latent_to_tokens
        from varedit_deploy.model.sampler import guided_logits, sample_bits

        model, dev = self.model, self.device
        tr, cfg = model.transformer, model.config
        sched = cfg.schedule
        cw, it, th = self.sampler
        marks = Marks(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            marks.mark("start")
            ids = model.text_encoder.tokenize(INSTRUCTION)  # fp16 T5 outside autocast, as the official encode_prompt
            padded = torch.zeros(1, 512, dtype=torch.int64, device=dev)
            padded[0, : len(ids)] = torch.tensor(ids)
            mask = (torch.arange(512, device=dev) < len(ids)).long()[None]
            feats = model.text_encoder.model(input_ids=padded, attention_mask=mask).last_hidden_state.float()
            feats = feats[:, : len(ids)]
            marks.mark("text_encoder")
            pixels = torch.from_numpy(preprocess(photo, cfg.image_size)).to(dev)
            prefix = latent_to_tokens(model.vae.encoder(pixels), cfg.transformer.patchify)
            marks.mark("vae_encoder")
            with torch.autocast(dev, dtype=torch.bfloat16):
                cond = tr.text_condition(feats)
                src = tr.source_pass(prefix, cond)  # SAR pooled in fp32 inside, rounded once (model/transformer.py)
                marks.mark("source_pass")
                h, c = cfg.transformer.heads, cfg.transformer.head_dim
                past_k = [torch.zeros(0, 2, h, c, device=dev), *src.layer_k[1:]]
                past_v = [torch.zeros(0, 2, h, c, device=dev), *src.layer_v[1:]]
                x = cond.start_token
                summed = torch.zeros(1, cfg.vae.codebook_dim, sched.latent_side, sched.latent_side, device=dev)
                bits_out, guided_out = [], []
                for s, (start, n) in enumerate(zip(sched.starts, sched.tokens)):
                    cond = tr.text_condition(feats)  # official: text K/V re-projected inside every call
                    logits, new_k, new_v = tr.step(x, cond.modulation, cond.head_modulation, cond.text_k,
                                                   cond.text_v, src.sar_k[start:start + n], src.sar_v[start:start + n],
                                                   past_k, past_v)
                    past_k = [torch.cat([p, k.to(p.dtype)]) for p, k in zip(past_k, new_k)]
                    past_v = [torch.cat([p, v.to(p.dtype)]) for p, v in zip(past_v, new_v)]
                    pair = guided_logits(logits.float(), cw, it)
                    bits = sample_bits(pair, torch.from_numpy(noise.draw(pair.shape[0])).to(dev), th).view(1, n, -1)
                    bits_out.append(bits)
                    guided_out.append(pair)
                    with torch.autocast(dev, enabled=False):
                        summed, tokens = self.next_inputs[s](bits, summed)
                    if tokens is not None:
                        x = tr.embed_tokens(tokens, s + 1)
                    marks.mark(f"scale_{s}")
                image = model.vae.decoder(summed)
                marks.mark("vae_decoder")
            postprocess(image.float().cpu().numpy(), photo.size)  # the host image: the same end point as the fast path
        total = time.perf_counter() - t0
        times = marks.seconds()
        times["transformer"] = sum(v for k, v in times.items() if k.startswith("scale_")) + times["source_pass"]
        times["total"] = total
        return times, [b.cpu().numpy() for b in bits_out], [g.cpu().float().numpy() for g in guided_out]


def agreement(fast_bits: list[np.ndarray], fast_logits: list[np.ndarray], ref_bits: list[np.ndarray],
              ref_logits: list[np.ndarray]) -> dict:
    """Bit agreement and logit error per scale, after checking both sides' logits are finite: non-finite
    logits sample the same (all-zero) bits on both sides, so their agreement is reported as none."""
    finite = {"official_order": all(bool(np.isfinite(g).all()) for g in ref_logits),
              "fast_path": all(bool(np.isfinite(g).all()) for g in fast_logits)}
    out = {"finite_logits": finite, "logit_error_per_scale": None, "bit_agreement_per_scale": None,
           "bit_agreement": None}
    if not all(finite.values()):
        return out
    out["logit_error_per_scale"] = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                                    for a, b in zip(fast_logits, ref_logits, strict=True)]
    out["bit_agreement_per_scale"] = [float(np.mean(a == b)) for a, b in zip(fast_bits, ref_bits, strict=True)]
    out["bit_agreement"] = (sum(float(np.sum(a == b)) for a, b in zip(fast_bits, ref_bits))
                            / sum(b.size for b in ref_bits))
    return out


def teacher_forced(pipe, photo, ref_bits: list[np.ndarray], noise) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The fast path's bits and guided logits, teacher-forced on the reference's bits (as many scales as given)."""
    run = pipe.generate(INSTRUCTION, photo, noise=noise, teacher_bits=ref_bits, scales=len(ref_bits), decode=False)
    return run.bits, run.guided_logits


def spread(seconds: list[float]) -> dict:
    """Median, minimum and maximum of timed edits, in ms, and every run."""
    ms = [s * 1e3 for s in seconds]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "runs": ms}


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
    """Free what the last phase left (collect first: cycles hold tensors), then reset the peaks."""
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _peaks() -> dict[str, float]:
    import torch

    return {"allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def publish(out: Path, record: dict) -> None:
    """Replace this model's entry in gpu_fast_path.json and rewrite gpu_fast_path.md (both atomically)."""
    path = out / "gpu_fast_path.json"
    results = json.loads(path.read_text()) if path.is_file() else []
    results = [r for r in results if r["model"] != record["model"]] + [record]
    write_text(path, json.dumps(results, indent=1) + "\n")
    write_text(out / "gpu_fast_path.md", markdown(results))


def bench(name: str, runs: int, out: Path, progress=print) -> dict:
    """Measure one model (see the module docstring), publishing the record after every phase."""
    import torch
    import triton

    from varedit_deploy.imaging import SAMPLE_PHOTO
    from varedit_deploy.imaging import load_image
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    record = {"model": name, "status": "building", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "runs_planned": runs, "runs": 0, "precision": PRECISION,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}

    def phase(status: str, **values) -> None:
        record.update(values, status=status)
        publish(out, record)
        progress(f"{name}: {status}")

    phase("building")
    try:
        t0 = time.perf_counter()
        model = build(name)
        phase("built", build_seconds=time.perf_counter() - t0, weights_gib=torch.cuda.memory_allocated() / 2**30)
        photo = load_image(SAMPLE_PHOTO)
        official = OfficialOrder(model)

        _fresh_peak()
        t1 = time.perf_counter()
        _, ref_bits, ref_logits = official.edit(photo, NumpyNoise(0))  # warm-up; its bits are the reference's
        peak_official = _peaks()
        official_first = time.perf_counter() - t1
        pipe = EditPipeline.from_model(model, device="cuda", dtype=torch.bfloat16)
        t2 = time.perf_counter()
        pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0))  # warm-up: Triton compiles, CUDA graphs are captured
        fast_first = time.perf_counter() - t2
        phase("warmed up", official_order_first_edit_seconds=official_first, fast_path_first_edit_seconds=fast_first)

        found = agreement(*teacher_forced(pipe, photo, ref_bits, NumpyNoise(0)), ref_bits, ref_logits)
        phase("agreement measured", **found)
        _fresh_peak()
        pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0))  # replayed graphs: the steady state's peak
        phase("peak memory measured", peak_memory_official_order=peak_official, peak_memory_fast_path=_peaks())

        official_runs, fast_runs = [], []
        for i in range(runs):
            official_runs.append(official.edit(photo, NumpyNoise(0))[0])
            fast_runs.append({k: v / 1e3 for k, v in pipe.edit(photo, INSTRUCTION, noise=NumpyNoise(0)).timings_ms.items()})
            phase(f"timed {i + 1}/{runs}", runs=i + 1, **timings(model.config, official_runs, fast_runs))
        pipe.close()
        if all(found["finite_logits"].values()):
            phase("complete")
        else:
            phase(f"failed: non-finite logits ({found['finite_logits']}); bit agreement not reported")
    except KeyboardInterrupt:  # the time limit (gpu_check.sh sends SIGINT): say how far it got
        phase(f"interrupted ({record['status']})")
        raise
    except Exception as e:
        phase(f"failed ({record['status']}): {type(e).__name__}: {e}")
        raise
    return record


def timings(config, official_runs: list[dict], fast_runs: list[dict]) -> dict:
    """Medians per stage, the totals' spread and the speed-up, from the timed edits so far."""
    med_ref = {k: statistics.median(r[k] for r in official_runs) for k in official_runs[0]}
    med_fast = {k: statistics.median(r[k] for r in fast_runs) for k in fast_runs[0]}
    pairs = [o["total"] / f["total"] for o, f in zip(official_runs, fast_runs)]
    flops = step_flops(config)
    return {
        "official_order_ms": {k: v * 1e3 for k, v in med_ref.items()},
        "fast_path_ms": {k: v * 1e3 for k, v in med_fast.items()},
        "official_order_total_ms": spread([r["total"] for r in official_runs]),
        "fast_path_total_ms": spread([r["total"] for r in fast_runs]),
        "speedup_end_to_end": med_ref["total"] / med_fast["total"],
        "speedup_per_pair": {"min": min(pairs), "max": max(pairs)},
        "roofline_fraction_per_scale": [f / med_fast[f"scale_{s}"] / 1e12 / PEAK_BF16_TFLOPS
                                        for s, f in enumerate(flops)],
    }


def markdown(results: list[dict]) -> str:
    """The key numbers first, one line per model, then the table and the per-scale detail."""
    lines = []
    for r in results:
        head = f"**{r['model']}** ({r['gpu']}, {r['status']}): "
        if "speedup_end_to_end" in r:
            o, f = r["official_order_total_ms"], r["fast_path_total_ms"]
            head += (f"fast path **{r['speedup_end_to_end']:.2f}x** the official order "
                     f"(per pair {r['speedup_per_pair']['min']:.2f}-{r['speedup_per_pair']['max']:.2f}x; "
                     f"median of {r['runs']} edits each, interleaved: {o['median']:.1f} ms "
                     f"[{o['min']:.1f}-{o['max']:.1f}] vs {f['median']:.1f} ms [{f['min']:.1f}-{f['max']:.1f}])")
        else:
            head += "no timed edits yet"
        if r.get("bit_agreement") is not None:
            head += (f"; bits agree **{r['bit_agreement']:.5f}** teacher-forced, worst logit error "
                     f"{max(r['logit_error_per_scale']):.2e}, logits finite")
        elif "finite_logits" in r:
            head += f"; **no bit agreement: non-finite logits** {r['finite_logits']}"
        lines += [head, ""]
    timed = [r for r in results if "speedup_end_to_end" in r]
    if not timed:
        return "\n".join(lines)
    lines += [f"{timed[0]['gpu']}, torch {timed[0]['torch']}, Triton {timed[0]['triton']}; {timed[0]['precision']}.",
              "", "| model | official order ms (median, min-max) | fast path ms (median, min-max) | speedup "
              "| transformer ms (official / fast) | peak GiB allocated (official / fast) | peak GiB reserved "
              "(official / fast) | bits agree (teacher-forced) | worst logit error |",
              "|---|---:|---:|---:|---|---|---|---:|---:|"]
    for r in timed:
        o, f = r["official_order_total_ms"], r["fast_path_total_ms"]
        po, pf = r.get("peak_memory_official_order", {}), r.get("peak_memory_fast_path", {})
        bits = f"{r['bit_agreement']:.5f}" if r.get("bit_agreement") is not None else "none"
        err = f"{max(r['logit_error_per_scale']):.2e}" if r.get("logit_error_per_scale") else "none"
        lines.append(f"| {r['model']} | {o['median']:.1f} ({o['min']:.1f}-{o['max']:.1f}) "
                     f"| {f['median']:.1f} ({f['min']:.1f}-{f['max']:.1f}) | {r['speedup_end_to_end']:.2f}x "
                     f"| {r['official_order_ms']['transformer']:.1f} / {r['fast_path_ms']['transformer']:.1f} "
                     f"| {po.get('allocated_gib', float('nan')):.1f} / {pf.get('allocated_gib', float('nan')):.1f} "
                     f"| {po.get('reserved_gib', float('nan')):.1f} / {pf.get('reserved_gib', float('nan')):.1f} "
                     f"| {bits} | {err} |")
    for r in timed:
        scales = range(len(r["roofline_fraction_per_scale"]))
        lines += ["", f"{r['model']} per scale (fast path ms, fraction of the bf16 roofline, bits agree):", "",
                  "| scale | " + " | ".join(str(s) for s in scales) + " |", "|---|" + "---:|" * len(scales),
                  "| ms | " + " | ".join(f"{r['fast_path_ms'][f'scale_{s}']:.2f}" for s in scales) + " |",
                  "| roofline | " + " | ".join(f"{x:.2f}" for x in r["roofline_fraction_per_scale"]) + " |"]
        if r.get("bit_agreement_per_scale"):
            lines.append("| bits agree | " + " | ".join(f"{x:.4f}" for x in r["bit_agreement_per_scale"]) + " |")
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if "speedup_end_to_end" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(timed))
    ax.bar(xs - 0.2, [r["official_order_total_ms"]["median"] for r in timed], 0.4, label="eager, official order")
    ax.bar(xs + 0.2, [r["fast_path_total_ms"]["median"] for r in timed], 0.4, label="fast path")
    for x, r in zip(xs, timed):
        ax.text(x + 0.2, r["fast_path_total_ms"]["median"], f"{r['speedup_end_to_end']:.1f}x", ha="center", va="bottom")
    ax.set_xticks(xs, [r["model"] for r in timed])
    ax.set_ylabel("ms per edit (wall clock, same work)")
    ax.set_title(f"VAREdit edit latency on {timed[0]['gpu']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["2b-512", "8b-512", "8b-1024"])
    ap.add_argument("--runs", type=int, default=10, help="timed edits of each path (default 10)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--chart", action="store_true", help="also draw gpu_fast_path.png")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model in this process
    args = ap.parse_args()
    if args.runs < 3:
        ap.error("--runs must be at least 3 (a median of fewer says nothing about the spread)")
    import torch

    if not torch.cuda.is_available():
        print(f"error: gpu_fast_path.py needs a CUDA GPU; torch {torch.__version__} sees none "
              f"(torch.cuda.is_available() is False, CUDA build: {torch.version.cuda or 'none'})", flush=True)
        return NO_GPU
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        record = bench(args.one, args.runs, args.out, lambda m: print(m, flush=True))
        return 0 if record["status"] == "complete" else 1
    failed = []
    # A time limit's SIGINT reaches the model's process too: this one waits while it records how far it got.
    # (A Python handler, not SIG_IGN: an ignored SIGINT would be inherited, and the model's process would
    # never see its KeyboardInterrupt.)
    signal.signal(signal.SIGINT, lambda *_: None)
    for name in args.models:
        done = subprocess.run([sys.executable, __file__, "--one", name, "--runs", str(args.runs), "--out", str(args.out)])
        if done.returncode != 0:
            failed.append(f"{name} (exit {done.returncode})")
        if done.returncode in (-signal.SIGINT, 128 + signal.SIGINT):
            break  # interrupted: no time for the next model
    path = args.out / "gpu_fast_path.json"
    results = json.loads(path.read_text()) if path.is_file() else []
    print(markdown(results), flush=True)
    if args.chart and any("speedup_end_to_end" in r for r in results):
        chart(results, args.out / "gpu_fast_path.png")
    if failed:
        print(f"error: the benchmark failed for {', '.join(failed)}; gpu_fast_path.json says how far each got")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
