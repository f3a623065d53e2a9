import json

import numpy as np
import onnx
import pytest
import torch

from varedit_deploy.artifact import SCHEMA_VERSION, read_manifest
from varedit_deploy.config import from_name
from varedit_deploy.export.artifacts import export_artifacts
from varedit_deploy.export.graphs import graph_specs
from varedit_deploy.model.loaded import VAREditModel

# Graphs whose math has no bf16 rounding: ONNX Runtime must agree with PyTorch to float32 noise.
EXACT_GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder", "sample", "step") + tuple(f"next_input_{s}" for s in range(7))


def test_manifest_describes_every_graph(tiny_artifact):
    m = read_manifest(tiny_artifact, full=True)
    assert m.data["schema_version"] == SCHEMA_VERSION
    names = set(m.graphs)
    assert {"text_encoder", "text_cond", "vae_encoder", "vae_decoder", "source_pass", "step", "sample"} <= names
    assert {f"next_input_{s}" for s in range(7)} <= names
    step = m.graphs["step"]
    assert [i["name"] for i in step["inputs"]][:7] == ["x", "modulation", "head_modulation", "text_k", "text_v",
                                                       "sar_k", "sar_v"]
    assert step["inputs"][0]["shape"] == [2, "tokens", 64] and step["outputs"][0]["shape"] == [2, "tokens", 32]
    assert m.graphs["text_cond"]["inputs"][0]["shape"] == [1, "text_len", 256]
    per_scale = m.data["schedule"]["per_scale"]
    assert [p["past_len"] for p in per_scale] == [256 + s for s in (0, 1, 5, 21, 57, 121, 265)]
    assert m.data["exporter"]["torch"] and m.data["source"]["command"].startswith("varedit-deploy export")
    assert m.tokenizer_file is not None and m.tokenizer_file.is_file()
    assert m.config == from_name("tiny-2b")


def test_every_graph_passes_the_checker_and_uses_only_tensorrt_ops(tiny_artifact):
    m = read_manifest(tiny_artifact)
    for name, g in m.graphs.items():
        onnx.checker.check_model(str(m.graph_path(name)), full_check=True)
        assert g["tensorrt_unsupported_ops"] == [], name


def test_each_graph_matches_its_reference_module(tiny_model):
    """Graphs without bf16 rounding agree to float32 noise. Graphs with the official bf16 casts
    (text_cond, source_pass) can land a float32-noise-sized difference on the other side of a
    bf16 rounding boundary; one such flip moves later values by about 2^-8 relative, so there
    we bound the error by 2^-7 of the output's magnitude (the fixture parity tests are the gate)."""
    specs = graph_specs(tiny_model, object())
    import tempfile
    from pathlib import Path

    from varedit_deploy.export.onnx_export import compare_with_module, export_graph

    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            if spec.name == "text_encoder":
                continue  # needs the real T5 module; covered by the artifact export above
            export_graph(spec, Path(tmp))
            errors = compare_with_module(spec, Path(tmp) / f"{spec.name}.onnx")
            import torch

            with torch.inference_mode():
                ref = spec.module(*spec.example)
            ref = ref if isinstance(ref, tuple) else (ref,)
            for (name, err), r in zip(errors.items(), ref):
                scale = float(r.abs().max()) if r.numel() else 0.0
                limit = 2e-5 * max(scale, 1.0) if spec.name in EXACT_GRAPHS else 2**-7 * scale
                assert err <= limit, (spec.name, name, err, scale)


def test_large_graphs_use_external_data(tmp_path):
    model = VAREditModel.random(from_name("tiny-8b"))
    art = export_artifacts(model, tmp_path / "a", progress=lambda _: None, external_data_bytes=100_000,
                           validate=False)
    m = read_manifest(art, full=True)
    files = [f["path"] for f in m.graphs["step"]["files"]]
    assert files == ["graphs/step.onnx", "graphs/step.onnx.data"]
    locations = {t.data_location for t in onnx.load(str(art / files[0]), load_external_data=False).graph.initializer}
    assert onnx.TensorProto.EXTERNAL in locations


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import varedit_deploy.export.artifacts as artifacts

    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    calls = []

    def failing(spec, folder, *a):
        calls.append(spec.name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return original(spec, folder, *a)

    original = artifacts.export_graph
    monkeypatch.setattr(artifacts, "export_graph", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        export_artifacts(VAREditModel.random(from_name("tiny-2b")), out, progress=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert (out / "keep.txt").read_text() == "previous"


def test_manifest_round_trips_the_config(tiny_artifact):
    data = json.loads((tiny_artifact / "manifest.json").read_text())
    assert data["model"]["transformer"]["depth"] == 3
    assert np.isclose(data["model"]["sampling"]["cfg"], 3.0)


def test_fp16_export_runs_on_onnxruntime_and_reports_its_agreement(tmp_path, tiny_model, tiny_artifact, photos):
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    art = export_artifacts(tiny_model, tmp_path / "fp16", precision="fp16", progress=lambda _: None)
    m = read_manifest(art)
    assert m.data["precision"] == "fp16"
    assert m.graphs["step"]["precision"] == "fp16" and m.graphs["sample"]["precision"] == "fp32"
    step = onnx.load(str(m.graph_path("step")))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in step.graph.initializer)
    half = EditPipeline.from_artifacts(art).edit(photos["astronaut"], "make it red", noise=NumpyNoise(2))
    full = EditPipeline.from_artifacts(tiny_artifact).edit(photos["astronaut"], "make it red", noise=NumpyNoise(2))
    agreement = np.mean(np.concatenate([(a == b).ravel() for a, b in zip(half.loop.bits, full.loop.bits)]))
    # Measured 0.99988 (1 of 8,336 bits differs) with the current fp32 placement, 2-core x86_64 CPU,
    # ONNX Runtime 1.32; fp32 parity is the gate, this holds the fp16 path to what it achieves.
    assert agreement > 0.999, agreement


def test_random_weights_export_leaves_only_the_artifact(tiny_artifact):
    """`tiny_artifact` is `export --random-weights` through the CLI: its tiny T5 went into the
    artifact (graph and tokenizer) and the temporary T5 folder beside it is gone."""
    m = read_manifest(tiny_artifact, full=True)
    assert m.has_graph("text_encoder") and m.tokenizer_file.is_file()
    assert m.data["source"]["command"] == f"varedit-deploy export --random-weights --model tiny-2b --out {tiny_artifact}"
    assert [p.name for p in tiny_artifact.parent.iterdir()] == ["tiny-2b"]


def test_export_from_a_release_folder_loads_the_release_weights(tmp_path, tiny_text_dir, monkeypatch, capsys):
    """`export --checkpoint-dir`: the CLI loads the release strictly and hands that model to the
    exporter (replaced here by a recorder; exporting itself is tested above)."""
    from fixture_writer import release_like, write_release

    import varedit_deploy.export.artifacts as artifacts
    from varedit_deploy.cli import main
    from varedit_deploy.config import PRESETS

    config = release_like(4, 2)
    monkeypatch.setitem(PRESETS, config.name, config)
    model = VAREditModel.random(config, seed=5)
    write_release(tmp_path, model, 2, None, True, tiny_text_dir)
    seen = {}
    monkeypatch.setattr(artifacts, "export_artifacts", lambda m, out, **kw: seen.update(model=m, out=out, **kw))
    out = tmp_path / "art"
    assert main(["export", "--checkpoint-dir", str(tmp_path), "--model", config.name, "--out", str(out)]) == 0
    loaded = seen["model"]
    assert seen["out"] == out and seen["precision"] == "fp32"
    assert seen["source"]["command"].startswith(f"varedit-deploy export --checkpoint-dir {tmp_path}")
    for ours, theirs in ((model.transformer, loaded.transformer), (model.vae, loaded.vae)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.text_encoder is not None and loaded.text_encoder.precision == "fp32"


@pytest.mark.parametrize("sources", [[], ["--random-weights", "--fixture", "{fixture}"],
                                     ["--checkpoint-dir", "{tmp}", "--random-weights"]])
def test_export_needs_exactly_one_model_source(sources, tmp_path, capsys):
    from conftest import fixture_dir

    from varedit_deploy.cli import main

    argv = [a.format(fixture=fixture_dir("tiny-2b"), tmp=tmp_path) for a in sources]
    assert main(["export", *argv, "--model", "tiny-2b", "--out", str(tmp_path / "art")]) == 1
    assert "give exactly one model source" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()
