"""The README's main job, end to end: `varedit-deploy demo`."""

import json

from PIL import Image

from varedit_deploy.cli import main
from varedit_deploy.demo import SAMPLE


def test_demo_builds_exports_and_edits_a_real_photo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[4/4]" in printed and "| total |" in printed
    edited = Image.open(out / "edited.png")
    assert edited.size == Image.open(SAMPLE).size
    assert Image.open(out / "side_by_side.png").size == (2 * edited.width, edited.height)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bits_identical_to_reference"] is True
    assert summary["max_pixel_difference_to_reference"] <= 2
    assert (out / "timings.md").read_text().startswith("| stage |")
    assert (out / "artifacts" / "manifest.json").is_file()
