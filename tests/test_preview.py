"""Progressive previews: which scales, the projection's layout, its fit, and its place in the artifact."""

import json
import shutil

import numpy as np
import pytest

from varedit_deploy.artifact import read_manifest
from varedit_deploy.errors import ArtifactError
from varedit_deploy.runtime.pipeline import EditPipeline
from varedit_deploy.runtime.preview import PreviewProjection, preview_scales
from varedit_deploy.runtime.preview_fit import (PREVIEW_FILE, VAEGraphs, fit_projection, load_preview,
                                                residual_states, tokens_to_latent, training_states)


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
    record = manifest.preview
    assert record["file"]["path"] == PREVIEW_FILE and record["kernel"] == 3 and record["states"] > 0
    assert load_preview(manifest).weights.shape == (9 * 16 + 1, 3 * 16 * 16)
    damaged = tmp_path / "art"
    shutil.copytree(tiny_artifact, damaged)
    np.save(damaged / PREVIEW_FILE, np.zeros((145, 768), np.float32))
    with pytest.raises(ArtifactError, match="preview/projection.npy was altered"):
        read_manifest(damaged)


def _without_preview(tiny_artifact, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_artifact, old)
    data = json.loads((old / "manifest.json").read_text())
    del data["preview"]
    (old / "manifest.json").write_text(json.dumps(data))
    (old / PREVIEW_FILE).unlink()
    return old


def test_an_artifact_without_a_projection_fits_it_only_when_asked(tiny_artifact, tmp_path):
    """Fitting is an explicit call: a preview before it is a clear error, after it the artifact's own map."""
    old = _without_preview(tiny_artifact, tmp_path)
    pipe = EditPipeline.from_artifacts(old)
    assert pipe.preview is None
    summed = pipe.loop.summed[0]
    with pytest.raises(ArtifactError, match="no preview projection; call fit_preview"):
        pipe.preview_image(summed, (48, 40))
    report = pipe.fit_preview()
    stored = load_preview(read_manifest(tiny_artifact))
    assert np.allclose(pipe.preview.weights, stored.weights, atol=1e-4)
    assert report["fit_psnr_db"] == read_manifest(tiny_artifact).preview["fit_psnr_db"]
    assert not (old / PREVIEW_FILE).exists()  # fitted in memory; the artifact is not touched


def test_fitting_runs_the_vae_graphs_alone_and_leaves_an_edit_alone(tiny_artifact, tmp_path):
    """The fit loads and runs only the VAE encoder and decoder, on buffers of its own: an edit after it
    is the same as on a pipeline that never fitted."""
    old = _without_preview(tiny_artifact, tmp_path)
    photo = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    expected = np.asarray(EditPipeline.from_artifacts(old).edit(photo, "add a red hat", seed=3).image)
    pipe = EditPipeline.from_artifacts(old)
    ran = []
    for name in list(pipe.backend._graphs):
        runner = pipe.backend._graphs[name]
        original = runner.run
        runner.run = lambda i, o, name=name, original=original: (ran.append(name), original(i, o))[1]
    pipe.fit_preview()
    assert set(ran) == {"vae_encoder", "vae_decoder"}
    shown = []
    result = pipe.edit(photo, "add a red hat", seed=3,
                       on_scale=lambda s, summed: shown.append(pipe.preview_image(summed, (48, 40))) if s == 3 else None)
    assert len(shown) == 1 and shown[0].size == (48, 40)
    assert np.array_equal(np.asarray(result.image), expected)


@pytest.mark.parametrize("name", ["tiny-2b", "tiny-8b"])
def test_tokens_to_latent_is_the_models_layout(name):
    """The numpy twin used by the fit equals model/codes.py's tokens_to_latent (2x2 patchify for 8B)."""
    import torch

    from varedit_deploy.config import from_name
    from varedit_deploy.model.codes import tokens_to_latent as torch_tokens_to_latent

    t = from_name(name).transformer
    tokens = np.random.default_rng(1).standard_normal((1, 16 * 16, t.d_tok)).astype(np.float32)
    ours = tokens_to_latent(tokens, 16, t.patchify)
    assert np.array_equal(ours, torch_tokens_to_latent(torch.from_numpy(tokens), 16, t.patchify).numpy())


def test_residual_states_are_the_official_multiscale_quantisation():
    """docs/spec/vae-text.md 2.5, written out with torch's own area and bilinear resizes: the summed
    codes after each kept scale match, and the last scale's sum is the sign of the latent's residual."""
    import torch
    import torch.nn.functional as F

    from varedit_deploy.config import from_name

    sched = from_name("tiny-8b").schedule
    d, side = 14, sched.latent_side
    latent = np.random.default_rng(2).standard_normal((1, d, side, side)).astype(np.float32)
    r = torch.from_numpy(latent).double()
    total = torch.zeros_like(r)
    expected = {}
    for k in range(sched.num_scales):
        h = sched.vae_side(k)
        q = (torch.where(F.adaptive_avg_pool2d(r, h) > 0, 1.0, -1.0) / np.sqrt(d)).double()
        up = q if h == side else F.interpolate(q, size=(side, side), mode="bilinear", align_corners=False)
        r, total = r - up, total + up
        expected[k] = total.float().numpy()
    keep = {2, 4, sched.num_scales - 1}
    ours = residual_states(latent, sched, keep)
    for state, k in zip(ours, sorted(keep)):
        assert np.allclose(state, expected[k], atol=1e-6), k


def test_stored_projection_reproduces_its_fit_on_the_pipeline(tiny_artifact):
    """The artifact's projection, applied through the pipeline, gives the fit it recorded and beats a constant.

    (Random-weight decoders are not smooth, so on photos the fit never saw a linear preview carries
    little; benchmarks/preview_quality.py measures that, and what to expect from released weights.)
    """
    pipe = EditPipeline.from_artifacts(tiny_artifact)
    vae = VAEGraphs(pipe.backend, pipe.config)
    states = training_states(vae)
    record = pipe.manifest.preview
    assert len(states) == record["states"] == 9  # three photos x the three preview scales
    full = [vae.decode(s) for s in states]
    err = np.mean([np.mean((pipe.preview.apply(s) - x) ** 2) for s, x in zip(states, full)])
    assert abs(10 * np.log10(4.0 / err) - record["fit_psnr_db"]) < 0.05
    assert err < np.mean([np.var(x) for x in full])
