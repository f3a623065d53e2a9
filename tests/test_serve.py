"""The server on loopback, over real HTTP: the openai client, streaming, errors, limits, load and shutdown."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from varedit_deploy.runtime.pipeline import EditPipeline
from varedit_deploy.serve.options import ServeOptions
from varedit_deploy.serve.server import make_server, run

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float = 120.0) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become ready")


@contextlib.contextmanager
def running(artifacts, **options):
    """A real server (uvicorn) on a free loopback port, in a thread; yields its base URL and the server."""
    port = _free_port()
    server = make_server(ServeOptions(str(artifacts), port=port, **options), log_level="warning")
    thread = threading.Thread(target=run, args=(server,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url)
        yield url, server
    finally:
        server.should_exit = True
        thread.join(60)


def _png(photo: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    return buf.getvalue()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


@pytest.fixture(scope="module")
def photo(photos) -> bytes:
    return _png(photos["chelsea"][::2, ::2])  # 226x150


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with running(tiny_artifact, api_key=KEY, max_batch=4) as (url, _):
        yield url


def test_openai_client_edits_unchanged_and_bit_identical_to_the_pipeline(server, tiny_artifact, photo):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["varedit-tiny-2b"]
    result = client.images.edit(image=("cat.png", photo, "image/png"), prompt="make the cat blue", n=2,
                                extra_body={"seed": 11, "cfg": 2.5, "tau": 0.8})
    assert len(result.data) == 2 and result.size == "226x150" and result.output_format == "png"
    assert result.usage.input_tokens_details.image_tokens == 256
    pipe = EditPipeline.from_artifacts(tiny_artifact)
    src = Image.open(io.BytesIO(photo))
    for i, item in enumerate(result.data):  # n images = consecutive seeds; a batch of 2 ran in one edit_batch
        ref = pipe.edit(src, "make the cat blue", cfg=2.5, tau=0.8, seed=11 + i)
        assert np.array_equal(_decode(item.b64_json), np.asarray(ref.image))
    # both edits went to the pipeline in one edit_batch call: one batch of size 2
    bucket = 'varedit_batch_size_bucket{{le="{}"}}'
    assert _metric(server, bucket.format("2.0")) - _metric(server, bucket.format("1.0")) >= 1


def test_stream_sends_partial_images_then_the_completed_one(server, photo):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    events = list(client.images.edit(image=("cat.png", photo, "image/png"), prompt="make the cat blue", stream=True,
                                     partial_images=2, size="120x80", output_format="jpeg", output_compression=80))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(e.size == "120x80" and e.output_format == "jpeg" for e in events)
    assert _decode(events[-1].b64_json).shape == (80, 120, 3)
    assert _metric(server, "varedit_stage_seconds_count{stage=\"preview\"}") >= 2


def _post(url, photo=None, key=KEY, **fields) -> httpx.Response:
    files = {"image": ("x.png", photo, "image/png")} if photo is not None else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/images/edits", files=files, data=fields, headers=headers, timeout=60)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height with a tiny (truncated) body: never decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def error_cases(photo: bytes) -> list[tuple[dict, int, str, str | None]]:
    """Bad requests (fields of `_post`) and what each gets: status, error code, the parameter named."""
    return [
        (dict(photo=photo, key=None, prompt="x"), 401, "invalid_api_key", None),
        (dict(photo=photo, key="wrong", prompt="x"), 401, "invalid_api_key", None),
        (dict(photo=photo, prompt="x", n="11"), 400, "invalid_value", "n"),
        (dict(photo=photo, prompt="x", tau="0"), 400, "invalid_value", "tau"),
        (dict(photo=photo, prompt="x", cfg="25"), 400, "invalid_value", "cfg"),  # past the model's range: not a 500
        (dict(photo=photo, prompt="x", size="big"), 400, "invalid_value", "size"),
        (dict(photo=photo, prompt="x", response_format="url"), 400, "invalid_value", "response_format"),
        (dict(photo=photo, prompt="x", mask="m"), 400, "unknown_parameter", "mask"),
        (dict(photo=photo, prompt="x", stream="true", n="2"), 400, "invalid_value", "n"),
        (dict(photo=photo, prompt="  "), 400, "missing_required_parameter", "prompt"),
        (dict(photo=photo, prompt="word " * 600), 400, "invalid_value", "prompt"),
        (dict(photo=photo, prompt="x", model="gpt-image-1"), 404, "model_not_found", "model"),
        (dict(photo=b"GIF89a not this", prompt="x"), 415, "unsupported_image_format", "image"),
        (dict(photo=b"\x89PNG\r\n\x1a\n broken", prompt="x"), 400, "invalid_image", "image"),
        (dict(photo=_bomb_png(50000, 50000), prompt="x"), 413, "image_too_large", "image"),
        (dict(photo=b"\xff\xd8\xff" + b"\0" * (21 * 2**20), prompt="x"), 413, "request_too_large", None),
    ]


def test_errors_have_openai_shape_and_status(server, photo):
    for kwargs, status, code, param in error_cases(photo):
        r = _post(server, **kwargs)
        assert r.status_code == status, (kwargs.get("prompt", "")[:20], r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert (error["code"], error["param"]) == (code, param), r.text
    r = httpx.post(f"{server}/v1/images/edits", files={"prompt": (None, "x"), "image": (None, "/etc/passwd")},
                   headers={"Authorization": f"Bearer {KEY}"})  # a path (or URL) as text: never opened
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(f"{server}/v1/images/edits", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_type"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}  # probes need no key
    assert "access-control-allow-origin" not in httpx.get(f"{server}/health", headers={"Origin": "http://x"}).headers
    r = httpx.post(f"{server}/v1/images/edits", content=b"--x\r\ngarbage", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data"})  # no boundary
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_multipart"
    r = httpx.put(f"{server}/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert _metric(server, 'varedit_errors_total{code="invalid_api_key",status="401"}') == 3
    # refused by its Content-Length before the app: counted like every other error
    assert _metric(server, 'varedit_errors_total{code="request_too_large",status="413"}') == 1
    assert _post(server, photo, prompt="still fine", seed="1").status_code == 200  # the worker survived them all


def test_caches_count_hits_in_metrics(server, photo):
    before = _metric(server, 'varedit_cache_hits_total{cache="image"}')
    text_before = _metric(server, 'varedit_cache_hits_total{cache="text"}')
    for _ in range(2):
        r = _post(server, photo, prompt="a cached instruction")
        assert r.status_code == 200
        timing = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
        assert set(timing) == {"queue", "worker", "edit"} and float(timing["queue"]) >= 0
        assert float(timing["worker"]) >= float(timing["edit"]) > 0
    assert _metric(server, 'varedit_cache_hits_total{cache="image"}') >= before + 1
    assert _metric(server, 'varedit_cache_hits_total{cache="text"}') >= text_before + 1


def _open_edit(url: str, photo: bytes, **fields) -> socket.socket:
    """Send an edit request on a raw socket and leave it waiting (closing the socket is a disconnect)."""
    request = httpx.Request("POST", f"{url}/v1/images/edits", files={"image": ("x.png", photo, "image/png")},
                            data=fields)
    body = request.read()
    head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: {request.url.netloc.decode()}\r\n"
            f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n")
    sock = socket.create_connection((request.url.host, request.url.port))
    sock.sendall(head.encode() + body)
    return sock


def _wait_metric(url: str, name: str, at_least: float, timeout: float = 60.0) -> float:
    until = time.monotonic() + timeout
    while (value := _metric(url, name)) < at_least and time.monotonic() < until:
        time.sleep(0.02)
    return value


def test_full_queue_answers_429_with_retry_after_and_disconnects_cancel(tiny_artifact, photo):
    with running(tiny_artifact, max_queue=10) as (url, _):
        waiting = _open_edit(url, photo, prompt="ten edits", n="10")  # one runs, nine wait
        assert _wait_metric(url, "varedit_queue_depth", 8) >= 8
        r = _post(url, photo, prompt="two more", n="2")
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
        waiting.close()  # the client goes away: queued edits are dropped, the running one stops between scales
        assert _wait_metric(url, 'varedit_edits_total{outcome="cancelled"}', 9) >= 9
        assert _metric(url, "varedit_queue_depth") == 0
        assert _post(url, photo, prompt="after the storm").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 200


def test_deadline_504_draining_503_and_cors_only_when_asked(tiny_artifact, photo):
    with running(tiny_artifact, timeout_s=0.001, cors_origins=("http://app.example",)) as (url, server):
        r = _post(url, photo, prompt="too slow for this server")
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert _metric(url, 'varedit_edits_total{outcome="deadline"}') == 1
        preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
        r = httpx.options(f"{url}/v1/images/edits", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(f"{url}/v1/images/edits", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        server.state.drain()  # what SIGTERM does first: the probe fails, new edits are refused
        assert httpx.get(f"{url}/ready").status_code == 503
        r = _post(url, photo, prompt="too late")
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]


def test_sigterm_finishes_in_flight_refuses_new_and_exits_0(tiny_artifact, photo):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "varedit_deploy.cli", "serve", "--artifacts", str(tiny_artifact),
                             "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(url)
        results: dict = {}
        in_flight = threading.Thread(target=lambda: results.setdefault("r", _post(url, photo, prompt="x", n="3")))
        in_flight.start()
        assert _wait_metric(url, "varedit_queue_depth", 1) >= 1  # accepted: one edit runs, two wait
        proc.send_signal(signal.SIGTERM)
        in_flight.join(60)
        assert results["r"].status_code == 200 and len(results["r"].json()["data"]) == 3
        assert proc.wait(60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "Traceback" not in out, out


def test_bad_artifact_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "varedit_deploy.cli", "serve", "--artifacts", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_server_imports_no_torch():
    code = ("import sys, varedit_deploy.serve.server, varedit_deploy.serve.app, varedit_deploy.serve.state; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_events_are_valid_json_lines(server, photo):
    """Raw SSE framing, as a non-openai client (curl, a browser EventSource) sees it."""
    r = _post(server, photo, prompt="make it red", stream="true", partial_images="1")
    blocks = [b for b in r.text.split("\n\n") if b]
    assert r.headers["content-type"].startswith("text/event-stream") and len(blocks) == 2
    for block, kind in zip(blocks, ["image_edit.partial_image", "image_edit.completed"]):
        event, data = block.split("\n")
        assert event == f"event: {kind}" and json.loads(data.removeprefix("data: "))["type"] == kind
    completed = json.loads(blocks[-1].split("\n")[1].removeprefix("data: "))
    timing = dict(p.strip().split(";dur=") for p in completed["server_timing"].split(","))  # the header, sent late
    assert set(timing) == {"queue", "worker", "edit"} and float(timing["worker"]) >= float(timing["edit"]) > 0
