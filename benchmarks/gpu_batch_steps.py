"""What does a batch of B requests cost per request, step by step, on a GPU? The measurement the batch axis waits for.

    python benchmarks/gpu_batch_steps.py [--model 2b-512] [--batches 1,4,16] [--device auto|cuda|cpu] [--out DIR]

`batch_headroom.py` bounds what batching can gain at the roofline (about 1.1x for the release
models: an edit is compute bound except at its smallest scales). Real engines are not at the
roofline where a step is small, so this measures it on the engine that would be batched: the torch
fast path's `step` (runtime/torch_backend.py `Stages.step`: bf16 blocks under autocast, the fused
Triton attention writing K/V straight into bf16 caches, the fp32 head), for the source pass and
every scale, for B requests at once ([2B, n, C] rows over caches of every earlier scale), each step
captured in a CUDA graph (as the fast path runs it) and timed over replays with CUDA events. Random
weights and inputs (the time of a step does not depend on their values). batch_steps.json and .md
under --out are rewritten after every step measured (`complete` says whether all were); batch 1
and the largest batch go first, so a run cut short still compares the two ends.

With `--device cpu` (or `auto` without a GPU) it runs the same steps eagerly in float32 in Triton's
interpreter, for checking the script on a tiny model; CPU times say nothing about a GPU.
`--device cuda` without a GPU stops at once with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from varedit_deploy.fileio import write_text  # noqa: E402

TEXT_TOKENS = 32  # instruction length (docs/spec/transformer.md 6 assumes the same)
NO_GPU = 2


def build(name: str, device: torch.device):
    """The fast path's step stages over a transformer with random weights made on `device`; blocks in bf16
    on a GPU, as the official loader leaves them (the VAE is not needed and stays unallocated)."""
    from varedit_deploy.config import from_name
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.model.weights import randomize
    from varedit_deploy.graph_io import StepIO
    from varedit_deploy.runtime.torch_backend import Stages

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = VAREditModel.empty(from_name(name))
    with torch.no_grad():
        randomize(model.transformer, seed=0)
    for blk in model.transformer.blocks:  # as TorchBackend does
        blk.to(dtype)
        blk.ca_norm.float()
    return Stages(model, StepIO(), device, dtype)


class BatchSteps:
    """Inputs and outputs of every step of one edit for a batch of `batch` requests, laid out as the
    scale loop binds them: caches sized for the last scale, each step's past and slot adjacent views."""

    def __init__(self, stages, batch: int, device: torch.device):
        t, sched = stages.config.transformer, stages.config.schedule
        rows, self.stages, self.sched, self.depth = 2 * batch, stages, sched, t.depth
        g = torch.Generator(device).manual_seed(batch)

        def rand(*shape, dtype=torch.float32, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

        total = sched.source_tokens + sched.starts[-1] + sched.tokens[-1]
        self.k = [rand(total, rows, t.heads, t.head_dim, dtype=stages.dtype) for _ in range(t.depth)]
        self.v = [rand(total, rows, t.heads, t.head_dim, dtype=stages.dtype) for _ in range(t.depth)]
        self.sar = rand(sched.starts[-1] + sched.tokens[-1], rows, t.heads, t.head_dim, dtype=stages.dtype)
        io = stages.io
        self.shared = {io.modulation: rand(t.depth, rows, 6, t.dim, scale=0.3),
                       io.head_modulation: rand(rows, 2, t.dim, scale=0.3),
                       io.text_k: rand(t.depth, rows, t.heads, TEXT_TOKENS, t.head_dim, dtype=stages.dtype),
                       io.text_v: rand(t.depth, rows, t.heads, TEXT_TOKENS, t.head_dim, dtype=stages.dtype)}
        self.x = {n: rand(rows, n, t.dim) for n in {*sched.tokens, sched.source_tokens}}
        self.logits = {n: torch.empty(rows, n, t.num_logits, device=device) for n in self.x}

    def names(self) -> list[str]:
        return ["source_pass", *(f"scale_{s}" for s in range(len(self.sched.tokens)))]

    def call(self, index: int):
        """A closure running step `index` (0: the source pass) on its views, as the scale loop binds them."""
        from varedit_deploy.runtime.kv_cache import SOURCE, cache_rows

        sched = self.sched
        call = SOURCE if index == 0 else index - 1
        n = sched.source_tokens if call == SOURCE else sched.tokens[call]

        def view(kind: str, layer: int, cache: torch.Tensor) -> torch.Tensor:
            return cache[slice(*cache_rows(kind, layer, call, sched.source_tokens, sched.starts, sched.tokens))]

        io = self.stages.io
        inputs = {io.x: self.x[n], **self.shared, io.sar_k: view("sar", 0, self.sar), io.sar_v: view("sar", 0, self.sar)}
        outputs = {io.logits: self.logits[n]}
        for i in range(self.depth):
            inputs.update(zip(io.past(i), (view("past", i, self.k[i]), view("past", i, self.v[i]))))
            outputs.update(zip(io.new(i), (view("slot", i, self.k[i]), view("slot", i, self.v[i]))))
        return lambda: self.stages.step(inputs, outputs)


def time_call(fn, device: torch.device, repeats: int, pool=None) -> float:
    """Median ms of `fn`: replays of its CUDA graph on a GPU, eager calls on the CPU."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    fn()  # as the fast path: one eager run (Triton compiles, lazy initialisation), then the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
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
    graph.reset()
    return statistics.median(times)


def measuring_order(batches: list[int]) -> list[int]:
    """The smallest batch, then the largest, then the rest: a run cut short still has both ends."""
    ordered = sorted(set(batches))
    if len(ordered) < 2:
        return ordered
    return [ordered[0], ordered[-1], *ordered[1:-1]]


def measure(name: str, batches: list[int], device: torch.device, repeats: int, publish) -> dict[int, dict[str, float]]:
    """ms per step per batch size; `publish(per_batch)` after every step measured."""
    stages = build(name, device)
    pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
    per_batch: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for b in measuring_order(batches):
            steps = BatchSteps(stages, b, device)
            per_batch[b] = {}
            for i, step in enumerate(steps.names()):
                per_batch[b][step] = time_call(steps.call(i), device, repeats, pool)
                print(f"  {name} batch {b:>2} {step:<12} {per_batch[b][step]:9.3f} ms", flush=True)
                publish(per_batch)
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return per_batch


def report(name: str, per_batch: dict[int, dict[str, float]], device_name: str, complete: bool) -> str:
    batches = sorted(per_batch)
    b1, top = batches[0], batches[-1]
    steps = list(per_batch[b1])
    lines = [f"# Batched steps of {name} ({device_name}){'' if complete else ' - incomplete'}", "",
             "`python benchmarks/gpu_batch_steps.py`: ms per step for the whole batch (the torch fast path's step, "
             f"CUDA graph replays, median), and the gain per request of batch {top} over batch {b1}.", "",
             "| step | " + " | ".join(f"batch {b} ms" for b in batches) + f" | per-request gain at {top} |",
             "|---|" + "---:|" * (len(batches) + 1)]
    for step in steps:
        cells = [f"{per_batch[b][step]:.3f}" if step in per_batch[b] else "-" for b in batches]
        gain = (f"{per_batch[b1][step] / (per_batch[top][step] / top * b1):.2f}x"
                if step in per_batch[top] and top != b1 else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {gain} |")
    if all(set(per_batch[b]) == set(steps) for b in batches):
        totals = {b: sum(per_batch[b].values()) for b in batches}
        lines.append("| **transformer per edit** | " + " | ".join(f"{totals[b] / b:.2f} / request" for b in batches)
                     + f" | **{totals[b1] / b1 / (totals[top] / top):.2f}x** |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="2b-512")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_check_out")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda, and torch {torch.__version__} sees no CUDA GPU "
              f"(CUDA build: {torch.version.cuda or 'none'})", flush=True)
        return NO_GPU
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cpu":  # before the kernels are defined: Triton reads it then
        os.environ["TRITON_INTERPRET"] = "1"
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU, float32, Triton's interpreter"
    batches = sorted({int(b) for b in args.batches.split(",")})
    args.out.mkdir(parents=True, exist_ok=True)

    def publish(per_batch: dict[int, dict[str, float]], complete: bool = False) -> None:
        write_text(args.out / "batch_steps.json", json.dumps(
            {"model": args.model, "device": device_name, "torch": torch.__version__, "complete": complete,
             "ms": per_batch}, indent=2) + "\n")
        write_text(args.out / "batch_steps.md", report(args.model, per_batch, device_name, complete))

    per_batch = measure(args.model, batches, device, args.repeats, publish)
    publish(per_batch, complete=True)
    print(report(args.model, per_batch, device_name, True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
