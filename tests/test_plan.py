"""`varedit-deploy plan` and build/memory_plan.py, against the modules themselves and the spec's numbers."""

import re

import numpy as np
import pytest
import torch

from varedit_deploy.memory_plan import (
    DEVICES, GIB, ROWS, T5_XL_PARAMS, kv_cache_bytes, plan, transformer_params, vae_params,
)
from varedit_deploy.cli import main
from varedit_deploy.config import PRESETS, from_name
from varedit_deploy.model.transformer import VAREditTransformer
from varedit_deploy.model.vae import BSQVAE
from varedit_deploy.runtime.kv_cache import KVCache


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_formulas_count_what_the_modules_hold(name):
    """Oracle: the modules built on the meta device (no memory), for every preset."""
    config = from_name(name)
    with torch.device("meta"):
        tr, vae = VAREditTransformer(config), BSQVAE(config.vae)
    assert transformer_params(config) == sum(p.numel() for p in tr.parameters())
    assert vae_params(config) == sum(p.numel() for p in vae.parameters())


def test_release_totals_are_the_spec_counts():
    # docs/spec/transformer.md 1.2: 2,204,564,032 (2B) and 8,375,791,824 (8B), from the official class
    assert transformer_params(from_name("2b-512")) == 2_204_564_032
    assert transformer_params(from_name("8b-1024")) == 8_375_791_824
    p = plan(from_name("8b-1024"), "bf16", workspace_gib=1.0, text_len=77)
    assert p.transformer_weights == pytest.approx(8_375_791_824 * 2 / GIB)
    assert p.text_encoder_weights > T5_XL_PARAMS * 2 / GIB  # fp16 T5 with the fp32 FFN outputs


def _shape_only(shape, dtype):
    """A buffer of `shape` that takes no memory (the 8B-1024 cache is 34 GB in fp32)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


@pytest.mark.parametrize("name", ["tiny-2b", "2b-512", "8b-1024"])
def test_kv_cache_bytes_equal_the_runtime_allocation(name):
    """Oracle: what the runtime's KVCache actually allocates for the schedule (spec 3.7 layout)."""
    config = from_name(name)
    t, sched = config.transformer, config.schedule
    cache = KVCache.allocate(t.depth, t.heads, t.head_dim, sched.source_tokens, sched.starts, sched.tokens,
                             empty=_shape_only)
    allocated = sum(b.nbytes for b in (*cache.k, *cache.v, cache.sar_k, cache.sar_v))
    assert kv_cache_bytes(config, 4) == allocated
    if name == "2b-512":  # every layer: 1024 source rows + 2521 targets; then 2521 pooled references
        assert allocated == (32 * 3545 + 2521) * 2 * 2 * 2048 * 4


def test_plan_totals_and_ordering():
    config = from_name("8b-1024")
    plans = {p: plan(config, p, 1.0, 77) for p in ROWS}
    for p in plans.values():
        assert p.total == pytest.approx(p.transformer_weights + p.text_encoder_weights + p.vae_weights
                                        + p.kv_cache + p.activations + p.workspace)
    assert plans["fp32"].total > plans["bf16"].total == plans["fp16"].total > plans["int8"].total
    # int8 (W8A8) halves the block products of all but the first and last block; the rest stays fp16
    assert 0.5 < plans["int8"].transformer_weights / plans["fp16"].transformer_weights < 0.6
    assert plans["fp32"].activations > plans["fp16"].activations  # fp32 counts the unfused score matrix
    tiny = plan(from_name("tiny-2b"), "fp16", 0.0, 77)
    assert tiny.text_encoder_weights == 0.0  # tiny presets have no T5-XL


def _rows(out: str) -> dict[str, tuple[float, str]]:
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(fp32|bf16|fp16|int8|fp8|int4)\s+(?:[\d.]+\s+){6}([\d.]+)\s+[\d.]+\s+[\d.]+\s+(.+)$", line)
        if m:
            rows[m[1]] = (float(m[2]), m[3])
    return rows


def test_plan_cli_for_a_jetson_and_for_a_memory_size(capsys):
    assert main(["plan", "--model", "8b-1024", "--device", "orin-agx-64"]) == 0
    out = capsys.readouterr().out
    total, reserved = DEVICES["orin-agx-64"]
    assert f"budget {total - reserved:.1f} GiB" in out
    rows = _rows(out)
    assert set(rows) == set(ROWS)
    for precision, (gib, fits) in rows.items():
        assert gib == pytest.approx(plan(from_name("8b-1024"), precision, 1.0, 77).total, abs=0.01)
        assert (fits == "yes") == (gib <= total - reserved) or fits.startswith("no: no fp8")
    assert rows["fp32"][1] == "8-bit KV" and rows["int8"][1] == "yes"  # 8B in fp32: 31 GiB of weights alone
    assert main(["plan", "--model", "tiny-8b", "--memory-gib", "0.5", "--workspace", "0.1"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert all(fits == "yes" for _, fits in rows.values())


@pytest.mark.parametrize("argv, message", [
    ([], "give one of --device"),
    (["--device", "orin-nx-16", "--memory-gib", "8"], "give one of --device"),
    (["--device", "xavier-32"], "invalid choice: 'xavier-32'"),
    (["--model", "9b-512", "--memory-gib", "8"], "invalid choice: '9b-512'"),
])
def test_plan_cli_errors(argv, message, capsys):
    assert main(["plan", *argv]) == 2  # malformed or conflicting options
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plan_counts_the_cache_the_tensorrt_runtime_allocates(precision):
    """The loop allocates the caches in the type the engines declare for them: fp32 engines fp32, 16-bit
    and quantised engines 16-bit (export/precision.py's cache I/O), an 8-bit-cache artifact int8. The
    plan counts exactly that (it once counted 16 bits where the runtime held fp32)."""
    from varedit_deploy.runtime.loop import loop_layout

    config = from_name("8b-512")
    t, sched = config.transformer, config.schedule

    def allocated(dtype):
        layout = loop_layout(t, sched.tokens, sched.starts, sched.source_tokens, sched.latent_side, dtype)
        return sum(s.nbytes for s in layout.values() if s.kind == "kv_cache")

    assert plan(config, precision, 1.0, 77).kv_cache * GIB == pytest.approx(
        allocated("float32" if precision == "fp32" else "bfloat16"))
    assert plan(config, precision, 1.0, 77, kv_bytes=1).kv_cache * GIB == pytest.approx(allocated("int8"))
