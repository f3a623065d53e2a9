"""The Ray Serve deployment on loopback (the [cluster] extra, which CI installs): two CPU replicas behind
Ray's proxy serve the same API as `varedit-deploy serve`; a replica killed with SIGKILL mid-load loses no
request (the official openai client retries what the dead replica held); autoscaling goes from 1 to 2
replicas under load and back to 1 when it stops. One local Ray instance, on 127.0.0.1 without its
dashboard, serves the three tests; every wait is bounded."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve", reason="the Ray Serve deployment needs the [cluster] extra")

pytestmark = pytest.mark.slow
APP = "varedit"  # the application's name; its one deployment is also called varedit (ray_app.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance and Serve's HTTP proxy, both on loopback; torn down after the module."""
    import ray
    from ray import serve

    # Ray's processes inherit this environment: no usage report, and load reported every 0.5 s (not 10 s) so
    # that autoscaling sees it within the test's bounds.
    saved = dict(os.environ)
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S="0.5",
                      RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S="0.5")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def running(bound):
    """`bound` deployed as the application (serve.run returns once every replica is loaded and warm)."""
    from ray import serve

    serve.run(bound, name=APP, route_prefix="/")
    try:
        yield
    finally:
        serve.delete(APP)


def _replicas() -> int:
    from ray import serve

    return serve.status().applications[APP].deployments[APP].replica_states.get("RUNNING", 0)


def _replica_pids() -> list[int]:
    """The replica processes of this test's own Ray instance (its raylet is our child): Ray titles them
    ray::ServeReplica:<app>:<deployment>."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if f"ServeReplica:{APP}:{APP}" in " ".join(proc.cmdline()):
                found.append(proc.pid)
    return found


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition` holds; fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.25)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def photo(photos) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photos["chelsea"][::2, ::2]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    from varedit_deploy.runtime.pipeline import EditPipeline

    return EditPipeline.from_artifacts(tiny_artifact)


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _edit(url: str, photo: bytes, seed: int, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/edits", files={"image": ("c.png", photo, "image/png")},
                      data={"prompt": "make the cat blue", "seed": str(seed), **fields}, timeout=120)


def test_two_cpu_replicas_serve_the_same_api(cluster, tiny_artifact, photo, pipe):
    import openai

    from varedit_deploy.serve.ray_app import app_builder

    with running(app_builder({"artifacts": str(tiny_artifact), "replicas": "2"})):
        assert _replicas() == 2 and len(_replica_pids()) == 2
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda seed: _edit(cluster, photo, seed), range(4)))
        assert [r.status_code for r in responses] == [200] * 4
        ref = pipe.edit(Image.open(io.BytesIO(photo)), "make the cat blue", seed=2)
        assert np.array_equal(_image(responses[2].json()["data"][0]["b64_json"]), np.asarray(ref.image))
        client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0, timeout=120)
        events = list(client.images.edit(image=("c.png", photo, "image/png"), prompt="make the cat blue",
                                         stream=True, partial_images=2, extra_body={"seed": 2}))
        assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
        assert np.array_equal(_image(events[-1].b64_json), np.asarray(ref.image))
        bad = httpx.post(f"{cluster}/v1/images/edits", files={"image": ("x.png", b"not an image", "image/png")},
                         data={"prompt": "x"}, timeout=60)
        assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_image_format"
        assert httpx.get(f"{cluster}/ready", timeout=30).status_code == 200


class _Recording(httpx.HTTPTransport):
    """Notes every attempt the client makes: its status, or the connection error it met."""

    def __init__(self, attempts: list):
        super().__init__()
        self.attempts = attempts

    def handle_request(self, request):
        try:
            response = super().handle_request(request)
        except httpx.TransportError as e:
            self.attempts.append(type(e).__name__)
            raise
        self.attempts.append(response.status_code)
        return response


def test_a_replica_killed_mid_load_loses_no_request(cluster, tiny_artifact, photo, pipe):
    """SIGKILL one of two replicas once the first answer is back (the others are queued or running on
    both): every request is answered, those the dead replica held after the client's retries, and Ray
    starts a replacement."""
    import openai

    from varedit_deploy.serve.ray_app import app_builder

    requests = 10
    with running(app_builder({"artifacts": str(tiny_artifact), "replicas": "2"})):
        victim = _replica_pids()[0]
        attempts: list = []
        client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=4, timeout=120,
                               http_client=httpx.Client(transport=_Recording(attempts), timeout=120))
        first = threading.Event()

        def edit(seed: int):
            result = client.images.edit(image=("c.png", photo, "image/png"), prompt="make the cat blue",
                                        extra_body={"seed": seed})
            first.set()
            return result

        with ThreadPoolExecutor(requests) as pool:
            futures = [pool.submit(edit, seed) for seed in range(requests)]
            assert first.wait(180), "no answer within 180 s"
            os.kill(victim, signal.SIGKILL)
            results = [f.result(timeout=300) for f in futures]
        failed = [a for a in attempts if a != 200]
        assert failed, f"the killed replica held no request (attempts: {attempts})"
        assert attempts.count(200) == requests and len(attempts) == requests + len(failed)
        src = Image.open(io.BytesIO(photo))
        for seed in (0, requests - 1):
            expected = pipe.edit(src, "make the cat blue", seed=seed).image
            assert np.array_equal(_image(results[seed].data[0].b64_json), np.asarray(expected))
        _wait_for(lambda: _replicas() == 2 and victim not in _replica_pids(), 180, "a replacement replica")
    print(f"killed replica: {len(failed)} failed attempts ({sorted(set(map(str, failed)))}), all retried to 200")


def test_autoscaling_goes_from_one_replica_to_two_under_load_and_back(cluster, tiny_artifact, photo):
    from varedit_deploy.serve.options import ServeOptions
    from varedit_deploy.serve.ray_app import deployment

    times = {"upscale_delay_s": 1.0, "downscale_delay_s": 2.0, "look_back_period_s": 10.5}
    bound = deployment(ServeOptions(str(tiny_artifact)), replicas=1, max_replicas=2, target_ongoing_requests=1,
                       times=times)
    with running(bound):
        assert _replicas() == 1
        stop, statuses = threading.Event(), []

        def load(worker: int) -> None:
            seed = worker * 1000
            while not stop.is_set():
                statuses.append(_edit(cluster, photo, seed).status_code)
                seed += 1

        clients = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for thread in clients:
            thread.start()
        try:
            up = _wait_for(lambda: _replicas() == 2, 240, "a second replica under load")
        finally:
            stop.set()
            for thread in clients:
                thread.join(180)
        down = _wait_for(lambda: _replicas() == 1, 180, "back to one replica after the load")
        assert statuses and set(statuses) == {200}
    print(f"autoscaling: 2 replicas {up:.1f} s after the load began, 1 again {down:.1f} s after it ended "
          f"({len(statuses)} requests, all 200)")


def test_autoscaling_times_need_autoscaling_and_known_names():
    from varedit_deploy.serve.ray_app import app_builder

    with pytest.raises(ValueError, match="give max_replicas too"):
        app_builder({"artifacts": "art", "upscale_delay_s": "1"})
    with pytest.raises(ValueError, match=r"unknown arguments \['upscale_delay'\]"):
        app_builder({"artifacts": "art", "max_replicas": "2", "upscale_delay": "1"})
    app_builder({"artifacts": "art", "max_replicas": "2", "upscale_delay_s": "1", "downscale_delay_s": "5"})
