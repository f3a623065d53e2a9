"""Uploaded image bytes -> an RGB photo, safely; a result -> png/jpeg/webp bytes.

The format is recognised from the file's own magic bytes (not its name or content type), and
the pixel count is read from the header and refused before any pixel is decoded, so a small
file that would inflate to gigabytes (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from ..imaging import as_rgb
from .protocol import ApiError

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def sniff_format(data: bytes) -> str | None:
    """png, jpeg or webp from the first bytes of a file; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """The uploaded file as an RGB image, or ApiError 415 (not png/jpeg/webp), 413 (too many pixels), 400."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(415, "'image' is not a png, jpeg or webp file", param="image", code="unsupported_image_format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[PIL_FORMATS[fmt]])  # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise ApiError(413, f"'image' is {w}x{h} = {w * h} pixels; this server takes at most {max_pixels}",
                               param="image", code="image_too_large")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"'image' has more pixels than this server takes ({max_pixels})", param="image",
                       code="image_too_large") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = "Pillow cannot identify it" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ApiError(400, f"'image' is a {fmt} file that cannot be decoded ({reason})", param="image",
                       code="invalid_image") from None
    try:
        return as_rgb(img)
    except InputError as e:
        raise ApiError(400, f"'image': {e}", param="image", code="invalid_image") from None


def encode_image(img: Image.Image, fmt: str, compression: int = 100, size: tuple[int, int] | None = None) -> bytes:
    """The result as `fmt` bytes, resized to `size` (w, h) when asked; compression is jpeg/webp quality."""
    if size is not None and img.size != size:
        img = img.resize(size, resample=Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)  # fast: the bytes go base64 over loopback or a LAN
    else:
        img.save(buf, format=PIL_FORMATS[fmt], quality=compression)
    return buf.getvalue()
