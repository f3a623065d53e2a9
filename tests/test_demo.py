"""The README's main job, end to end: `varedit-deploy demo`."""

import json
import os
import shlex
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from varedit_deploy.cli import build_parser, main
from varedit_deploy.demo import check_demo_folder
from varedit_deploy.imaging import SAMPLE_PHOTO
from varedit_deploy.errors import OutputError


def test_demo_builds_exports_and_edits_a_real_photo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--timed-edits", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[4/4]" in printed and "| total |" in printed
    assert "ONNX Runtime vs the eager PyTorch reference: same model, same photo, same noise" in printed
    assert "median of 2 edits each after one warm-up" in printed and "range" in printed
    assert "max pixel difference: " in printed and "the sampled bits are what must match" in printed
    assert f"{out / 'summary.json'}" in printed.splitlines()[-2]  # listed among the files written
    command = printed.splitlines()[-1].split(": ", 1)[1].split("  (")[0]  # how to try it in a browser
    assert command.startswith("varedit-deploy serve ")
    served = build_parser().parse_args(shlex.split(command)[1:])
    assert Path(served.artifacts) == out / "artifacts" and served.ui is None  # None: the page is on by default

    edited = Image.open(out / "edited.png")
    assert edited.size == Image.open(SAMPLE_PHOTO).size
    side = np.asarray(Image.open(out / "side_by_side.png").convert("L"))
    assert side.shape[1] == 2 * edited.width and side.shape[0] > edited.height + 40
    top, bottom = side[:12], side[-30:]  # the label band over the panels and the notes under them
    assert (top < 128).any() and (bottom < 128).any() and (side[:12, -50:] == 255).all()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["bits_identical_to_reference"] is True
    assert summary["max_pixel_difference_to_reference"] <= 2 and summary["max_pixel_difference_note"]
    assert summary["compares"].endswith("2 edits each after one warm-up, interleaved")
    ort, ref = summary["onnxruntime_ms"]["total"], summary["reference_ms"]["total"]
    assert ort["min"] <= ort["median"] <= ort["max"] and ref["min"] <= ref["median"] <= ref["max"]
    assert summary["speedup_of_median_total"] == pytest.approx(ref["median"] / ort["median"])
    table = (out / "timings.md").read_text()
    assert table.startswith("Median ms of 2 edits") and "| transformer / step (all scales) |" in table
    assert (out / "artifacts" / "manifest.json").is_file()

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "edited.png").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((out / "artifacts").stat().st_mode) == 0o777 & ~umask

    check_demo_folder(out)  # a previous demo's folder may be written again
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write \(notes.txt\)"):
        check_demo_folder(out)
