import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_header
from varedit_deploy.errors import InputError, OutputError
from varedit_deploy.imaging import as_rgb, check_output, load_image, postprocess, preprocess, save_image


def _official_transform(pil: Image.Image, size: int) -> torch.Tensor:
    """infer.py's transform, with torchvision's to_tensor written out in torch."""
    w, h = pil.size
    canvas = Image.new("RGB", (max(w, h), max(w, h)), (255, 255, 255))
    canvas.paste(pil, (0, 0))
    arr = np.array(canvas.resize((size, size), resample=Image.LANCZOS))
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return x.add(x).add(-1)


def _official_post(decoded: torch.Tensor, size) -> Image.Image:
    img = (decoded + 1) / 2
    img = img.permute(0, 2, 3, 1).mul_(255).to(torch.uint8).flip(dims=(3,))  # BGR, as returned
    rgb = Image.fromarray(img[0].numpy()[..., ::-1])
    w, h = size
    return rgb.resize((max(w, h), max(w, h)), resample=Image.LANCZOS).crop((0, 0, w, h))


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
@pytest.mark.parametrize("size", [256, 512])
def test_pre_and_post_processing_equal_the_official_path(photos, name, size):
    pil = Image.fromarray(photos[name])
    ours = preprocess(pil, size)
    assert np.array_equal(ours[0], _official_transform(pil, size).numpy())
    decoded = torch.from_numpy(ours).clamp(-1, 1) * 0.9  # any [-1, 1] image
    got = postprocess(decoded.numpy(), pil.size)
    assert got.size == pil.size
    assert np.array_equal(np.asarray(got), np.asarray(_official_post(decoded, pil.size)))


def test_fixture_source_is_reproduced_exactly(golden):
    from safetensors.numpy import load_file

    expected = load_file(str(golden / "inputs.safetensors"))["source_tensor"]
    assert np.array_equal(preprocess(load_image(golden / "source.png"), expected.shape[-1])[0], expected)


def test_bad_images(tmp_path, photos):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.png")
    gray = Image.fromarray(photos["coffee"][..., 0])
    gray.save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").mode == "RGB"
    rgba = np.dstack([photos["coffee"], np.zeros(photos["coffee"].shape[:2], np.uint8)])
    assert np.asarray(as_rgb(rgba)).min() == 255  # transparent pixels become white, not black
    with pytest.raises(InputError, match="uint8"):
        as_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(OutputError, match="extension"):
        save_image(gray.convert("RGB"), tmp_path / "out.tiff2")
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("size, message", [((15, 300), "is 15x300 px"), ((16, 16), None), ((8192, 16), None),
                                           ((8193, 16), "is 8193x16 px"), ((10000, 10000), "is 10000x10000 px"),
                                           ((20000, 20000), "too large")])
def test_photo_sizes_are_checked_from_the_header_before_decoding(tmp_path, size, message):
    """The files hold a header only: decoding their pixels would fail as truncated, so a size
    error proves the check came first; Pillow's bomb warning is never what the user sees."""
    path = tmp_path / "header.png"
    path.write_bytes(png_header(*size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match=message or "not a readable image"):
            load_image(path)


def test_arrays_from_the_api_get_the_same_limits():
    assert as_rgb(np.zeros((16, 8192, 3), np.uint8)).size == (8192, 16)
    for shape in ((8, 8, 3), (1, 1), (16, 8193)):
        with pytest.raises(InputError, match=f"is {shape[1]}x{shape[0]} px"):
            as_rgb(np.zeros(shape, np.uint8))


def test_output_paths_are_checked_before_any_work(tmp_path):
    assert check_output(tmp_path / "new" / "folders" / "out.JPG") == tmp_path / "new" / "folders" / "out.JPG"
    assert not (tmp_path / "new").exists()  # checked, not created
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path / "dir.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "out.png")


def test_high_bit_depth_grayscale_keeps_its_tones(tmp_path):
    """16-bit PNGs (Pillow mode I;16), 32-bit integer and float images: Pillow's own RGB conversion
    clips them at 255, which turns a 16-bit photo white; they are scaled to 8 bits instead."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    loaded = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert loaded.shape == (64, 64, 3) and (loaded == loaded[..., :1]).all()
    assert np.abs(loaded[..., 0].astype(float) - ramp / 257.0).max() <= 0.5
    fraction = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    assert np.abs(np.asarray(as_rgb(Image.fromarray(fraction)))[..., 0] - fraction * 255).max() <= 0.5
    wide = (np.arange(64 * 64).reshape(64, 64) * 1000).astype(np.int32)  # past 16 bits: stretched to its range
    stretched = np.asarray(as_rgb(Image.fromarray(wide)))[..., 0]
    assert stretched.min() == 0 and stretched.max() == 255 and (np.diff(stretched.ravel().astype(int)) >= 0).all()
