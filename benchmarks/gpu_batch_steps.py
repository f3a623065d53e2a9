"""What does a batch of B requests cost per request, step by step, on a GPU? The measurement the batch axis waits for.

    python benchmarks/gpu_batch_steps.py [--model 2b-512] [--batches 1,4,16] [--out DIR]

`batch_headroom.py` bounds what batching can gain at the roofline (about 1.1x for the release
models: an edit is compute bound except at its smallest scales). Real engines are not at the
roofline where a step is small, so this measures it: the reference transformer's `step` (the
source pass and every scale) for B requests at once ([2B, n, C], bf16 blocks under autocast as
the official code runs them, a KV cache of every earlier scale), each step captured in a CUDA graph
so that launch overhead is not what is measured, timed with CUDA events. Random weights and inputs
(the time of a step does not depend on their values). Writes batch_steps.json and .md under --out.

Without a GPU it runs the same steps eagerly in float32 on the CPU (for checking the script on a
tiny model; CPU times say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT_TOKENS = 32  # instruction length (docs/spec/transformer.md 6 assumes the same)


def build(name: str, device: torch.device) -> torch.nn.Module:
    """The transformer with random weights made on `device`; blocks in bf16 on a GPU, as the official loader."""
    from varedit_deploy.config import from_name
    from varedit_deploy.model.transformer import VAREditTransformer
    from varedit_deploy.model.weights import randomize

    with torch.device(device):
        tr = VAREditTransformer(from_name(name)).eval()
    if device.type == "cuda":
        for blk in tr.blocks:
            blk.to(torch.bfloat16)
    with torch.no_grad():
        randomize(tr, seed=0)
    return tr


class BatchSteps:
    """Inputs of every step of one edit for a batch of `batch` requests; caches sized for the last scale."""

    def __init__(self, tr, batch: int, device: torch.device):
        t, sched = tr.cfg, tr.schedule
        rows, self.tr, self.sched = 2 * batch, tr, sched
        cache_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        g = torch.Generator(device).manual_seed(batch)

        def rand(*shape, dtype=torch.float32, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

        total = sched.source_tokens + sched.starts[-1] + sched.tokens[-1]
        self.k = [rand(total, rows, t.heads, t.head_dim, dtype=cache_dtype) for _ in range(t.depth)]
        self.v = [rand(total, rows, t.heads, t.head_dim, dtype=cache_dtype) for _ in range(t.depth)]
        self.modulation = rand(t.depth, rows, 6, t.dim, scale=0.3)
        self.head_modulation = rand(rows, 2, t.dim, scale=0.3)
        self.text_k = rand(t.depth, rows, t.heads, TEXT_TOKENS, t.head_dim, dtype=cache_dtype)
        self.text_v = rand(t.depth, rows, t.heads, TEXT_TOKENS, t.head_dim, dtype=cache_dtype)
        self.x = {n: rand(rows, n, t.dim) for n in {*sched.tokens, sched.source_tokens}}
        self.sar = rand(sched.starts[-1] + sched.tokens[-1], rows, t.heads, t.head_dim, dtype=cache_dtype)

    def names(self) -> list[str]:
        return ["source_pass", *(f"scale_{s}" for s in range(len(self.sched.tokens)))]

    def call(self, index: int):
        """A closure running step `index` (0: the source pass) over views of the caches, as the runtime binds them."""
        from varedit_deploy.runtime.kv_cache import SOURCE, cache_rows

        sched = self.sched
        call = SOURCE if index == 0 else index - 1
        n = sched.source_tokens if call == SOURCE else sched.tokens[call]

        def rows(kind: str, layer: int) -> slice:
            return slice(*cache_rows(kind, layer, call, sched.source_tokens, sched.starts, sched.tokens))

        past_k = [k[rows("past", i)] for i, k in enumerate(self.k)]
        past_v = [v[rows("past", i)] for i, v in enumerate(self.v)]
        sar, x = self.sar[rows("sar", 0)], self.x[n]
        return lambda: self.tr.step(x, self.modulation, self.head_modulation, self.text_k, self.text_v, sar, sar,
                                    past_k, past_v)


def time_call(fn, device: torch.device, repeats: int) -> float:
    """Median ms of `fn`: replays of its CUDA graph on a GPU (bf16 autocast), eager calls on the CPU."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)  # no autocast cache in a capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), autocast:
        for _ in range(2):  # warm-up off the capture stream (cuBLAS workspaces, autotuning)
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast:
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def measure(name: str, batches: list[int], device: torch.device, repeats: int) -> dict:
    tr = build(name, device)
    per_batch: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for b in batches:
            steps = BatchSteps(tr, b, device)
            per_batch[b] = {}
            for i, step in enumerate(steps.names()):
                per_batch[b][step] = time_call(steps.call(i), device, repeats)
                print(f"  {name} batch {b:>2} {step:<12} {per_batch[b][step]:9.3f} ms", flush=True)
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return per_batch


def report(name: str, per_batch: dict[int, dict[str, float]], device_name: str) -> str:
    batches = sorted(per_batch)
    b1, top = batches[0], batches[-1]
    steps = list(per_batch[b1])
    lines = [f"# Batched steps of {name} ({device_name})", "",
             "`python benchmarks/gpu_batch_steps.py`: ms per step for the whole batch (CUDA graph replays, median), and "
             f"the gain per request of batch {top} over batch {b1}.", "",
             "| step | " + " | ".join(f"batch {b} ms" for b in batches) + f" | per-request gain at {top} |",
             "|---|" + "---:|" * (len(batches) + 1)]
    for step in steps:
        gain = per_batch[b1][step] / (per_batch[top][step] / top * b1)
        lines.append(f"| {step} | " + " | ".join(f"{per_batch[b][step]:.3f}" for b in batches) + f" | {gain:.2f}x |")
    totals = {b: sum(per_batch[b].values()) for b in batches}
    lines.append("| **transformer per edit** | " + " | ".join(f"{totals[b] / b:.2f} / request" for b in batches)
                 + f" | **{totals[b1] / b1 / (totals[top] / top):.2f}x** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="2b-512")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_check_out")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU, eager float32"
    batches = sorted(int(b) for b in args.batches.split(","))
    per_batch = measure(args.model, batches, device, args.repeats)
    text = report(args.model, per_batch, device_name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_steps.md").write_text(text)
    (args.out / "batch_steps.json").write_text(json.dumps(
        {"model": args.model, "device": device_name, "torch": torch.__version__, "ms": per_batch}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
