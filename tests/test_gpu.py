"""Checks that need a CUDA GPU and TensorRT; skipped (not faked) where those are absent."""

import pytest

from varedit_deploy.cli import main
from varedit_deploy.parity import check_fixture

pytestmark = [pytest.mark.gpu, pytest.mark.trt]


def test_tensorrt_fp32_reproduces_the_fixtures(golden):
    report = check_fixture(golden, "tensorrt")
    assert all(r.bits_differ == 0 for r in report.scales), report.table()
    assert report.ok, report.table()


def test_polygraphy_compares_every_engine_with_onnxruntime(golden, tmp_path):
    from varedit_deploy.build.compare import compare_engines
    from varedit_deploy.build.engines import BuildOptions, build_engines

    art = tmp_path / "art"
    assert main(["export", "--fixture", str(golden), "--out", str(art)]) == 0
    folder = build_engines(art, BuildOptions(flavour="tensorrt", precision="fp32", target="current"),
                           progress=lambda _: None)
    results = compare_engines(art, folder)
    assert {r.graph for r in results} >= {"step", "sample", "source_embed", "sar_pool", "vae_decoder"}
    assert sum(r.graph == "step" for r in results) == 8  # one comparison per scale profile and the source pass
    failed = [r for r in results if not r.passed]
    assert not failed, failed


def test_tensorrt_edit_runs_with_cuda_graphs(tiny_artifact, tmp_path, photos):
    import numpy as np

    from varedit_deploy.build.engines import BuildOptions, build_engines
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    build_engines(tiny_artifact, BuildOptions(flavour="tensorrt", precision="fp32", target="current"),
                  progress=lambda _: None)
    trt = EditPipeline.from_artifacts(tiny_artifact, backend="tensorrt", precision="fp32")
    ort = EditPipeline.from_artifacts(tiny_artifact)
    first = trt.edit(photos["astronaut"], "make it red", noise=NumpyNoise(1))
    again = trt.edit(photos["astronaut"], "make it red", noise=NumpyNoise(1))  # replayed CUDA graphs
    ref = ort.edit(photos["astronaut"], "make it red", noise=NumpyNoise(1))
    agree = np.mean([np.mean(a == b) for a, b in zip(first.loop.bits, ref.loop.bits)])
    assert agree > 0.999, agree
    assert all(np.array_equal(a, b) for a, b in zip(first.loop.bits, again.loop.bits))


def test_torch_fast_path_bf16_with_cuda_graphs_agrees_with_the_reference(tiny_text_dir, photos):
    import numpy as np
    import torch

    from varedit_deploy.config import from_name
    from varedit_deploy.model.edit import edit
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    def fresh():
        model = VAREditModel.random(from_name("tiny-2b"), seed=1)
        model.attach_text_encoder(tiny_text_dir, "fp32")
        return model

    ref = edit(fresh(), photos["coffee"], "make it red", noise=NumpyNoise(7))  # fp32 CPU reference
    pipe = EditPipeline.from_model(fresh(), device="cuda", dtype=torch.bfloat16)
    first = pipe.edit(photos["coffee"], "make it red", noise=NumpyNoise(7))
    again = pipe.edit(photos["coffee"], "make it red", noise=NumpyNoise(7))  # replays the captured graphs
    assert all(np.array_equal(a, b) for a, b in zip(first.loop.bits, again.loop.bits))
    agree = np.mean(np.concatenate([(a == r.bits.numpy()).ravel() for a, r in zip(first.loop.bits,
                                                                                  ref.generation.scales)]))
    assert agree > 0.99, agree
