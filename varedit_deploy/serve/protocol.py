"""The OpenAI Images API wire format: the images/edits form, its checks, responses and errors.

Field names, limits and shapes follow OpenAI's reference (images/edits, its streaming events
and the error object); `cfg`, `tau` and `seed` are this server's extensions. Every check names
the field (`param`) it refused, and nothing here touches a tensor.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from ..config import check_sampling_option
from ..errors import ConfigError

OUTPUT_FORMATS = ("png", "jpeg", "webp")
QUALITIES = ("auto", "low", "medium", "high")
MAX_IMAGES = 10
MAX_PROMPT_CHARS = 32000
IGNORED = ("user", "safety_identifier", "input_fidelity")  # accepted and not used, as OpenAI's models that lack them do


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class EditForm:
    """A checked images/edits request, less its image (the upload is read and decoded apart)."""

    prompt: str
    model: str | None = None
    n: int = 1
    size: tuple[int, int] | None = None  # None: "auto", the source photo's size
    output_format: str = "png"
    output_compression: int = 100
    stream: bool = False
    partial_images: int = 0
    quality: str = "auto"
    background: str = "auto"
    cfg: float | None = None
    tau: float | None = None
    seed: int | None = None


def parse_edit_form(fields: dict[str, list[Any]], max_output_side: int) -> tuple[EditForm, Any]:
    """Multipart fields (name -> values; text fields are str, files anything else) -> (the form, the image
    upload), or ApiError(400) naming the field."""
    known = {"image", "image[]", "prompt", "model", "n", "size", "response_format", "output_format",
             "output_compression", "stream", "partial_images", "quality", "background", "cfg", "tau", "seed",
             *IGNORED}
    for name in fields:
        if name not in known:
            raise bad_field(name, f"unknown parameter {name!r}", "unknown_parameter")
    images = fields.get("image", []) + fields.get("image[]", [])
    if not images:
        raise bad_field("image", "'image' is required: upload one png, jpeg or webp file", "missing_required_parameter")
    if len(images) > 1:
        raise bad_field("image", f"this model edits one image per request; got {len(images)}")
    if isinstance(images[0], str):
        raise bad_field("image", "'image' must be an uploaded file (multipart file part), not a string; "
                                 "this server reads no paths or URLs")
    one = {name: _single(name, values) for name, values in fields.items() if not name.startswith("image")}
    prompt = one.get("prompt")
    if prompt is None or not prompt.strip():
        raise bad_field("prompt", "'prompt' is required: say what to change, e.g. 'make the sky purple'",
                        "missing_required_parameter")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad_field("prompt", f"'prompt' is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if one.get("response_format", "b64_json") != "b64_json":
        raise bad_field("response_format", "only response_format=b64_json is supported (this server hosts no URLs)")
    background = _choice(one, "background", ("auto", "opaque"), "auto")
    stream = _bool(one, "stream", False)
    n = _int(one, "n", 1, MAX_IMAGES, 1)
    partial_images = _int(one, "partial_images", 0, 3, 0)
    if stream and n != 1:
        raise bad_field("n", "stream=true returns one image; use n=1 (or several requests)")
    return EditForm(
        prompt=prompt, model=one.get("model"), n=n, size=_size(one.get("size"), max_output_side),
        output_format=_choice(one, "output_format", OUTPUT_FORMATS, "png"),
        output_compression=_int(one, "output_compression", 0, 100, 100), stream=stream,
        partial_images=partial_images, quality=_choice(one, "quality", QUALITIES, "auto"), background=background,
        cfg=_sampling_option(one, "cfg"), tau=_sampling_option(one, "tau"),
        seed=_int(one, "seed", 0, 2**63 - 1 - MAX_IMAGES, None),
    ), images[0]


def _single(name: str, values: list[Any]) -> str:
    if len(values) != 1:
        raise bad_field(name, f"{name!r} was given {len(values)} times; give it once")
    if not isinstance(values[0], str):
        raise bad_field(name, f"{name!r} must be a text field, not a file")
    return values[0]


def _int(one: dict[str, str], name: str, lo: int, hi: int, default: int | None) -> int | None:
    if name not in one:
        return default
    try:
        value = int(one[name].strip())
    except ValueError:
        raise bad_field(name, f"{name!r} must be an integer, got {one[name]!r}") from None
    if not lo <= value <= hi:
        raise bad_field(name, f"{name!r} must be between {lo} and {hi}, got {value}")
    return value


def _sampling_option(one: dict[str, str], name: str) -> float | None:
    """cfg or tau, in the range the model's sampling settings take (`config.SAMPLING_RANGES`)."""
    if name not in one:
        return None
    try:
        value = float(one[name].strip())
    except ValueError:
        raise bad_field(name, f"{name!r} must be a number, got {one[name]!r}") from None
    try:
        return check_sampling_option(name, value)
    except ConfigError as e:
        raise bad_field(name, str(e)) from None


def _bool(one: dict[str, str], name: str, default: bool) -> bool:
    value = one.get(name)
    if value is None:
        return default
    if value.strip().lower() not in ("true", "false", "1", "0"):
        raise bad_field(name, f"{name!r} must be true or false, got {value!r}")
    return value.strip().lower() in ("true", "1")


def _choice(one: dict[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = one.get(name, default)
    if value not in choices:
        raise bad_field(name, f"{name!r} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _size(value: str | None, max_side: int) -> tuple[int, int] | None:
    if value is None or value == "auto":
        return None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value)
    if not m or not all(1 <= int(v) <= max_side for v in m.groups()):
        raise bad_field("size", f"'size' must be 'auto' or WIDTHxHEIGHT with sides 1..{max_side}, got {value!r}")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------ responses
def usage(prompt_tokens: int, image_tokens: int, output_tokens: int) -> dict[str, Any]:
    """Token accounting in OpenAI's shape: instruction and source-image tokens in, generated tokens out."""
    return {"input_tokens": prompt_tokens + image_tokens,
            "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": image_tokens},
            "output_tokens": output_tokens, "total_tokens": prompt_tokens + image_tokens + output_tokens}


def images_response(form: EditForm, images_b64: list[str], size: tuple[int, int], use: dict[str, Any]) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in images_b64],
            "background": "opaque", "output_format": form.output_format, "quality": form.quality,
            "size": f"{size[0]}x{size[1]}", "usage": use}


def stream_event(form: EditForm, b64: str, size: tuple[int, int], partial_index: int | None = None,
                 use: dict[str, Any] | None = None, server_timing: str | None = None) -> bytes:
    """One Server-Sent Event: image_edit.partial_image (with its index) or image_edit.completed. The
    completed one also carries `server_timing`, the Server-Timing value a stream cannot send as a
    header (its headers leave before the edit runs)."""
    kind = "image_edit.completed" if partial_index is None else "image_edit.partial_image"
    data: dict[str, Any] = {"type": kind, "b64_json": b64, "created_at": int(time.time()),
                            "size": f"{size[0]}x{size[1]}", "quality": form.quality, "background": form.background,
                            "output_format": form.output_format}
    if partial_index is None:
        data["usage"] = use
        if server_timing is not None:
            data["server_timing"] = server_timing
    else:
        data["partial_image_index"] = partial_index
    return sse(kind, data)


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
