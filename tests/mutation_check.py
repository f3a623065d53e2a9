"""Plant plausible one-line bugs and check that the tests catch each one.

    python tests/mutation_check.py [--only ID ...] [--list]

Each mutation replaces one exact line fragment of the package (sign flips, swapped axes,
off-by-one, rounding mode, truncated hashing, dropped fp32 placements, stale state) in a
scratch copy of the repository, runs the tests relevant to it there, and counts it caught
when they fail. The unmutated copy must pass the same tests first. Survivors are printed and
written, with the whole table, to benchmarks/results/mutation_check.md; the exit status is 1
if any mutation survives. Not collected by pytest (its name does not start with `test_`); it
takes about 20 minutes on two cores, so CI does not run it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutation_check.md"
REFERENCE_2B = "tests/test_parity.py::test_reference_reproduces_the_official_fixtures[tiny-2b]"
REFERENCE_8B = "tests/test_parity.py::test_reference_reproduces_the_official_fixtures[tiny-8b]"
REFERENCE_1024 = "tests/test_parity.py::test_reference_reproduces_the_official_fixtures[tiny-8b-1024]"


@dataclass(frozen=True)
class Mutation:
    id: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files or node ids
    bug: str
    k: str | None = None  # a pytest -k expression within `tests`

    def pytest_args(self) -> tuple[str, ...]:
        return self.tests + (("-k", self.k) if self.k else ())


MUTATIONS = [
    Mutation("rope-floor", "varedit_deploy/model/rope.py",
             "rows.append((int(round(full * i / side)), int(round(full * j / side))))",
             "rows.append((full * i // side, full * j // side))",
             ("tests/test_rope.py",), "star positions rounded down instead of to nearest (1024 px only)"),
    Mutation("rope-floor-golden", "varedit_deploy/model/rope.py",
             "rows.append((int(round(full * i / side)), int(round(full * j / side))))",
             "rows.append((full * i // side, full * j // side))",
             (REFERENCE_1024,), "the same, against the 1024-px golden fixture alone"),
    Mutation("rope-swap-axes", "varedit_deploy/model/rope.py",
             "angles = torch.cat([freqs[pos[:, 0]], freqs[pos[:, 1]]], dim=-1)",
             "angles = torch.cat([freqs[pos[:, 1]], freqs[pos[:, 0]]], dim=-1)",
             ("tests/test_rope.py",), "row and column angles swapped"),
    Mutation("rope-sign", "varedit_deploy/model/rope.py",
             "out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)",
             "out = torch.stack([x0 * cos + x1 * sin, x0 * sin + x1 * cos], dim=-1)",
             ("tests/test_rope.py", "tests/test_attention.py"), "rotation sign flipped"),
    Mutation("attention-no-clamp", "varedit_deploy/model/attention.py",
             'return scale_mul.clamp_max(MAX_SCALE_MUL).float().exp()', 'return scale_mul.float().exp()',
             ("tests/test_attention.py",), "cosine-attention temperature not clamped at 100"),
    Mutation("vae-flat-variance", "varedit_deploy/model/vae.py",
             "var = centred.pow(2).mean(-1, keepdim=True).mean(-2, keepdim=True)",
             "var = centred.pow(2).mean((-2, -1), keepdim=True)",
             ("tests/test_vae.py",), "GroupNorm variance as one reduction over ~1M values (ORT precision)"),
    Mutation("vae-pad-side", "varedit_deploy/model/vae.py",
             "return self.conv(F.pad(x, (0, 1, 0, 1)))", "return self.conv(F.pad(x, (1, 0, 1, 0)))",
             (REFERENCE_2B,), "downsampling pads top/left instead of bottom/right"),
    Mutation("sampler-cfg-swap", "varedit_deploy/model/sampler.py",
             "mixed = scaled[0] * cfg_weights[0] + scaled[1] * cfg_weights[1]",
             "mixed = scaled[1] * cfg_weights[0] + scaled[0] * cfg_weights[1]",
             ("tests/test_sampler.py",), "CFG mixes uncond as cond (swapped batch rows)"),
    Mutation("sampler-top-p-bit", "varedit_deploy/model/sampler.py",
             "bit = torch.where(p0 <= drop_threshold, torch.ones_like(drawn), drawn)",
             "bit = torch.where(p0 <= drop_threshold, torch.zeros_like(drawn), drawn)",
             ("tests/test_sampler.py",), "top-p keeps the dropped value"),
    Mutation("codes-sign", "varedit_deploy/model/codes.py",
             "return bits.to(torch.float32) * (2 * inv) - inv", "return inv - bits.to(torch.float32) * (2 * inv)",
             ("tests/test_codes.py",), "bit codes with the wrong sign"),
    Mutation("codes-patchify-axes", "varedit_deploy/model/codes.py",
             "x = x.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4)",
             "x = x.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 5, 3, 2, 4)",
             ("tests/test_codes.py",), "2x2 patchify with dy and dx swapped"),
    Mutation("resample-area-floor", "varedit_deploy/model/resample.py",
             "end = -((-(i + 1) * in_size) // out_size)", "end = ((i + 1) * in_size) // out_size",
             ("tests/test_resample.py",), "SAR area pooling bin ends rounded down (off by one)"),
    Mutation("transformer-rope-offset", "varedit_deploy/model/transformer.py",
             'cos, sin = self.step_rope(past_k[1].shape[0], n)',
             'cos, sin = self.step_rope(past_k[1].shape[0] + 1, n)',
             (REFERENCE_2B,), "step RoPE offset off by one"),
    Mutation("transformer-source-level", "varedit_deploy/model/transformer.py",
             'x = self.embed_tokens(source_prefix, self.schedule.num_scales - 1)',
             'x = self.embed_tokens(source_prefix, self.schedule.num_scales - 2)',
             (REFERENCE_2B,), "source prefix takes the wrong level embedding"),
    # (Pooling the SAR references to a transposed grid is an equivalent mutant: it permutes keys
    # and values alike, and attention without a mask does not depend on key order.)
    Mutation("transformer-sar-values", "varedit_deploy/model/transformer.py",
             'return self._pool_to_scales(to_heads(source_k)), self._pool_to_scales(to_heads(source_v))',
             'return self._pool_to_scales(to_heads(source_k)), self._pool_to_scales(to_heads(source_k))',
             (REFERENCE_8B,), "SAR values pooled from the keys"),
    Mutation("kv-past-short", "varedit_deploy/runtime/kv_cache.py",
             'end_past = source_tokens + starts[call]', 'end_past = source_tokens + starts[call] - 1',
             ("tests/test_build.py",), "a step's past misses its last row", "concatenation"),
    Mutation("kv-layer0-offset", "varedit_deploy/runtime/kv_cache.py",
             'first_past = source_tokens if layer == 0 else 0', 'first_past = source_tokens if layer <= 1 else 0',
             ("tests/test_build.py",), "layer 1's cache laid out like layer 0's", "concatenation"),
    Mutation("loop-stale-sum", "varedit_deploy/runtime/loop.py",
             "backend.write(summed_in, np.zeros((1, t.codebook_dim, self.latent_side, self.latent_side), np.float32))",
             "pass",
             ("tests/test_runtime.py",), "the summed codes of the previous edit leak in", "cli_edit or teacher"),
    Mutation("loop-no-teacher", "varedit_deploy/runtime/loop.py",
             'fed_bits = self.bits[s] if teacher_bits is None else self.teacher[s]', 'fed_bits = self.bits[s]',
             ("tests/test_runtime.py",), "teacher bits written but not fed forward", "teacher"),
    Mutation("artifact-hash-first-mib", "varedit_deploy/artifact.py",
             'for block in iter(lambda: f.read(1 << 20), b""):', "for block in [f.read(1 << 20)]:",
             ("tests/test_runtime.py",), "only the first MiB of each file is hashed", "damage"),
    Mutation("artifact-no-hash-on-load", "varedit_deploy/artifact.py",
             'elif mode == "size" or (mode == "quick" and rec["bytes"] > HASH_ON_LOAD_LIMIT',
             'elif mode in ("size", "quick") or (mode == "quick" and rec["bytes"] > HASH_ON_LOAD_LIMIT',
             ("tests/test_runtime.py",), "hashes checked only by inspect", "damage"),
    Mutation("artifact-no-size-check", "varedit_deploy/artifact.py",
             'if stat.st_size != rec["bytes"]:', 'if False:',
             ("tests/test_runtime.py",), "file sizes not checked", "damage or load_limit"),
    Mutation("precision-empty-fp32-list", "varedit_deploy/export/precision.py",
             'keep_io_types=fp32_io, op_block_list=KEEP_FP32_OPS,',
             'keep_io_types=fp32_io, op_block_list=[],',
             ("tests/test_build.py",), "norms, softmax and exp lowered to fp16", "half_graphs"),
    Mutation("precision-exp-fp16", "varedit_deploy/export/precision.py",
             '"Sqrt", "Exp", "Range"', '"Sqrt", "Range"',
             ("tests/test_build.py",), "Exp dropped from the fp32 list", "half_graphs"),
    Mutation("precision-norm-scopes", "varedit_deploy/export/precision.py",
             'node_block_list=fp32_nodes(model) + list(keep_fp32))', 'node_block_list=list(keep_fp32))',
             ("tests/test_build.py",), "GroupNorm centring and scaling lowered to fp16", "half_graphs"),
    Mutation("precision-round-trips", "varedit_deploy/export/precision.py",
             "    _skip_half_round_trips(half)\n", "\n",
             ("tests/test_build.py",), "fp32 chains pass fp16-rounded values", "half_graphs"),
    Mutation("precision-fp16-io", "varedit_deploy/export/precision.py",
             'half = float16.convert_float_to_float16(model, keep_io_types=fp32_io,',
             'half = float16.convert_float_to_float16(model, keep_io_types=False,',
             ("tests/test_build.py",), "graph inputs and outputs in fp16", "half_graphs"),
    Mutation("precision-bf16-round-up", "varedit_deploy/export/precision.py",
             'return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)',
             'return ((u + np.uint32(0x8000)) >> np.uint32(16)).astype(np.uint16)',
             ("tests/test_build.py",), "bf16 rounds ties up, not to even", "bf16_rounding"),
    Mutation("parity-margin-unhalved", "varedit_deploy/parity.py",
             "return np.abs(lg[:, 1] - lg[:, 0] - flip_point) / 2", "return np.abs(lg[:, 1] - lg[:, 0] - flip_point)",
             ("tests/test_parity.py",), "near-tie margin twice too large", "margin"),
]


def _copy_repo(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("varedit_deploy", "tests"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")


def _env(scratch: Path) -> dict[str, str]:
    fixtures = os.environ.get("VAREDIT_FIXTURES", str(ROOT.parent / "shared" / "fixtures"))
    return {**os.environ, "PYTHONPATH": str(scratch), "VAREDIT_FIXTURES": fixtures, "PYTHONDONTWRITEBYTECODE": "1"}


def _pytest(scratch: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                             cwd=scratch, env=_env(scratch), capture_output=True, text=True, timeout=timeout)
        code, out = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired:
        code, out = -1, "timed out"
    lines = [line for line in out.splitlines() if line.strip()]
    return code, time.perf_counter() - t0, lines[-1] if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", help="mutation ids to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.id:<28} {m.path:<38} {m.bug}")
        return 0 if args.list else 2

    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        scratch = Path(tmp)
        _copy_repo(scratch)
        where = subprocess.run([sys.executable, "-c", "import varedit_deploy; print(varedit_deploy.__file__)"],
                               cwd=scratch, env=_env(scratch), capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(scratch)):
            raise SystemExit(f"the scratch copy is not the package that gets imported ({where})")
        for m in chosen:
            if (ROOT / m.path).read_text().count(m.old) != 1:
                raise SystemExit(f"mutation {m.id}: its line is not found exactly once in {m.path}; update the list")
        # Baseline: the unmutated copy passes every selection (one run per -k file, one for the rest).
        selections: dict[tuple[str, ...], list[str]] = {}
        plain: list[str] = []
        for m in chosen:
            if m.k:
                selections.setdefault(m.tests, []).append(f"({m.k})")
            else:
                plain += [t for t in m.tests if t not in plain]
        runs = [(*tests, "-k", " or ".join(dict.fromkeys(ks))) for tests, ks in selections.items()]
        runs += [tuple(plain)] if plain else []
        for i, tests in enumerate(runs, 1):
            code, seconds, last = _pytest(scratch, tests, args.timeout)
            print(f"baseline {i}/{len(runs)}: {last} ({seconds:.0f} s)", flush=True)
            if code != 0:
                raise SystemExit(f"the unmutated copy fails {' '.join(tests)}: {last}")
        rows = []
        for i, m in enumerate(chosen, 1):
            source = scratch / m.path
            original = source.read_text()
            source.write_text(original.replace(m.old, m.new))
            try:
                code, seconds, last = _pytest(scratch, m.pytest_args(), args.timeout)
            finally:
                source.write_text(original)
            verdict = "survived" if code == 0 else "caught" if code in (1, 2) else f"error ({code})"
            rows.append((m, verdict, seconds, last))
            print(f"[{i:>2}/{len(chosen)}] {m.id:<28} {verdict:<9} {seconds:6.1f} s  {last}", flush=True)

    survivors = [m.id for m, verdict, _, _ in rows if verdict != "caught"]
    command = "python tests/mutation_check.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    lines = [f"# Mutation check ({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs)", "",
             f"`{command}`: {len(rows)} mutations, {len(rows) - len(survivors)} caught, "
             f"survivors: {', '.join(survivors) or 'none'}.", "",
             "| mutation | file | bug | tests run | verdict | seconds |", "|---|---|---|---|---|---:|"]
    for m, verdict, seconds, _ in rows:
        lines.append(f"| {m.id} | {m.path.removeprefix('varedit_deploy/')} | {m.bug} | `{' '.join(m.pytest_args())}` | "
                     f"{verdict} | {seconds:.0f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"survivors: {', '.join(survivors) or 'none'}; table in {RESULTS.relative_to(ROOT)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
