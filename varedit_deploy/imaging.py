"""The official pre- and post-processing of photos (docs/spec/vae-text.md 2.1, 3.1); numpy + Pillow only.

Pre: paste top-left on a white square of side max(w, h), LANCZOS to the model size, [-1, 1].
Post: (x + 1) / 2 * 255 truncated to uint8, LANCZOS back to the square side, crop to (w, h).
Lanczos has no ONNX form, so this always runs on the host, for every backend.
A photo is taken the way it is displayed: its EXIF orientation (how phones store portraits) is
applied on load, as viewers, browsers, diffusers' `load_image` and OpenAI's API do.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, OutputError
from .fileio import atomic_path, check_writable

# Photo sizes we accept (README "Limits"). The model sees the photo at 256-1024 px; the result
# is resized back to the source size, on a square canvas of the longer side.
MIN_SIDE = 16  # px, the 2B VAE's patch: a smaller side carries no picture at the model's scale
MAX_SIDE = 8192  # px: bounds the result canvas to 8192^2 (200 MB of RGB); checked before decoding
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
# The photo shipped with the package (assets/README.md says where it is from): the demo's default,
# and a real photo for calibration and preview fitting wherever no other is given.
SAMPLE_PHOTO = Path(__file__).parent / "assets" / "sample.jpg"


def load_image(path: str | Path) -> Image.Image:
    """Open a photo as RGB, with a clear error for missing, unreadable, non-image or out-of-range
    files; the size is checked from the header, before any pixel is decoded."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"image {path} is a folder; give a photo file")
    if not path.is_file():
        raise InputError(f"image {path}: no such file")
    try:
        with warnings.catch_warnings():  # our size limit is far below Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError:
        raise InputError(f"image {path}: too large; {_limits()}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"image {path}: not a readable image ({e})") from None
    with img:
        check_size(img.size, str(path))
        try:
            img.load()
            return _to_rgb(img, str(path))
        except (OSError, ValueError) as e:
            raise InputError(f"image {path}: not a readable image ({e})") from None


def _limits() -> str:
    return f"photos must be {MIN_SIDE} to {MAX_SIDE} px on each side"


def check_size(size: tuple[int, int], name: str) -> None:
    w, h = size
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE:
        raise InputError(f"image {name} is {w}x{h} px; {_limits()}")


def check_output(path: str | Path) -> Path:
    """Refuse an output image path before any work: a known extension, not a folder, writable."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise OutputError(f"output {path}: unknown image extension {path.suffix.lower()!r}; "
                          f"use one of {', '.join(OUTPUT_FORMATS)}")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name such as {path / 'edited.png'}")
    check_writable(path, "output")
    return path


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale (I;16*, I, F) as 8-bit L: Pillow's own conversion clips them at 255
    (a 16-bit photo turns white). Integers in 0..65535 are 16-bit samples (x 255/65535), floats in
    0..1 are fractions; anything else is stretched from its minimum to its maximum."""
    values = np.asarray(img, dtype=np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode != "F" and lo >= 0 and hi <= 65535:
        scaled = values / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


EXIF_ORIENTATION = 0x0112  # 1: as stored; 2-8: mirrored and/or turned (a phone portrait is 6)


def upright(img: Image.Image) -> Image.Image:
    """The photo as displayed: its EXIF orientation applied and the tag dropped (`ImageOps.exif_transpose`).
    An unreadable EXIF block counts as no orientation, as in viewers."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for a malformed EXIF block; it is only metadata
        return img
    if orientation not in range(2, 9):
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    check_size(img.size, name)
    img = upright(img)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white, like the white padding canvas, instead of dropping alpha to black.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Accept a PIL image or an HxWx3 / HxW uint8 array from API callers."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InputError(f"image array must be uint8 HxW, HxWx3 or HxWx4, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    return _to_rgb(image, "<array>")


def pad_to_square(img: Image.Image) -> Image.Image:
    side = max(img.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(img, (0, 0))
    return canvas


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """RGB photo -> [1, 3, size, size] float32 in [-1, 1], as infer.py's transform."""
    square = pad_to_square(img).resize((size, size), resample=Image.LANCZOS)
    x = np.asarray(square, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((x + x - np.float32(1.0))[None])


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """Decoder output [1, 3, S, S] in [-1, 1] -> [S, S, 3] uint8 RGB (truncation, as official)."""
    x = (decoded[0].astype(np.float32) + np.float32(1.0)) / np.float32(2.0)
    return (x.transpose(1, 2, 0) * np.float32(255.0)).astype(np.uint8)


def postprocess(decoded: np.ndarray, original_size: tuple[int, int]) -> Image.Image:
    """Decoder output -> RGB image of the source photo's size (resize back, crop the padding)."""
    w, h = original_size
    side = max(w, h)
    img = Image.fromarray(to_uint8(decoded)).resize((side, side), resample=Image.LANCZOS)
    return img.crop((0, 0, w, h))


def save_image(img: Image.Image, path: str | Path) -> Path:
    """Write atomically: a reader never sees a half-written file."""
    path = check_output(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=OUTPUT_FORMATS[path.suffix.lower()])
    return path
