"""Screenshots of the playground page (GET /) for the docs: mid-stream, with a preview showing, and finished.

    python benchmarks/playground_screenshots.py [--artifacts ART] [--out docs] [--chromium /usr/bin/chromium]

Needs the [serve,browser] extras and Chromium (`apt-get install chromium`). Without --artifacts it
exports the demo model (tiny-2b, random weights) to a temporary folder. The server runs in this
process on loopback, caches off; the page edits the bundled photo with three previews. The tiny
model makes its previews within a second, so to catch one on screen the first edit holds every
preview back --hold seconds inside the server (only here, never in `serve`); the finished picture
is a second edit of the same photo and seed without the hold, so its timings are the real ones.
The pictures are reduced to a 256-colour palette to stay small (the random-weight result is
noise, which PNG cannot compress).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

from demo_artifact import artifact_or_demo
from PIL import Image

from varedit_deploy.fileio import atomic_path
from varedit_deploy.serve.options import ServeOptions
from varedit_deploy.serve.server import make_server, run

ROOT = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1000, "height": 720}
NAMES = ("playground-streaming.png", "playground-finished.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hold_previews(server, seconds: float) -> None:
    """Delay every preview the loaded pipelines make, so one stays on screen long enough to photograph;
    0 restores them."""
    for pipe in server.state.pipelines:
        compute = type(pipe).preview_image.__get__(pipe)

        def held(summed, size, compute=compute):
            time.sleep(seconds)
            return compute(summed, size)

        pipe.preview_image = held if seconds else compute


def save_small(png: bytes, path: Path) -> int:
    """The screenshot as a 256-colour PNG, written atomically; returns its size in bytes."""
    import io

    picture = Image.open(io.BytesIO(png)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", optimize=True)
    return path.stat().st_size


def take(artifacts: Path, out: Path, chromium: str, hold: float) -> None:
    from playwright.sync_api import expect, sync_playwright

    options = ServeOptions(str(artifacts), port=free_port(), text_cache_bytes=0, image_cache_bytes=0)
    server = make_server(options, log_level="warning")
    thread = threading.Thread(target=run, args=(server,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}/"
    try:
        while not server.state.ready:
            if not thread.is_alive():
                raise SystemExit("error: the server stopped while loading the artifact")
            time.sleep(0.1)
        hold_previews(server, hold)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            expect(page.locator("#source-size")).to_contain_text("px")
            page.get_by_label("Instruction").fill("make the sky purple")
            page.get_by_label("seed").fill("1")
            page.get_by_label("previews").select_option("3")
            page.get_by_role("button", name="Edit").click()
            expect(page.locator("#result")).to_have_attribute("data-index", "1", timeout=60_000)
            shots = [page.screenshot(full_page=True)]
            expect(page.locator("#result")).to_have_attribute("data-kind", "final", timeout=60_000)
            hold_previews(server, 0)
            page.get_by_role("button", name="Edit").click()  # disabled until this edit ends
            expect(page.get_by_role("button", name="Edit")).to_be_enabled(timeout=60_000)
            expect(page.locator("#result")).to_have_attribute("data-kind", "final")
            shots.append(page.screenshot(full_page=True))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(60)
    for name, png in zip(NAMES, shots):
        print(f"wrote {out / name} ({save_small(png, out / name) / 1024:.0f} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, help="exported artifact (default: the demo model, exported now)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the two PNGs (default docs/)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                    help="the browser Playwright drives (default: chromium on PATH)")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds each preview is held back (default 2)")
    args = ap.parse_args()
    if args.chromium is None:
        raise SystemExit("error: no Chromium on PATH; apt-get install chromium, or pass --chromium PATH")
    with artifact_or_demo(args.artifacts) as artifacts:
        take(artifacts, args.out, args.chromium, args.hold)


if __name__ == "__main__":
    main()
