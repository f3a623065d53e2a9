"""Phone photos the right way up: the EXIF orientation is applied on load, everywhere a photo comes in.

A phone stores a portrait as a landscape JPEG with orientation 6; viewers, browsers, diffusers'
`load_image` and OpenAI's API show it turned. The reference is Pillow's `ImageOps.exif_transpose`.
Every orientation (1-8) is checked on a non-square photo through each way in: `load_image` (the CLI,
the demo, calibration files), `as_rgb` (the Python API), the server's upload decoding and calibration
sets; then whole edits through the API, the CLI and HTTP give the displayed size and orientation,
and no output carries a stale orientation tag.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from varedit_deploy.calibration.dataset import load_set
from varedit_deploy.cli import main
from varedit_deploy.imaging import EXIF_ORIENTATION, as_rgb, load_image
from varedit_deploy.runtime.pipeline import EditPipeline
from varedit_deploy.serve.uploads import decode_upload

from test_serve import running

T = Image.Transpose
# What a camera does to the displayed picture to store it with each orientation (the inverse of
# what exif_transpose undoes).
STORED_AS = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
             6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}


@pytest.fixture(scope="module")
def displayed(photos) -> Image.Image:
    """A real, non-square photo as it should be seen: 300 wide, 200 high."""
    return Image.fromarray(photos["coffee"]).resize((300, 200), Image.LANCZOS)


def _stored(displayed: Image.Image, orientation: int, fmt: str) -> bytes:
    """The photo as a camera writes it: pixels turned or mirrored, and the tag that says how to show them."""
    turn = STORED_AS[orientation]
    pixels = displayed if turn is None else displayed.transpose(turn)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    pixels.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _reference(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def _no_stale_tag(img: Image.Image) -> bool:
    return img.getexif().get(EXIF_ORIENTATION, 1) == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_way_in_applies_the_orientation(displayed, tmp_path, orientation):
    png, jpeg = _stored(displayed, orientation, "PNG"), _stored(displayed, orientation, "JPEG")
    assert Image.open(io.BytesIO(png)).size == (displayed.size if orientation < 5 else displayed.size[::-1])
    (tmp_path / "p.png").write_bytes(png)
    (tmp_path / "p.jpg").write_bytes(jpeg)
    loaded = load_image(tmp_path / "p.png")  # lossless: exactly the displayed photo
    assert loaded.size == (300, 200) and np.array_equal(np.asarray(loaded), np.asarray(displayed))
    assert _no_stale_tag(loaded)
    expected = _reference(jpeg)
    for got in (load_image(tmp_path / "p.jpg"), as_rgb(Image.open(tmp_path / "p.jpg")),
                decode_upload(jpeg, 10**6)):
        assert got.size == (300, 200) and np.array_equal(np.asarray(got), expected) and _no_stale_tag(got)
    (tmp_path / "instructions.txt").write_text("make it red\nmake it blue\nadd a hat\nmake it night\n")
    calibration = load_set(tmp_path)
    for pair in calibration.calibration + calibration.held_out:
        assert pair.load().size == (300, 200)


def test_an_unreadable_exif_block_is_no_orientation(displayed, tmp_path):
    jpeg = bytearray(_stored(displayed, 6, "JPEG"))
    at = jpeg.index(b"Exif\0\0")
    jpeg[at + 6:at + 14] = b"XX\0*\xff\xff\xff\xff"  # no byte order, first directory past the end
    (tmp_path / "p.jpg").write_bytes(bytes(jpeg))
    assert load_image(tmp_path / "p.jpg").size == (200, 300)  # as stored, as viewers show it


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return EditPipeline.from_artifacts(tiny_artifact)


def test_the_api_edits_each_orientation_as_displayed(pipe, displayed):
    upright = np.asarray(pipe.edit(displayed, "make it red", seed=4).image)
    assert upright.shape == (200, 300, 3)
    for orientation in range(1, 9):
        result = pipe.edit(Image.open(io.BytesIO(_stored(displayed, orientation, "PNG"))), "make it red", seed=4)
        assert np.array_equal(np.asarray(result.image), upright), orientation


def test_a_phone_portrait_through_the_cli_and_the_server(pipe, photos, tiny_artifact, tmp_path):
    """The issue's photo: stored 512x300 with orientation 6, displayed 300x512."""
    portrait = Image.fromarray(photos["astronaut"]).resize((300, 512), Image.LANCZOS)
    jpeg = _stored(portrait, 6, "JPEG")
    assert Image.open(io.BytesIO(jpeg)).size == (512, 300)
    expected = np.asarray(pipe.edit(Image.fromarray(_reference(jpeg)), "make it red", seed=5).image)
    assert expected.shape == (512, 300, 3)
    (tmp_path / "phone.jpg").write_bytes(jpeg)
    for out in (tmp_path / "out.png", tmp_path / "out.jpg"):
        assert main(["edit", "--artifacts", str(tiny_artifact), "--image", str(tmp_path / "phone.jpg"),
                     "--instruction", "make it red", "--seed", "5", "--out", str(out)]) == 0
        written = Image.open(out)
        assert written.size == (300, 512) and _no_stale_tag(written)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), expected)
    with running(tiny_artifact) as (url, _server):
        reply = httpx.post(f"{url}/v1/images/edits", files={"image": ("phone.jpg", jpeg, "image/jpeg")},
                           data={"prompt": "make it red", "seed": "5"}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["size"] == "300x512"
    got = Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))
    assert np.array_equal(np.asarray(got), expected) and _no_stale_tag(got)
