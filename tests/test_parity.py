import dataclasses
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from fixture_writer import write_fixture
from varedit_deploy.cli import main
from varedit_deploy.config import SamplingConfig, TransformerConfig, from_name
from varedit_deploy.model.sampler import sample_bits
from varedit_deploy.parity import (
    LOGIT_TOL, FixtureData, FixtureRun, check_fixture, compare, official_noise, sampling_margin,
)


def test_reference_reproduces_the_official_fixtures(parity_golden):
    report = check_fixture(parity_golden)
    assert report.ok, report.table()
    assert max(r.rel for r in report.scales) < LOGIT_TOL
    assert all(r.bits_differ == r.bits_explained for r in report.scales)  # only official near-ties may differ
    assert all(r.worst_margin < r.logit_tol for r in report.scales)
    assert report.image_lsb <= 1


def test_parity_cli_prints_the_table_and_exits_zero(golden, capsys):
    assert main(["parity", "--fixture", str(golden)]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "max|dlogit|" in out and "near-ties:" in out


def test_parity_fails_on_a_perturbed_fixture(golden, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(golden, bad)
    expected = load_file(str(bad / "expected.safetensors"))
    expected["logits_3"] = expected["logits_3"] * 1.01
    save_file(expected, str(bad / "expected.safetensors"))
    assert main(["parity", "--fixture", str(bad)]) == 1
    assert "verdict: FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("top_k, top_p", [(900, 0.97), (900, 1.0), (1, 0.97)])
def test_sampling_margin_is_the_logit_change_that_flips_the_official_draw(top_k, top_p):
    """Oracle: the sampler itself. Moving the two logits of a row by 0.99 of its margin towards
    the other outcome keeps the draw; by 1.01 of it flips the draw (float64, so no rounding)."""
    from varedit_deploy.sampling import SamplerInputs

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4000, 2, generator=g, dtype=torch.float64) * 3  # many rows beyond the top-p cut
    noise = torch.empty(4000, 2, dtype=torch.float64).exponential_(1, generator=g)
    threshold = float(SamplerInputs.from_params(SamplingConfig(top_k=top_k, top_p=top_p)).drop_threshold[0])
    thr = torch.tensor([threshold], dtype=torch.float64)
    margin = torch.from_numpy(sampling_margin(logits.numpy(), noise.numpy(), threshold))
    bits = sample_bits(logits, noise, thr)
    towards_other = (1 - 2 * bits).to(torch.float64)  # push D = l1 - l0 up for a 0, down for a 1
    keep = margin > 1e-6
    for factor, flips in ((0.99, False), (1.01, True)):
        step = (factor * margin * towards_other)[:, None] * torch.tensor([-1.0, 1.0], dtype=torch.float64)
        moved = sample_bits(logits + step, noise, thr)
        assert bool(torch.all((moved != bits)[keep] == flips)), (factor, int((moved != bits)[keep].sum()))


@pytest.fixture(scope="module")
def fixture_2b():
    from conftest import fixture_dir

    return FixtureData.load(fixture_dir("tiny-2b"))


def _perfect_run(fixture: FixtureData) -> FixtureRun:
    exp, d_tok = fixture.expected, fixture.config.transformer.d_tok
    scales = range(fixture.config.schedule.num_scales)
    return FixtureRun(exp["raw_features"].copy(), exp["source_prefix"].copy(),
                      [exp[f"logits_{s}"].reshape(-1, 2).copy() for s in scales],
                      [exp[f"sampled_{s}"].reshape(1, -1, d_tok).copy() for s in scales],
                      exp["summed_codes"][:, :, 0].copy(), exp["decoded"].copy())


def test_a_flipped_near_tie_is_explained_and_a_flipped_clear_bit_fails(fixture_2b):
    """A synthetic near-tie: row `tie` of scale 4 gets official logits 1e-7 from its flip point
    under the official noise (the official bit is unchanged), and the run flips that bit."""
    s = 4
    fixture = dataclasses.replace(fixture_2b, expected=dict(fixture_2b.expected))
    threshold = 1.0 - fixture.config.sampling.top_p
    noise = official_noise(fixture.config)[s].astype(np.float64)
    logits = fixture.expected[f"logits_{s}"].reshape(-1, 2).copy()
    bits = fixture.expected[f"sampled_{s}"].reshape(-1)
    margins = sampling_margin(logits, noise, threshold)
    tie, clear = int(np.argmin(np.abs(np.log(noise[:, 1] / noise[:, 0])))), int(np.argmax(margins))
    flip_point = np.log(noise[tie, 1]) - np.log(noise[tie, 0])
    logits[tie] = [0.0, flip_point + (1e-6 if bits[tie] else -1e-6)]
    fixture.expected[f"logits_{s}"] = logits.reshape(1, -1, 2)
    assert sampling_margin(logits[tie:tie + 1], noise[tie:tie + 1], threshold)[0] < 1e-6
    assert margins[clear] > 100 * LOGIT_TOL * np.abs(logits).max()

    run = _perfect_run(fixture)
    assert compare(fixture, run, "synthetic").ok
    run.bits[s].reshape(-1)[tie] ^= 1
    report = compare(fixture, run, "synthetic")
    row = report.scales[s]
    assert report.ok and (row.bits_differ, row.bits_explained) == (1, 1) and row.worst_margin < 1e-6
    assert "1 near-tie" in report.table()
    run.bits[s].reshape(-1)[clear] ^= 1
    report = compare(fixture, run, "synthetic")
    row = report.scales[s]
    assert not report.ok and (row.bits_differ, row.bits_explained) == (2, 1)
    assert "verdict: FAIL" in report.table()


@pytest.fixture(scope="module")
def other_fixture(tmp_path_factory, photos):
    """A fixture of another shape: 8B-like, depth 4 in 2 chunks, width 128, 4 heads, 5 text tokens."""
    base = from_name("tiny-8b")
    config = dataclasses.replace(
        base,
        transformer=TransformerConfig(depth=4, dim=128, heads=4, codebook_dim=14, patchify=True,
                                      text_channels=512, block_chunks=2),
        vae=dataclasses.replace(base.vae, base_ch=32, ch_mult=(1, 1, 2, 2)),
        sampling=SamplingConfig(cfg=2.5, tau=0.7, top_k=900, top_p=0.95, seed=11),
    )
    return write_fixture(tmp_path_factory.mktemp("fx") / "other", config, photos["coffee"], text_len=5)


def test_parity_machinery_reads_fixtures_of_other_shapes(other_fixture):
    """Smoke test of the parity tooling (config, chunked names, text length, sampler settings),
    not of the math: the fixture comes from our own `generate`. The math of other shapes has
    independent oracles: per-head attention from the spec (test_attention.py), the official key
    layout (test_checkpoint.py), the spec's RoPE table (test_rope.py)."""
    report = check_fixture(other_fixture)
    assert report.ok, report.table()
    assert sum(r.bits_total for r in report.scales) == 56 * 521


def test_missing_fixture_is_a_clear_error(tmp_path, capsys):
    assert main(["parity", "--fixture", str(tmp_path / "nothing")]) == 1
    assert "no such folder" in capsys.readouterr().err
