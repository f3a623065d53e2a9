import dataclasses
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from fixture_writer import write_fixture
from varedit_deploy.cli import main
from varedit_deploy.config import SamplingConfig, TransformerConfig, from_name
from varedit_deploy.parity import check_fixture


def test_reference_reproduces_the_official_fixtures(golden):
    report = check_fixture(golden)
    assert report.ok, report.table()
    assert all(r.bits_differ == 0 for r in report.scales)
    assert max(r.rel for r in report.scales) < 2e-4
    assert report.image_lsb <= 1


def test_parity_cli_prints_the_table_and_exits_zero(golden, capsys):
    assert main(["parity", "--fixture", str(golden)]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "max|dlogit|" in out


def test_parity_fails_on_a_perturbed_fixture(golden, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(golden, bad)
    expected = load_file(str(bad / "expected.safetensors"))
    expected["logits_3"] = expected["logits_3"] * 1.01
    save_file(expected, str(bad / "expected.safetensors"))
    assert main(["parity", "--fixture", str(bad)]) == 1
    assert "verdict: FAIL" in capsys.readouterr().out


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


def test_parity_works_on_fixtures_of_other_shapes(other_fixture):
    report = check_fixture(other_fixture)
    assert report.ok, report.table()
    assert sum(r.bits_total for r in report.scales) == 56 * 521


def test_missing_fixture_is_a_clear_error(tmp_path, capsys):
    assert main(["parity", "--fixture", str(tmp_path / "nothing")]) == 1
    assert "no such folder" in capsys.readouterr().err
