"""Checks that need a CUDA GPU (`gpu`), some also TensorRT (`trt`); skipped (not faked) where those are absent.

Marked per test: the torch fast path needs only a GPU (and Triton), so `pytest -m gpu` on a GPU
host without TensorRT runs it; TensorRT checks carry both marks.
"""

import warnings

import numpy as np
import pytest

from varedit_deploy.cli import main
from varedit_deploy.parity import check_fixture


@pytest.mark.gpu
@pytest.mark.trt
def test_tensorrt_fp32_reproduces_the_fixtures(golden):
    report = check_fixture(golden, "tensorrt")
    assert all(r.bits_differ == 0 for r in report.scales), report.table()
    assert report.ok, report.table()


@pytest.mark.gpu
@pytest.mark.trt
def test_polygraphy_compares_every_engine_with_onnxruntime(golden, tmp_path):
    from varedit_deploy.builder.compare import compare_engines
    from varedit_deploy.builder.engines import BuildOptions, build_engines

    art = tmp_path / "art"
    assert main(["export", "--fixture", str(golden), "--out", str(art)]) == 0
    folder = build_engines(art, BuildOptions(flavour="tensorrt", precision="fp32", target="current"),
                           progress=lambda _: None)
    results = compare_engines(art, folder)
    assert {r.graph for r in results} >= {"step", "sample", "source_embed", "sar_pool", "vae_decoder"}
    assert sum(r.graph == "step" for r in results) == 8  # one comparison per scale profile and the source pass
    failed = [r for r in results if not r.passed]
    assert not failed, failed


@pytest.mark.gpu
@pytest.mark.trt
def test_tensorrt_edit_runs_with_cuda_graphs(tiny_artifact, tmp_path, photos):
    from varedit_deploy.builder.engines import BuildOptions, build_engines
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    build_engines(tiny_artifact, BuildOptions(flavour="tensorrt", precision="fp32", target="current"),
                  progress=lambda _: None)
    trt = EditPipeline.from_artifacts(tiny_artifact, backend="tensorrt", precision="fp32")
    ort = EditPipeline.from_artifacts(tiny_artifact)
    first = trt.edit(photos["astronaut"], "make it red", noise=NumpyNoise(1), record=True)
    again = trt.edit(photos["astronaut"], "make it red", noise=NumpyNoise(1), record=True)  # replayed CUDA graphs
    ref = ort.edit(photos["astronaut"], "make it red", noise=NumpyNoise(1), record=True)
    agree = np.mean([np.mean(a == b) for a, b in zip(first.loop.bits, ref.loop.bits, strict=True)])
    assert agree > 0.999, agree
    assert all(np.array_equal(a, b) for a, b in zip(first.loop.bits, again.loop.bits, strict=True))


@pytest.mark.gpu
@pytest.mark.trt
def test_tensorrt_replays_equal_eager_runs_across_instruction_lengths(tiny_artifact, photos):
    """Captured graphs of one profile but other text lengths are replayed between each other."""
    import numpy as np

    from varedit_deploy.builder.engines import BuildOptions, build_engines
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    build_engines(tiny_artifact, BuildOptions(flavour="tensorrt", precision="fp32", target="current"),
                  progress=lambda _: None)
    graphs = EditPipeline.from_artifacts(tiny_artifact, backend="tensorrt", precision="fp32")
    eager = EditPipeline.from_artifacts(tiny_artifact, backend="tensorrt", precision="fp32", cuda_graphs=False)
    for text in ("make it red", "turn the whole sky a deep purple at dusk", "make it red"):
        a = graphs.edit(photos["chelsea"], text, noise=NumpyNoise(2), record=True)
        b = eager.edit(photos["chelsea"], text, noise=NumpyNoise(2), record=True)
        assert all(np.array_equal(x, y) for x, y in zip(a.loop.bits, b.loop.bits, strict=True)), text
    step = graphs.backend.memory_report()["step"]
    assert step["cuda_graphs"] == 2 * step["profiles"] and step["shared_bytes"] < step["one_per_profile_bytes"]
    graphs.close()
    eager.close()


def _tiny(tiny_text_dir):
    from varedit_deploy.config import from_name
    from varedit_deploy.model.loaded import VAREditModel

    model = VAREditModel.random(from_name("tiny-2b"), seed=1)
    model.attach_text_encoder(tiny_text_dir, "fp32")
    return model


@pytest.mark.gpu
def test_torch_fast_path_bf16_with_cuda_graphs_replays_identically(tiny_text_dir, photos):
    """bf16 caches on the GPU, CUDA graphs captured on the first edit and replayed on the second: the
    same bits, CUDA-event timings. (Agreement with fp32: test_fast_path.py, the `cuda` case.)"""
    import torch

    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    pipe = EditPipeline.from_model(_tiny(tiny_text_dir), device="cuda", dtype=torch.bfloat16)
    assert pipe.loop.cache.k[0].dtype == torch.bfloat16 and pipe.loop.cache.k[0].is_cuda
    first = pipe.edit(photos["coffee"], "make it red", noise=NumpyNoise(7), record=True)
    again = pipe.edit(photos["coffee"], "make it red", noise=NumpyNoise(7), record=True)  # replays the graphs
    assert len(first.loop.bits) == 7
    assert all(np.array_equal(a, b) for a, b in zip(first.loop.bits, again.loop.bits, strict=True))
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert {"step", "sample", "next_input", "scale_6", "transformer"} <= set(again.timings_ms)
    assert all(v > 0 for v in again.timings_ms.values())  # CUDA-event timings
    pipe.close()


@pytest.mark.gpu
def test_torch_fast_path_edit_synchronises_the_host_at_most_twice(tiny_text_dir, photos):
    """PyTorch's sync debug mode warns on every host synchronisation (stream or device waits,
    blocking copies, .item()): an edit with CUDA graphs replayed may cause at most 2, bits included."""
    import torch

    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    pipe = EditPipeline.from_model(_tiny(tiny_text_dir), device="cuda", dtype=torch.bfloat16)
    pipe.edit(photos["coffee"], "make it red", noise=NumpyNoise(3))  # warm-up: compiles and captures
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pipe.edit(photos["coffee"], "make it red", noise=NumpyNoise(3), record=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 2, syncs
    pipe.close()
