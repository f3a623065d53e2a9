"""The playground page in a real browser (Chromium driven by Playwright) against a real server on loopback.

CI installs the distribution's Chromium and the [browser] extra and sets VAREDIT_BROWSER_TESTS=required,
which turns a missing browser into a failure; elsewhere the test skips, saying what is missing.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve import running

from varedit_deploy.imaging import SAMPLE_PHOTO
from varedit_deploy.runtime.pipeline import EditPipeline

KEY = "page-key"
# Records every blob the page makes an object URL of (the page revokes old URLs; the blobs stay here),
# and every src the result image takes, in order, with what the page says it is.
RECORDER = """() => {
  window.blobs = new Map();
  const make = URL.createObjectURL;
  URL.createObjectURL = (blob) => { const url = make(blob); window.blobs.set(url, blob); return url; };
  window.shown = [];
  const result = document.getElementById("result");
  new MutationObserver((records) => records.forEach(() => window.shown.push(
    {src: result.getAttribute("src"), kind: result.dataset.kind, index: result.dataset.index}))
  ).observe(result, {attributes: true, attributeFilter: ["src"]});
}"""
# Each shown image: its bytes (base64) and decoded size; the download link's bytes.
COLLECT = """async () => {
  const encode = async (blob) => {
    const bytes = new Uint8Array(await blob.arrayBuffer());
    let text = "";
    for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
    return btoa(text);
  };
  const shown = [];
  for (const item of window.shown) {
    const blob = window.blobs.get(item.src);
    const bitmap = await createImageBitmap(blob);
    shown.push({...item, width: bitmap.width, height: bitmap.height, bytes: await encode(blob)});
  }
  const download = document.getElementById("download");
  return {shown, download: await encode(window.blobs.get(download.getAttribute("href"))),
          stored: localStorage.length + sessionStorage.length, cookie: document.cookie};
}"""


@pytest.fixture(scope="session")  # session: set up before the session-scoped artifact it would wait for
def chromium() -> str:
    """The browser's path, or skip (fail where CI says the browser test is required); checked before the
    other fixtures build anything."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = 'Playwright is not installed (pip install -e ".[browser]")'
    path = os.environ.get("VAREDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if problem is None and path is None:
        problem = "no Chromium on PATH (apt-get install chromium, or set VAREDIT_CHROMIUM)"
    if problem is None:
        return path
    if os.environ.get("VAREDIT_BROWSER_TESTS") == "required":
        pytest.fail(f"the browser test is required here: {problem}")
    pytest.skip(problem)


def test_an_edit_streams_its_previews_into_the_page(chromium, tiny_artifact, photos, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    photo = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"][::2, ::2]).save(photo)  # 226x150: not square
    not_an_image = b"this is a text file, not a picture"
    with running(tiny_artifact, api_key=KEY) as (url, _), sync_playwright() as playwright:
        server_says = httpx.post(f"{url}/v1/images/edits", files={"image": ("x.png", not_an_image, "image/png")},
                                 data={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"}).json()
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        requests, problems = [], []
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: problems.append(message.text)
                if "Content Security Policy" in message.text else None)
        page.on("pageerror", lambda error: problems.append(str(error)))

        response = page.goto(f"{url}/")
        assert "default-src 'none'" in response.headers["content-security-policy"]
        expect(page.locator("#source-size")).to_have_text("sample.jpg, {}×{} px".format(*Image.open(SAMPLE_PHOTO).size))
        expect(page.get_by_label(re.compile("API key"))).to_be_visible()  # /v1/models answered 401

        page.set_input_files("#photo", str(photo))
        expect(page.locator("#source-size")).to_have_text("chelsea.png, 226×150 px")  # what the page displays
        page.get_by_label("Instruction").fill("make the cat blue")
        page.get_by_label("cfg").fill("2.5")
        page.get_by_label("tau").fill("0.8")
        page.get_by_label("seed").fill("3")
        page.get_by_label("previews").select_option("2")
        page.get_by_role("button", name="Edit").click()  # no key yet: the server's 401 message
        expect(page.get_by_role("alert")).to_contain_text("missing or incorrect API key")

        page.get_by_label(re.compile("API key")).fill(KEY)
        page.evaluate(RECORDER)
        page.get_by_role("button", name="Edit").click()
        expect(page.locator("#result")).to_have_attribute("data-kind", "final")
        expect(page.get_by_role("alert")).to_be_hidden()
        server_timing = re.compile(r"Server: queue \d+ ms · worker \d+ ms · edit \d+ ms\. In this browser: first preview")
        expect(page.locator("#timing")).to_contain_text(server_timing)
        expect(page.get_by_role("link", name="Download the edited photo")).to_be_visible()
        seen = page.evaluate(COLLECT)
        shown = seen["shown"]
        assert [(s["kind"], s["index"]) for s in shown] == [("preview", "0"), ("preview", "1"), ("final", "")]
        assert len({s["src"] for s in shown}) == 3  # one record per change: none was skipped unseen
        assert len({s["bytes"] for s in shown}) == 3  # each preview replaced the one before, then the result
        assert all((s["width"], s["height"]) == (226, 150) for s in shown)  # the photo's size, as displayed
        final = Image.open(io.BytesIO(base64.b64decode(shown[-1]["bytes"])))
        reference = EditPipeline.from_artifacts(tiny_artifact).edit(Image.open(photo), "make the cat blue",
                                                                    cfg=2.5, tau=0.8, seed=3)
        assert np.array_equal(np.asarray(final), np.asarray(reference.image))  # the fields reached the server
        assert seen["download"] == shown[-1]["bytes"]
        assert seen["stored"] == 0 and seen["cookie"] == "" and page.context.cookies() == []  # the key stays put

        page.set_input_files("#photo", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": not_an_image}])
        page.get_by_role("button", name="Edit").click()
        expect(page.get_by_role("alert")).to_have_text(server_says["error"]["message"])
        browser.close()

    port = urlsplit(url).port
    for address in requests:
        parts = urlsplit(address)
        assert parts.scheme == "blob" or (parts.hostname, parts.port) == ("127.0.0.1", port), address
    paths = {urlsplit(address).path for address in requests if not address.startswith("blob:")}
    assert {"/", "/ui/playground.js", "/ui/playground.css", "/ui/sample.jpg", "/v1/models",
            "/v1/images/edits"} <= paths
    assert problems == []
