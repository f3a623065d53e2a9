"""What the compiler makes of the fused kernels at the release models' real shapes (no GPU needed).

    python benchmarks/kernel_report.py --arch sm90 --json OUT.json [--markdown OUT.md] [--models ...]
    python benchmarks/kernel_report.py --summary sm90.json sm89.json sm87.json    # one table for RESULTS.md

Builds every launch of one edit through the runtime's own launch builders (every scale of 2b-512
and 8b-1024, layer 0 and deeper layers, bf16 and fp16 caches, the key split planned for the
target's usual SM count), compiles each distinct one ahead of time for the target with the
installed Triton, and writes per kernel and configuration: registers, spill and stack bytes,
shared memory, tensor-core instructions (HMMA/HGMMA/... in the SASS), local-memory instructions
and all instructions, plus which scales use it. `tests/test_plugins.py` asserts on the same data
that no 16-bit attention configuration spills and that all use tensor cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # FMA contraction on, as Triton <= 3.9 does by default

MODELS = ("2b-512", "8b-1024")
DTYPES = ("bfloat16", "float16")
# Largest shared memory one block may use (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def report(arch: int, models=MODELS, dtypes=DTYPES, kernels=None, progress=print) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the report compiles kernels, the interpreter does not")
    import torch
    import triton

    from varedit_deploy.config import from_name
    from varedit_deploy.plugins.aot import SM_COUNT, compile_release

    found: dict[tuple, dict] = {}
    compiled: dict = {}  # kernels that do not depend on the cache dtype compile once
    t0 = time.perf_counter()
    for model in models:
        for dtype in dtypes:
            for planned, k in compile_release(from_name(model), getattr(torch, dtype), arch, kernels, progress,
                                              compiled):
                key = (model, dtype, k.name, k.config, k.signature)
                row = found.setdefault(key, {"model": model, "cache_dtype": dtype, **k.stats(), "uses": []})
                row["uses"].append(f"{planned.scale}:{planned.layer}")
    rows = list(found.values())
    for row in rows:
        row["shared_limit"] = SHARED_LIMIT.get(arch)
    return {"arch": f"sm{arch}", "sm_count": SM_COUNT.get(arch), "triton": triton.__version__,
            "torch": torch.__version__, "compilations": len(compiled), "seconds": round(time.perf_counter() - t0, 1),
            "kernels": rows}


def markdown(result: dict) -> str:
    lines = [f"{result['arch']} (planned for {result['sm_count']} SMs), Triton {result['triton']}", "",
             "| model | cache | kernel | config | registers | spill B | shared KB | tensor-core instr. | instr. "
             "| scales:layers |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["kernels"]:
        uses = sorted({u.split(":")[0] for u in r["uses"]}, key=int)
        lines.append(f"| {r['model']} | {r['cache_dtype'].replace('float', 'fp').replace('bfp', 'bf')} | {r['name']} "
                     f"| {r['config']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} "
                     f"| {r['tensor_core_instructions']} | {r['instructions']} | {','.join(uses)} |")
    return "\n".join(lines) + "\n"


def summary(results: list[dict]) -> str:
    """One table over several reports: every attention configuration (bf16 and fp16 on one row where
    the compiler made the same of both) and the largest figures of all the other kernels."""
    short = {"bfloat16": "bf16", "float16": "fp16"}
    stats = ("registers", "spill_bytes", "shared_bytes", "tensor_core_instructions")
    lines = ["| target | Triton | model | cache | kernel | tiles, split, warps, stages | registers | spill B "
             "| shared KB | tensor-core instr. | scales |", "|---|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for result in results:
        rows: dict[tuple, dict] = {}
        for r in result["kernels"]:
            if r["name"] in ("scale_attention", "combine_splits"):
                key = (r["model"], r["name"], r["config"], tuple(r[k] for k in stats))
                row = rows.setdefault(key, {**r, "dtypes": [], "scales": set()})
                row["dtypes"].append(short[r["cache_dtype"]])
                row["scales"] |= {int(u.split(":")[0]) for u in r["uses"]}
        for r in rows.values():
            config = r["config"].replace("BLOCK_M=", "").replace(",BLOCK_N=", "x").replace("SPLIT=", "split ")
            lines.append(f"| {result['arch']} | {result['triton']} | {r['model']} | {', '.join(r['dtypes'])} "
                         f"| {r['name']} | {config} | {r['registers']} | {r['spill_bytes']} "
                         f"| {r['shared_bytes'] / 1024:.0f} | {r['tensor_core_instructions']} "
                         f"| {min(r['scales'])}-{max(r['scales'])} |")
        rest = [r for r in result["kernels"] if r["name"] not in ("scale_attention", "combine_splits")]
        lines.append(f"| {result['arch']} | {result['triton']} | both | both "
                     f"| {len(rest)} others: {', '.join(sorted({r['name'] for r in rest}))} | "
                     f"| max {max(r['registers'] for r in rest)} | {sum(r['spill_bytes'] for r in rest)} "
                     f"| max {max(r['shared_bytes'] for r in rest) / 1024:.0f} | | all |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--summary", nargs="+", type=Path, help="print one table over these report JSONs and stop")
    ap.add_argument("--arch", help="target, e.g. sm90, sm89, sm87")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--kernels", nargs="+", help="only these kernels (default: all)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.summary:
        print(summary([json.loads(p.read_text()) for p in args.summary]), end="")
        return
    if not (args.arch and args.json):
        ap.error("give --arch and --json (or --summary REPORT.json ...)")
    arch = int(args.arch.lower().removeprefix("sm"))
    result = report(arch, args.models, args.dtypes, args.kernels, (lambda _: None) if args.quiet else print)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(result))
    print(f"{len(result['kernels'])} compiled kernels for {result['arch']} in {result['seconds']} s -> {args.json}")


if __name__ == "__main__":
    main()
