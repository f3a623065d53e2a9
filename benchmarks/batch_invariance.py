"""Is one request's step the same, bit for bit, when it runs in a batch? Measured before promising it.

    python benchmarks/batch_invariance.py [--model tiny-2b] [--batches 2,4,16]
                                          [--out benchmarks/results/batch_invariance.md]

A batch axis puts B requests' CFG rows side by side ([2B, n, C]); the math of each row does not
change, but a kernel may pick another blocking for a larger matrix and round differently. This
runs the reference transformer's `step` (eager PyTorch, float32, this machine) at every scale for
B requests at once and for each request alone, on the same random inputs, and reports the largest
logit and K/V difference per batch size and scale. It also checks the padding the text needs: a
key-padding mask against the same attention over the unpadded keys.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def step_differences(model_name: str, batches: list[int], seed: int = 0) -> dict[int, list[dict]]:
    """Per batch size, per scale: max |batched - alone| of the logits and the new K/V over the batch."""
    from varedit_deploy.config import from_name
    from varedit_deploy.model.loaded import VAREditModel

    cfg = from_name(model_name)
    tr, t, sched = VAREditModel.random(cfg, seed=seed).transformer, cfg.transformer, cfg.schedule
    g = torch.Generator().manual_seed(seed)
    h, c, text_len = t.heads, t.head_dim, 7
    out: dict[int, list[dict]] = {}
    for b in batches:
        conds = [tr.text_condition(torch.randn(1, text_len, t.text_channels, generator=g)) for _ in range(b)]
        joined = [torch.cat(parts, dim=1 if i in (1, 3, 4) else 0) for i, parts in enumerate(zip(*conds))]
        rows = []
        for s, n in enumerate(sched.tokens):
            past = sched.starts[s]
            x = torch.randn(2 * b, n, t.dim, generator=g)
            sar = torch.randn(n, 2 * b, h, c, generator=g)
            pk = [torch.randn(past if i == 0 else sched.source_tokens + past, 2 * b, h, c, generator=g)
                  for i in range(t.depth)]
            pv = [torch.randn_like(p) for p in pk]
            logits, new_k, _ = tr.step(x, *joined[1:], sar, sar, pk, pv)
            worst_logit = worst_k = 0.0
            for r in range(b):
                rs = slice(2 * r, 2 * r + 2)
                alone, alone_k, _ = tr.step(x[rs], *conds[r][1:], sar[:, rs], sar[:, rs], [p[:, rs] for p in pk],
                                            [p[:, rs] for p in pv])
                worst_logit = max(worst_logit, float((logits[rs] - alone).abs().max()))
                worst_k = max(worst_k, max(float((k[:, rs] - a).abs().max()) for k, a in zip(new_k, alone_k)))
            rows.append({"scale": s, "tokens": n, "logits": worst_logit, "kv": worst_k})
        out[b] = rows
    return out


def masked_attention_difference(seed: int = 0) -> float:
    """max |attention over padded keys with a mask - attention over the unpadded keys| (bf16 rounding as exported)."""
    import torch.nn.functional as F

    from varedit_deploy.model.attention import _round_bf16, bf16_flash_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 2, 9, 16, generator=g)
    k, v = torch.randn(4, 2, 20, 16, generator=g), torch.randn(4, 2, 20, 16, generator=g)
    worst = 0.0
    for length in (1, 5, 13, 19):
        short = bf16_flash_attention(q, k[:, :, :length], v[:, :, :length])
        mask = (torch.arange(20) < length).view(1, 1, 1, 20)
        padded = _round_bf16(F.scaled_dot_product_attention(_round_bf16(q), _round_bf16(k), _round_bf16(v),
                                                            attn_mask=mask, scale=16 ** -0.5))
        worst = max(worst, float((short - padded).abs().max()))
    return worst


def report(steps: dict[int, list[dict]], masked: float, model_name: str, machine: str) -> str:
    scales = [r["scale"] for r in next(iter(steps.values()))]
    tokens = [r["tokens"] for r in next(iter(steps.values()))]
    lines = [f"# Batch invariance of the step ({model_name}, eager PyTorch float32, {machine})", "",
             "`python benchmarks/batch_invariance.py`: max |batched - alone| of the logits (K/V in parentheses) "
             "over every request of the batch; 0 means bit-identical.", "",
             "| batch | " + " | ".join(f"scale {s} ({n} tok)" for s, n in zip(scales, tokens)) + " |",
             "|---:|" + "---:|" * len(scales)]
    for b, rows in steps.items():
        lines.append(f"| {b} | " + " | ".join(f"{r['logits']:.1e} ({r['kv']:.1e})" for r in rows) + " |")
    lines += ["", f"Key-padding mask vs the unpadded keys (cross-attention as exported, bf16-rounded): max difference {masked:.1e}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-2b")
    ap.add_argument("--batches", default="2,4,16")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch_invariance.md")
    args = ap.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    steps = step_differences(args.model, [int(b) for b in args.batches.split(",")])
    masked = masked_attention_difference()
    text = report(steps, masked, args.model, machine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"model": args.model, "machine": machine, "steps": steps,
                                                         "masked_attention": masked}, indent=2) + "\n")
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
