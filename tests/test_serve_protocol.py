"""The wire format without a server: field checks (also on arbitrary input), uploads and encodings."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from varedit_deploy.serve.protocol import ApiError, parse_edit_form, stream_event, usage
from varedit_deploy.serve.uploads import decode_upload, encode_image, sniff_format

FILE = object()  # stands for an uploaded file part


def _fields(**text):
    return {"image": [FILE], **{k: [v] for k, v in text.items()}}


def test_every_listed_field_is_read():
    form, upload = parse_edit_form(_fields(
        prompt="make it red", model="varedit-tiny-2b", n="3", size="640x480", response_format="b64_json",
        output_format="webp", output_compression="70", stream="false", partial_images="2", quality="high",
        background="opaque", cfg="2.5", tau="0.7", seed="42", user="u1"), max_output_side=4096)
    assert upload is FILE
    assert (form.prompt, form.model, form.n, form.size, form.output_format, form.output_compression) == (
        "make it red", "varedit-tiny-2b", 3, (640, 480), "webp", 70)
    assert (form.stream, form.partial_images, form.quality, form.background, form.cfg, form.tau, form.seed) == (
        False, 2, "high", "opaque", 2.5, 0.7, 42)
    defaults, _ = parse_edit_form(_fields(prompt="x"), 4096)
    assert (defaults.n, defaults.size, defaults.output_format, defaults.stream, defaults.seed) == (1, None, "png",
                                                                                                  False, None)


@pytest.mark.parametrize("fields, param", [
    ({"prompt": ["x"]}, "image"),
    ({"image": [FILE, FILE], "prompt": ["x"]}, "image"),
    ({"image": ["https://example.com/a.png"], "prompt": ["x"]}, "image"),
    (_fields(prompt="x", n="1.5"), "n"),
    (_fields(prompt="x", size="0x10"), "size"),
    (_fields(prompt="x", size="640x480", model="m", background="transparent"), "background"),
    (_fields(prompt="x", cfg="nan"), "cfg"),
    (_fields(prompt="x", cfg="25"), "cfg"),  # the model's sampling ranges, not a wider one of the form's
    (_fields(prompt="x", cfg="-1"), "cfg"),
    (_fields(prompt="x", tau="50"), "tau"),
    (_fields(prompt="x", tau="0.0001"), "tau"),
    (_fields(prompt="x", seed="-1"), "seed"),
    (_fields(prompt="x", stream="yes"), "stream"),
    (_fields(prompt="x", partial_images="4"), "partial_images"),
    ({"image": [FILE], "prompt": ["a", "b"]}, "prompt"),
    ({"image": [FILE], "prompt": [FILE]}, "prompt"),
])
def test_bad_fields_are_400_naming_the_field(fields, param):
    with pytest.raises(ApiError) as e:
        parse_edit_form(fields, 4096)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["type"] == "invalid_request_error"


NAMES = st.sampled_from(["prompt", "n", "size", "stream", "partial_images", "cfg", "tau", "seed", "output_format",
                         "output_compression", "quality", "background", "model", "response_format", "junk"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(NAMES, st.lists(st.text(max_size=12), min_size=1, max_size=2), max_size=8))
def test_any_text_fields_give_a_form_or_a_400_never_a_crash(fields):
    try:
        form, _ = parse_edit_form({"image": [FILE], **fields}, 4096)
    except ApiError as e:
        assert e.status == 400 and (e.param in fields or e.param == "prompt")
    else:
        assert form.prompt.strip() and 1 <= form.n <= 10 and 0 <= form.partial_images <= 3


def _encoded(fmt: str, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 10, 10, 128)[: len(mode)]).save(buf, format=fmt)
    return buf.getvalue()


def test_uploads_are_recognised_by_their_bytes_and_checked_before_decoding():
    assert [sniff_format(_encoded(f)) for f in ("PNG", "JPEG", "WEBP")] == ["png", "jpeg", "webp"]
    assert sniff_format(_encoded("GIF")) is None and sniff_format(b"") is None
    rgba = decode_upload(_encoded("PNG", mode="RGBA"), max_pixels=10_000)
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) != (200, 10, 10)  # alpha composited on white
    with pytest.raises(ApiError) as e:
        decode_upload(_encoded("PNG", size=(200, 100)), max_pixels=19_999)
    assert (e.value.status, e.value.code) == (413, "image_too_large")
    with pytest.raises(ApiError) as e:
        decode_upload(_encoded("BMP"), max_pixels=10_000)
    assert (e.value.status, e.value.code) == (415, "unsupported_image_format")
    with pytest.raises(ApiError) as e:
        decode_upload(_encoded("JPEG")[:40], max_pixels=10_000)
    assert (e.value.status, e.value.code) == (400, "invalid_image")


def test_results_are_encoded_in_the_asked_format_size_and_quality():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    for fmt in ("png", "jpeg", "webp"):
        out = Image.open(io.BytesIO(encode_image(img, fmt, 90, size=(40, 30))))
        assert out.format.lower() == fmt and out.size == (40, 30)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(img, "png")))), np.asarray(img))
    assert len(encode_image(img, "jpeg", 20)) < len(encode_image(img, "jpeg", 95))


def test_usage_and_events_follow_openai():
    use = usage(5, 256, 1042)
    assert use["input_tokens"] == 261 and use["total_tokens"] == 1303
    form, _ = parse_edit_form(_fields(prompt="x", stream="true", partial_images="1"), 4096)
    partial = stream_event(form, "AAAA", (3, 2), partial_index=0).decode()
    assert partial.startswith("event: image_edit.partial_image\ndata: {") and partial.endswith("\n\n")
    assert '"partial_image_index":0' in partial and '"size":"3x2"' in partial
    assert '"usage":{' in stream_event(form, "AAAA", (3, 2), use=use).decode()
