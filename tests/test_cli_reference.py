"""The torch-reference `edit` command: a tiny random model end to end, and its error messages."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from varedit_deploy.cli import main
from varedit_deploy.config import from_name
from varedit_deploy.imaging import load_image
from varedit_deploy.model.edit import edit
from varedit_deploy.model.loaded import VAREditModel
from varedit_deploy.model.tiny_text import write_tiny_text_encoder
from varedit_deploy.sampling import TorchCPUNoise


@pytest.fixture(scope="module")
def coffee_png(tmp_path_factory, photos):
    path = tmp_path_factory.mktemp("img") / "coffee.png"
    Image.fromarray(photos["coffee"]).save(path)
    return path


def test_edit_with_random_tiny_model_writes_an_image_of_the_source_size(coffee_png, tmp_path, capsys):
    out = tmp_path / "edited.png"
    code = main(["edit", "--random-weights", "--model", "tiny-8b", "--image", str(coffee_png),
                 "--instruction", "make the cup red", "--out", str(out), "--seed", "3", "--cfg", "2", "--tau", "0.7"])
    assert code == 0
    img = Image.open(out)
    assert img.size == Image.open(coffee_png).size and img.mode == "RGB"
    assert "transformer" in capsys.readouterr().out
    # The file is the library's reference edit of the same model, options and official noise.
    config = from_name("tiny-8b")
    model = VAREditModel.random(config, seed=0)
    model.attach_text_encoder(write_tiny_text_encoder(tmp_path / "t5", config.transformer.text_channels), "fp32")
    sampling = dataclasses.replace(config.sampling, cfg=2.0, tau=0.7, seed=3)
    expected = edit(model, load_image(coffee_png), "make the cup red", sampling, TorchCPUNoise(3)).image
    assert np.array_equal(np.asarray(img), np.asarray(expected))
    assert np.asarray(img).std() > 1  # not a blank image


@pytest.mark.parametrize("argv, message", [
    (["--image", "{missing}"], "no such file"),
    (["--image", "{text}"], "not a readable image"),
    (["--instruction", "  "], "instruction is empty"),
    (["--out", "{tmp}/x.xyz"], "unknown image extension"),
])
def test_edit_errors_are_specific_and_write_nothing(coffee_png, tmp_path, capsys, argv, message):
    (tmp_path / "text.png").write_text("hello")
    base = {"--image": str(coffee_png), "--instruction": "make it red", "--model": "tiny-2b",
            "--out": str(tmp_path / "out.png")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value.format(missing=tmp_path / "nope.png", text=tmp_path / "text.png", tmp=tmp_path)
    args = ["edit", "--random-weights"] + [x for kv in base.items() for x in kv]
    assert main(args) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob("x*"))


def test_checkpoint_dir_without_files_names_them(coffee_png, tmp_path, capsys):
    code = main(["edit", "--checkpoint-dir", str(tmp_path), "--model", "8b-1024", "--image", str(coffee_png),
                 "--instruction", "x", "--out", str(tmp_path / "o.png")])
    assert code == 1
    err = capsys.readouterr().err
    assert "8B-1024.pth" in err and "infinity_vae_d56_f8_14_patchify.pth" in err and "flan-t5-xl" in err


def test_console_script_help_runs_without_traceback():
    out = subprocess.run([sys.executable, "-m", "varedit_deploy.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "parity" in out.stdout
