"""Engine building: profiles and binding plans (plain data), precision conversion, and real
TensorRT-RTX ahead-of-time builds of every graph (no GPU needed)."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from varedit_deploy.artifact import read_manifest
from varedit_deploy.build.engines import BuildOptions, build_engines, check_engines
from varedit_deploy.build.precision import _bf16_bits, graph_precision, to_half
from varedit_deploy.build.profiles import graph_profiles
from varedit_deploy.cli import main
from varedit_deploy.config import from_name
from varedit_deploy.errors import VareditError
from varedit_deploy.runtime.binding_plan import select_profile, step_plan
from varedit_deploy.runtime.kv_cache import KVCache


def test_step_and_sample_have_one_fixed_profile_per_scale(tiny_artifact):
    m = read_manifest(tiny_artifact)
    profiles = graph_profiles(m, "step")
    assert [p.name for p in profiles] == [f"scale_{s}" for s in range(7)]
    for s, (p, n, start) in enumerate(zip(profiles, (1, 4, 16, 36, 64, 144, 256), (0, 1, 5, 21, 57, 121, 265))):
        lo, opt, hi = p.shapes["x"]
        assert lo == opt == hi == (2, n, 64)
        assert p.shapes["past_k_0"][0] == (start, 2, 2, 32) and p.shapes["past_v_2"][2] == (256 + start, 2, 2, 32)
        assert p.shapes["text_k"] == ((3, 2, 2, 1, 32), (3, 2, 2, 32, 32), (3, 2, 2, 512, 32))
    assert [p.shapes["noise"][0] for p in graph_profiles(m, "sample")] == [(n * 16, 2) for n in (1, 4, 16, 36, 64, 144, 256)]
    assert graph_profiles(m, "vae_decoder") == [] and graph_profiles(m, "next_input_3") == []
    assert graph_profiles(m, "text_cond")[0].shapes["text_features"] == ((1, 1, 256), (1, 32, 256), (1, 512, 256))


@pytest.mark.parametrize("name", ["2b-512", "8b-1024"])
def test_step_binding_plan_follows_the_schedule(name):
    config = from_name(name)
    t, sched = config.transformer, config.schedule
    row = 2 * t.heads * t.head_dim * 4
    plan = step_plan(config, text_len=20)
    assert len(plan) == sched.num_scales
    for call in plan:
        s, b = call.scale, call.by_tensor()
        n, cum = sched.tokens[s], sched.starts[s]
        assert call.profile == s and b["x"].shape == (2, n, t.dim) and b["logits"].shape == (2, n, t.num_logits)
        assert b["past_k_0"] == type(b["past_k_0"])("past_k_0", "cache_k_0", 0, (cum, 2, t.heads, t.head_dim))
        assert b["new_v_0"].offset_bytes == cum * row and b["new_v_0"].shape[0] == n
        assert b["past_k_5"].shape[0] == sched.source_tokens + cum  # source prefix + earlier scales
        assert b["new_k_5"].offset_bytes == (sched.source_tokens + cum) * row
        assert b["sar_k"].offset_bytes == cum * row and b["sar_k"].shape[0] == n
        assert b["text_v"].shape == (t.depth, 2, t.heads, 20, t.head_dim)
    # Spec table 3.8, last scale at 512 px: 3545 keys at layer 0 and layers >= 1.
    if name == "2b-512":
        last = plan[-1].by_tensor()
        assert last["past_k_0"].shape[0] + last["sar_k"].shape[0] + 1024 == 3545
        assert last["past_k_1"].shape[0] + 1024 == 3545


def test_binding_plan_offsets_equal_the_runtime_cache_views():
    config = from_name("tiny-8b")
    t, sched = config.transformer, config.schedule
    cache = KVCache.allocate(t.depth, t.heads, t.head_dim, sched.source_tokens, sched.starts, sched.tokens)
    for call in step_plan(config, text_len=7):
        b = call.by_tensor()
        for i in range(t.depth):
            past, _ = cache.past(i, call.scale)
            slot, _ = cache.slot(i, call.scale)
            base = cache.k[i].ctypes.data
            assert past.ctypes.data - base == b[f"past_k_{i}"].offset_bytes and past.shape == b[f"past_k_{i}"].shape
            assert slot.ctypes.data - base == b[f"new_k_{i}"].offset_bytes and slot.shape == b[f"new_k_{i}"].shape
        sar, _ = cache.sar(call.scale)
        assert sar.ctypes.data - cache.sar_k.ctypes.data == b["sar_k"].offset_bytes


def test_select_profile(tiny_artifact):
    profiles = [p.to_json() for p in graph_profiles(read_manifest(tiny_artifact), "sample")]
    for s, n in enumerate((1, 4, 16, 36, 64, 144, 256)):
        shapes = {"logits": (2, n, 32), "noise": (n * 16, 2)}
        assert select_profile(profiles, shapes) == s
    with pytest.raises(ValueError, match="no optimisation profile"):
        select_profile(profiles, {"logits": (2, 5, 32), "noise": (80, 2)})


def test_bf16_rounding_matches_torch():
    x = np.concatenate([np.random.randn(10000), [1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, 65504.0]]).astype(np.float32)
    ours = _bf16_bits(x)
    ref = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_graphs_keep_io_and_sensitive_ops_in_fp32(tiny_artifact, precision):
    model = onnx.load(str(read_manifest(tiny_artifact).graph_path("step")))
    half = to_half(model, precision)
    kind = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.BFLOAT16
    assert all(v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
               for v in (*half.graph.input, *half.graph.output))
    big = [t for t in half.graph.initializer if int(np.prod(t.dims)) >= 64 * 64]
    assert big and all(t.data_type == kind for t in big)  # every weight matrix is half precision
    assert {n.op_type for n in half.graph.node} >= {"LayerNormalization", "Softmax"}


def test_fp16_step_agreement_with_fp32_is_reported(tiny_artifact):
    """Lower precision reports its agreement: logits of the fp16 graph vs the fp32 graph (ORT CPU)."""
    m = read_manifest(tiny_artifact)
    fp32 = ort.InferenceSession(str(m.graph_path("step")), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(to_half(onnx.load(str(m.graph_path("step"))), "fp16").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    g = np.random.default_rng(0)
    feeds = {}
    for inp in fp32.get_inputs():
        shape = [{"tokens": 16, "past_targets": 5, "past_len": 261, "text_len": 6}.get(d, d) for d in inp.shape]
        feeds[inp.name] = (g.standard_normal(shape) * 0.5).astype(np.float32)
    a, b = fp32.run(["logits"], feeds)[0], fp16.run(["logits"], feeds)[0]
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    assert rel < 2e-2, rel  # fp16 weights and matmuls: about 1e-3 here; a broken conversion is O(1)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_rtx_builds_every_graph_for_two_targets(golden, tmp_path_factory, precision, capsys):
    art = tmp_path_factory.mktemp("rtx") / golden.name
    assert main(["export", "--fixture", str(golden), "--out", str(art)]) == 0
    assert main(["build", "--artifacts", str(art), "--flavour", "tensorrt-rtx", "--target", "sm80", "sm89",
                 "--precision", precision]) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(art)
    for target in ("sm80", "sm89"):
        folder = next((art / "engines").glob(f"tensorrt-rtx-*-{target}-{precision}"))
        data = json.loads((folder / "engines.json").read_text())
        assert set(data["engines"]) == set(manifest.graphs) and data["target"] == target
        for name, rec in data["engines"].items():
            engine = folder / rec["path"]
            assert engine.stat().st_size == rec["bytes"] > 10_000
            assert rec["profiles"] == [p.to_json() for p in graph_profiles(manifest, name)]
            net, math = rec["network"], rec["math"]
            assert math["precision"] == graph_precision(name, precision) and math["tf32"] is False
            assert math["attention_decomposable"] == (math["precision"] == "fp32" and net["fused_attentions"] > 0)
            assert net["layers"] and all(isinstance(n, int) and n > 0 for n in net["layers"].values())
            assert net["fused_attentions"] == net["layers"].get("ATTENTION_OUTPUT", 0)
        depth = manifest.config.transformer.depth
        step, source = data["engines"]["step"]["network"], data["engines"]["source_pass"]["network"]
        # Every attention is either fused or a MatMul-Softmax-MatMul chain: self and cross per block
        # (the source pass skips layer 0, which only makes the SAR keys and values).
        assert step["fused_attentions"] + step["attention_chains"] == 2 * depth
        assert source["fused_attentions"] + source["attention_chains"] == 2 * (depth - 1)
        assert data["engines"]["sample"]["network"]["attention_chains"] == 0  # its softmax is no attention
        assert len(data["engines"]["step"]["profiles"]) == manifest.config.schedule.num_scales
        assert check_engines(folder, manifest, data["tensorrt_version"], target) == []
        assert "step" in printed and "profile(s)" in printed and "MatMul-Softmax-MatMul" in printed
    assert main(["inspect", str(art)]) == 0
    shown = capsys.readouterr().out
    assert shown.count("engines tensorrt-rtx-") == 2 and "TF32 off" in shown and "MATRIX_MULTIPLY" in shown


def test_engine_compatibility_guard_names_every_mismatch(golden, tmp_path):
    art = tmp_path / "art"
    assert main(["export", "--fixture", str(golden), "--out", str(art)]) == 0
    folder = build_engines(art, BuildOptions(precision="fp32", target="sm86"), progress=lambda _: None,
                           graphs=["sample", "next_input_0"])
    manifest = read_manifest(art)
    problems = check_engines(folder, manifest, "10.3.0", "sm87")
    text = "; ".join(problems)
    assert "no engine for graph step" in text and "installed is 10.3.0" in text and "this GPU is sm87" in text
    shutil.copytree(art, tmp_path / "re")
    assert main(["export", "--fixture", str(golden), "--out", str(tmp_path / "re")]) == 0  # fresh export
    data = json.loads((folder / "engines.json").read_text())
    again = check_engines(folder, read_manifest(tmp_path / "re"), data["tensorrt_version"], "sm86")
    assert any("another export" in p for p in again)


def test_build_refuses_targets_tensorrt_rtx_cannot_build(tiny_artifact, capsys):
    assert main(["build", "--artifacts", str(tiny_artifact), "--target", "sm87"]) == 1
    assert "Jetson Orin is sm87" in capsys.readouterr().err
    with pytest.raises(VareditError, match="unknown precision"):
        build_engines(tiny_artifact, BuildOptions(precision="int2"))
    with pytest.raises(VareditError, match=r"int4 \(weight-only\) engines are built from a quantised artifact"):
        build_engines(tiny_artifact, BuildOptions(precision="int4"))


def _polygraphy_in_a_fresh_process(code: str) -> subprocess.CompletedProcess:
    """Polygraphy chooses its TensorRT at import: each check needs an interpreter that never imported it."""
    env = {k: v for k, v in os.environ.items() if k != "POLYGRAPHY_USE_TENSORRT_RTX"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_polygraphy_comparisons_of_tensorrt_rtx_engines_use_tensorrt_rtx():
    done = _polygraphy_in_a_fresh_process(
        "from varedit_deploy.build.compare import select_polygraphy_tensorrt\n"
        "select_polygraphy_tensorrt('tensorrt-rtx')\n"
        "from polygraphy.backend.trt import loader, runner\n"
        "from polygraphy.util import util\n"
        "print(loader.trt.__name__, runner.trt.__name__, util.trt.__name__)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tensorrt_rtx"] * 3


def test_polygraphy_already_bound_to_tensorrt_is_refused_not_used():
    done = _polygraphy_in_a_fresh_process(
        "import polygraphy.backend.trt\n"  # imported before the choice: bound to tensorrt
        "from varedit_deploy.build.compare import select_polygraphy_tensorrt\n"
        "from varedit_deploy.errors import VareditError\n"
        "try:\n"
        "    select_polygraphy_tensorrt('tensorrt-rtx')\n"
        "except VareditError as e:\n"
        "    print(e)\n")
    assert done.returncode == 0, done.stderr
    assert re.search(r"already uses (tensorrt|the other TensorRT), not tensorrt_rtx .* new process", done.stdout)
