"""The Ray Serve deployment on loopback: two CPU replicas behind Ray's proxy, same API (needs [cluster])."""

import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve", reason="the Ray Serve deployment needs the [cluster] extra")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_replicas_serve_the_same_api(tiny_artifact, photos):
    import ray
    from ray import serve

    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.serve.ray_app import app_builder

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder({"artifacts": str(tiny_artifact), "replicas": "2"}), name="varedit", route_prefix="/")
        status = serve.status().applications["varedit"].deployments["varedit"]
        assert status.replica_states.get("RUNNING") == 2
        url = f"http://127.0.0.1:{port}"
        buf = io.BytesIO()
        Image.fromarray(photos["chelsea"][::2, ::2]).save(buf, format="PNG")

        def edit(seed: int) -> httpx.Response:
            return httpx.post(f"{url}/v1/images/edits", files={"image": ("c.png", buf.getvalue(), "image/png")},
                              data={"prompt": "make the cat blue", "seed": str(seed)}, timeout=120)

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(edit, range(4)))
        assert [r.status_code for r in responses] == [200] * 4
        pipe = EditPipeline.from_artifacts(tiny_artifact)
        ref = pipe.edit(Image.open(io.BytesIO(buf.getvalue())), "make the cat blue", seed=2)
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(responses[2].json()["data"][0]["b64_json"]))))
        assert np.array_equal(got, np.asarray(ref.image))
        bad = httpx.post(f"{url}/v1/images/edits", files={"image": ("x.png", b"not an image", "image/png")},
                         data={"prompt": "x"}, timeout=60)
        assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_image_format"
        assert httpx.get(f"{url}/ready", timeout=30).status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()
