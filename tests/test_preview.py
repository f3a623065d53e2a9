"""Progressive previews: which scales, the projection's layout, its fit, and its place in the artifact."""

import json
import shutil

import numpy as np
import pytest

from varedit_deploy.artifact import read_manifest
from varedit_deploy.errors import ArtifactError
from varedit_deploy.runtime.pipeline import EditPipeline
from varedit_deploy.runtime.preview import PreviewProjection, preview_scales
from varedit_deploy.runtime.preview_fit import PREVIEW_FILE, fit_projection, load_preview, training_states


@pytest.mark.parametrize("num_scales", [3, 4, 7, 10, 13])
@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_preview_scales_are_distinct_middle_scales(num_scales, count):
    scales = preview_scales(num_scales, count)
    assert len(scales) == min(count, num_scales - 3)
    assert list(scales) == sorted(set(scales))
    assert all(2 <= s <= num_scales - 2 for s in scales)
    if scales:
        assert scales[0] == 2  # the first preview comes as early as it shows anything


def test_fit_recovers_a_linear_decoder_exactly():
    """If the decoder were exactly a k x k -> p x p linear map, least squares must find that map."""
    rng = np.random.default_rng(0)
    d, p, k = 4, 2, 3
    truth = PreviewProjection((rng.standard_normal((k * k * d + 1, 3 * p * p)) * 0.02).astype(np.float32), k, p)
    states = [rng.standard_normal((1, d, 6, 5)).astype(np.float32) * 0.5 for _ in range(4)]
    decoded = [truth.apply(s) for s in states]
    assert all(np.abs(x).max() < 1 for x in decoded)  # no clipping: the map is linear on these states
    fitted, report = fit_projection(states, truth.apply, patch=p, kernel=k, ridge=0.0)
    assert np.allclose(fitted.weights, truth.weights, atol=1e-5)
    assert report["fit_psnr_db"] > 100
    assert all(np.allclose(fitted.apply(s), x, atol=1e-5) for s, x in zip(states, decoded))


def test_projection_layout_puts_each_patch_under_its_latent_pixel():
    """Weights that copy channel 0 of the centre pixel into every pixel of its patch give a blocky upsample."""
    d, p = 2, 4
    w = np.zeros((9 * d + 1, 3 * p * p), np.float32)
    w[4 * d + 0, :] = 1.0  # neighbourhood order is (dy, dx, channel); the centre is (1, 1)
    summed = np.arange(2 * 3 * 5, dtype=np.float32).reshape(1, 2, 3, 5) / 100
    image = PreviewProjection(w, 3, p).apply(summed)
    assert image.shape == (1, 3, 12, 20)
    expected = np.kron(summed[0, 0], np.ones((p, p), np.float32))
    assert all(np.array_equal(image[0, c], expected) for c in range(3))


def test_artifact_carries_the_projection_and_verifies_it(tiny_artifact, tmp_path):
    manifest = read_manifest(tiny_artifact)
    record = manifest.data["preview"]
    assert record["file"]["path"] == PREVIEW_FILE and record["kernel"] == 3 and record["states"] > 0
    assert load_preview(manifest).weights.shape == (9 * 16 + 1, 3 * 16 * 16)
    damaged = tmp_path / "art"
    shutil.copytree(tiny_artifact, damaged)
    np.save(damaged / PREVIEW_FILE, np.zeros((145, 768), np.float32))
    with pytest.raises(ArtifactError, match="preview/projection.npy was altered"):
        read_manifest(damaged)


def test_older_artifact_gets_the_same_projection_fitted_in_memory(tiny_artifact, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_artifact, old)
    data = json.loads((old / "manifest.json").read_text())
    del data["preview"]
    (old / "manifest.json").write_text(json.dumps(data))
    (old / PREVIEW_FILE).unlink()
    pipe = EditPipeline.from_artifacts(old)
    stored = load_preview(read_manifest(tiny_artifact))
    assert np.allclose(pipe.preview.weights, stored.weights, atol=1e-4)
    assert not (old / PREVIEW_FILE).exists()  # fitted in memory; the artifact is not touched


def test_first_preview_of_an_older_artifact_leaves_the_edit_alone(tiny_artifact, tmp_path):
    """Fitting the map runs edits on the pipeline's buffers: a preview asked for mid-edit must not
    be where that happens (the edit would go on from the fit's state)."""
    old = tmp_path / "old"
    shutil.copytree(tiny_artifact, old)
    data = json.loads((old / "manifest.json").read_text())
    del data["preview"]
    (old / "manifest.json").write_text(json.dumps(data))
    photo = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    expected = np.asarray(EditPipeline.from_artifacts(old).edit(photo, "add a red hat", seed=3).image)
    pipe = EditPipeline.from_artifacts(old)
    shown = []
    result = pipe.edit(photo, "add a red hat", seed=3,
                       on_scale=lambda s, summed: shown.append(pipe.preview_image(summed, (48, 40))) if s == 3 else None)
    assert len(shown) == 1 and shown[0].size == (48, 40)
    assert np.array_equal(np.asarray(result.image), expected)


def test_stored_projection_reproduces_its_fit_on_the_pipeline(tiny_artifact):
    """The artifact's projection, applied through the pipeline, gives the fit it recorded and beats a constant.

    (Random-weight decoders are not smooth, so on photos the fit never saw a linear preview carries
    little; benchmarks/preview_quality.py measures that, and what to expect from released weights.)
    """
    pipe = EditPipeline.from_artifacts(tiny_artifact)
    states = training_states(pipe)
    record = pipe.manifest.data["preview"]
    assert len(states) == record["states"]
    full = [pipe.decode(s) for s in states]
    err = np.mean([np.mean((pipe.preview.apply(s) - x) ** 2) for s, x in zip(states, full)])
    assert abs(10 * np.log10(4.0 / err) - record["fit_psnr_db"]) < 0.05
    assert err < np.mean([np.var(x) for x in full])
