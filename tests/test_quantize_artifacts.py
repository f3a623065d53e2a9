"""`varedit-deploy quantize` end to end on the tiny demo model (ModelOpt on the CPU): the artifact, its
report, the runtime on it, TensorRT-RTX builds of FP8 and INT4, and one-line errors that write nothing."""

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from varedit_deploy.artifact import read_manifest
from varedit_deploy.builder.engines import BuildOptions, build_engines
from varedit_deploy.memory_plan import quantized_matmul_bytes
from varedit_deploy.calibration.dataset import default_set
from varedit_deploy.cli import main
from varedit_deploy.config import from_name
from varedit_deploy.imaging import SAMPLE_PHOTO
from varedit_deploy.imaging import preprocess
from varedit_deploy.runtime.pipeline import EditPipeline
from varedit_deploy.sampling import NumpyNoise, SamplerInputs

from conftest import fixture_dir

QUICK = ["--calibration-edits", "2", "--held-out", "1"]


def _quantize(tiny_artifact, folder, mode, *extra):
    out = folder / mode
    assert main(["quantize", "--artifacts", str(tiny_artifact), "--out", str(out), "--mode", mode, *QUICK, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def int8(tiny_artifact, tmp_path_factory):
    """W8A8 with the sensitivity search and an 8-bit KV cache."""
    return _quantize(tiny_artifact, tmp_path_factory.mktemp("quant"), "int8", "--kv-cache", "int8")


@pytest.fixture(scope="module")
def fp8(tiny_artifact, tmp_path_factory):
    return _quantize(tiny_artifact, tmp_path_factory.mktemp("quant"), "fp8", "--no-search")


@pytest.fixture(scope="module")
def int4(tiny_artifact, tmp_path_factory):
    return _quantize(tiny_artifact, tmp_path_factory.mktemp("quant"), "int4", "--no-search")


def _report(folder):
    return json.loads((folder / "quantization_report.json").read_text())


def test_the_int8_artifact_records_how_it_was_made(int8, tiny_artifact):
    m = read_manifest(int8)
    q = m.quantization
    assert (q["mode"], q["method"], q["high_precision"]) == ("int8", "entropy", "fp16")
    assert q["calibration_set"]["sha256"] == default_set().limited(2, 1).sha256()
    assert set(q["versions"]) == {"nvidia-modelopt", "onnxruntime", "onnx"} and q["report"] == "quantization_report.json"
    assert q["source_manifest_sha256"] and q["command"].startswith("varedit-deploy quantize")
    # its report files are listed (and verified) like every other file of the artifact
    assert [f["path"] for f in q["files"]] == ["quantization_report.json", "quantization_report.md",
                                               "quantization_grid.png"]
    assert {f["path"] for f in q["files"]} <= {f["path"] for f in m.all_files()} and m.verify("full") == []
    assert sorted(q["kept_in_high_precision"] + q["quantized_groups"]) == sorted(
        f"blocks.{b}.{k}" for b in range(3) for k in ("qkv", "proj", "ca", "ca_kv", "fc1", "fc2"))
    assert m.data["precision"] == "fp16" and m.kv_cache_dtype == "int8"
    step = m.graphs["step"]
    assert step["opset"] >= 19 and step["ops"]["DequantizeLinear"] > 0 and step["quantized"]["mode"] == "int8"
    assert {i["name"]: i["dtype"] for i in step["inputs"]}["past_k_1"] == "int8"
    assert {o["name"]: o["dtype"] for o in step["outputs"]}["new_v_2"] == "int8"
    assert {o["name"]: o["dtype"] for o in step["outputs"]}["logits"] == "float32"
    for name in m.graphs:
        onnx.checker.check_model(str(m.graph_path(name)))
    assert main(["inspect", str(int8)]) == 0


def test_the_report_has_what_a_user_needs_to_trust_it(int8):
    r = _report(int8)
    n = from_name("tiny-2b").schedule.num_scales
    assert len(r["per_scale_bit_agreement"]) == len(r["per_scale_logit_kl"]) == n
    bits = np.array(from_name("tiny-2b").schedule.tokens) * 16
    assert r["bit_agreement"] == pytest.approx(float(np.dot(r["per_scale_bit_agreement"], bits) / bits.sum()))
    assert 0.9 < r["bit_agreement"] <= 1.0 and 0.9 < r["fp16_bit_agreement"] <= 1.0 and 0.9 < r["kv_cache_alone_bit_agreement"]
    assert r["weights_made_on"]["trained"] is False and "random weights" in r["weights_made_on"]["weights"]
    assert r["image_psnr_db"] > 0 and 0 < r["image_ssim"] <= 1 and r["image_vs_fp16"]["psnr_db"] > 0
    w = r["weight_bytes"]
    assert w["step"]["quantized"] and w["step"]["artifact"] < 0.7 * w["step"]["fp16"]
    assert 0.5 < w["step"]["fp16"] / w["step"]["fp32"] < 0.52  # half, but the head stays fp32 (as the official code keeps it)
    assert not w["vae_decoder"]["quantized"] and w["vae_decoder"]["artifact"] == w["vae_decoder"]["fp16"]
    s = r["sensitivity"]
    # the budget is judged on the artifact itself (16-bit elsewhere, its KV cache), not the search's variants
    assert len(s["ranking"]) == 18 and s["reached"] == (r["bit_agreement"] >= 0.99)
    assert s["search_estimate"] == s["agreement"] and json.loads((int8 / "manifest.json").read_text())[
        "quantization"]["search"]["reached"] == s["reached"]
    assert [x["bit_agreement_alone"] for x in s["ranking"]] == sorted(x["bit_agreement_alone"] for x in s["ranking"])
    assert s["kept_in_high_precision"] == [x["group"] for x in s["ranking"][: len(s["kept_in_high_precision"])]]
    text = (int8 / "quantization_report.md").read_text()
    assert "random weights; not a trained model" in text and "| bits, quantised |" in text
    grid = Image.open(int8 / "quantization_grid.png")
    assert grid.size[0] == 4 * 160 and grid.size[1] > 160


def test_the_reported_agreement_is_what_the_artifacts_compute(int8, tiny_artifact):
    """Recompute the teacher-forced agreement of the held-out edit with the pipelines alone."""
    pair = default_set().held_out[0]
    photo = pair.load()
    runs = {}
    for name, folder in (("fp32", tiny_artifact), ("int8", int8)):
        pipe = EditPipeline.from_artifacts(folder)
        sampler = SamplerInputs.from_params(pipe.config.sampling)
        features = pipe.encode_text(pair.instruction)
        prefix = pipe.encode_image(preprocess(photo, pipe.config.image_size))
        teacher = runs["fp32"].bits if name == "int8" else None
        runs[name] = pipe.loop.run(features, prefix, sampler, NumpyNoise(0), teacher)
        pipe.loop.collect(runs[name], record=True)  # the bits, read back once
        if name == "int8":
            assert pipe.loop.cache.k[1].dtype == np.int8 and pipe.loop.cache.sar_v.dtype == np.int8
    same = [float(np.mean(a == b)) for a, b in zip(runs["fp32"].bits, runs["int8"].bits)]
    assert same == pytest.approx(_report(int8)["per_scale_bit_agreement"], abs=1e-12)


def test_edit_runs_on_the_quantised_artifact(int8, tmp_path, capsys):
    out = tmp_path / "edited.png"
    assert main(["edit", "--artifacts", str(int8), "--image", str(SAMPLE_PHOTO), "--instruction", "add a red hat",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (512, 512) and "wrote" in capsys.readouterr().out


def _quantised_products(folder, graph="step"):
    """Per quantised weight product: (K, N) and the bytes of every initializer its DequantizeLinear nodes read."""
    model = onnx.load(str(read_manifest(folder).graph_path(graph)))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def size(name):
        t = inits[name]
        n = int(np.prod(t.dims)) if t.dims else 1
        return (n + 1) // 2 if t.data_type == onnx.TensorProto.INT4 else n * onnx.helper.tensor_dtype_to_np_dtype(
            t.data_type).itemsize

    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or producers.get(node.input[1], node).op_type != "DequantizeLinear":
            continue
        read, shape = set(), None
        for name in node.input:
            dq = producers.get(name)
            while dq is not None and dq.op_type not in ("DequantizeLinear",):
                dq = producers.get(dq.input[0]) if dq.op_type in ("Cast", "Transpose") else None
            if dq is None:
                continue
            read |= {i for i in dq.input if i in inits}
            if dq.input[0] in inits:
                shape = tuple(inits[dq.input[0]].dims)
        out.append((shape, sum(size(n) for n in read)))
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_memory_plan_counts_quantised_weights_as_modelopt_stores_them(mode, request):
    products = _quantised_products(request.getfixturevalue(mode))
    assert products
    for (k, n), stored in products:
        assert stored == quantized_matmul_bytes(k, n, mode), (k, n)


@pytest.mark.parametrize("mode", ["fp8", "int4"])
def test_tensorrt_rtx_builds_fp8_and_int4_weight_only_engines_for_sm89(mode, request):
    folder = build_engines(request.getfixturevalue(mode), BuildOptions(target="sm89"), progress=lambda _: None,
                           graphs=["step"])
    assert folder.name.endswith(f"sm89-{mode}")
    data = json.loads((folder / "engines.json").read_text())
    assert data["precision"] == mode
    for name in ("step",):
        rec = data["engines"][name]
        assert rec["math"]["precision"] == mode and rec["network"]["layers"]["DEQUANTIZE"] > 0
        assert (folder / rec["path"]).stat().st_size > 100_000


def test_a_target_that_cannot_run_the_mode_gets_a_specific_error(int8, fp8, capsys):
    assert main(["build", "--artifacts", str(int8), "--target", "sm89"]) == 1
    err = capsys.readouterr().err
    assert "tensorrt-rtx cannot build int8 (W8A8) engines for sm89: it supports fp32, fp16, bf16, fp8 (E4M3), " \
           "int4 (weight-only) there" in err and err.count("\n") == 1
    assert main(["build", "--artifacts", str(fp8), "--target", "sm86"]) == 1
    assert "cannot build fp8 (E4M3) engines for sm86" in capsys.readouterr().err
    assert main(["build", "--artifacts", str(fp8), "--precision", "fp16"]) == 1
    assert "build it with --precision fp8" in capsys.readouterr().err
    assert not (int8 / "engines").exists() and not any((fp8 / "engines").glob("*sm86*"))


# ----------------------------------------------------------------------------- bad input
def _refused(argv, capsys, out, expected: int = 1):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == expected and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "something was written"
    return err


def test_an_occupied_out_folder_is_refused_before_any_work(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["quantize", "--artifacts", str(tiny_artifact), "--out", str(out), "--mode", "int8"]) == 1
    err = capsys.readouterr().err
    assert "exists and is not an empty folder" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_an_already_quantised_artifact_is_refused(int8, tmp_path, capsys):
    out = tmp_path / "again"
    err = _refused(["quantize", "--artifacts", str(int8), "--out", str(out), "--mode", "fp8"], capsys, out)
    assert "is already quantised (int8, entropy); quantise its fp32 source instead" in err


def _edited_copy(tiny_artifact, tmp_path, edit):
    folder = tmp_path / "art"
    shutil.copytree(tiny_artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("case, argv, message, code", [
    ("bf16", [], "int8 activations need calibration edits run on the source graphs, and ONNX Runtime's CPU "
                 "provider has no bf16 kernels", 1),
    ("no-t5", [], "has no text encoder (it was exported from a fixture); pass --fixture DIR", 1),
    ("ok", ["--calibration", "nowhere"], "calibration set nowhere: no such folder or CSV file", 1),
    ("ok", ["--min-bit-agreement", "1.5"], "--min-bit-agreement: must be above 0 and at most 1, got 1.5", 2),
    ("ok", ["--exclude", "blocks.*"], "nothing to quantise: all 18 layer groups", 1),
    ("ok", ["--exclude", "blocks.(("], "is not a regular expression", 1),
    ("ok", ["--exclude", r"block\.0\..*"], "matches no layer group", 1),
    ("ok", ["--method", "awq_clip"], "--mode int8 calibrates with entropy, max, not 'awq_clip'", 1),
    ("ok", ["--held-out", "0"], "--held-out: must be at least 1, got 0", 2),
])
def test_bad_requests_get_one_line_and_write_nothing(tiny_artifact, tmp_path, capsys, case, argv, message, code):
    edits = {"bf16": lambda d: d.update(precision="bf16"), "no-t5": lambda d: d["graphs"].pop("text_encoder"),
             "ok": lambda d: None}
    art = _edited_copy(tiny_artifact, tmp_path, edits[case])
    out = tmp_path / "q"
    err = _refused(["quantize", "--artifacts", str(art), "--out", str(out), "--mode", "int8", *argv], capsys, out, code)
    assert message in err


def test_a_missing_modelopt_says_how_to_install_it(tiny_artifact, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)  # what a failed import leaves
    out = tmp_path / "q"
    err = _refused(["quantize", "--artifacts", str(tiny_artifact), "--out", str(out), "--mode", "int4"], capsys, out)
    assert "'nvidia-modelopt', which is not installed" in err and 'pip install "varedit-deploy[quant]"' in err


def test_parity_replays_a_given_export_of_the_fixture(tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["export", "--fixture", str(fixture_dir("tiny-8b")), "--out", str(art)]) == 0
    assert main(["parity", "--fixture", str(fixture_dir("tiny-8b")), "--backend", "onnxruntime",
                 "--artifacts", str(art)]) == 0
    assert f"backend onnxruntime on {art}" in capsys.readouterr().out
    assert main(["parity", "--fixture", str(fixture_dir("tiny-2b")), "--backend", "onnxruntime",
                 "--artifacts", str(art)]) == 1
    assert "is not an export of fixture" in capsys.readouterr().err


def test_inspect_names_the_cache_type_the_step_takes(int8, fp8):
    """16-bit artifacts take 16-bit caches since the release-size work; inspect used to print float32."""
    from varedit_deploy.inspection import inspect_artifact

    assert "KV cache int8:" in "\n".join(inspect_artifact(int8)[0])
    assert read_manifest(fp8).kv_cache_dtype == "float16"
    assert "KV cache float16:" in "\n".join(inspect_artifact(fp8)[0])
