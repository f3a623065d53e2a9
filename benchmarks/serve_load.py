"""Load, soak and faults against `varedit-deploy serve` on loopback (bounded in count and time).

    python benchmarks/serve_load.py [--artifacts ART] [--soak 1000] [--out benchmarks/results/serve_load.md]

Without --artifacts it exports the demo model (tiny-2b, random weights) to a temporary folder.
Every phase starts its own server process (`varedit-deploy serve`, ONNX Runtime) and talks
HTTP to it from a thread pool:

1. direct: the same edit through `EditPipeline` in this process (no server running): the
   baseline for the HTTP overhead.
2. concurrency 1, 4, 16 with --max-batch 1 and 16 (caches off, so every edit does all its
   work): p50/p95/p99 latency and edits/s; and the same requests with stream=true and
   partial_images=1: time to the first preview; and at concurrency 1 answered as jpeg. Each
   client thread keeps one keep-alive connection, as real clients do.
3. soak: N requests at concurrency 4 in one server process (caches on, 3 photos x 3 prompts);
   the server's RSS at start, middle and end.
4. faults mixed into 100 requests at concurrency 8: 10% clients that disconnect mid-edit,
   5% malformed multipart, 5% oversized bodies, 5% non-images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from demo_artifact import artifact_or_demo

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("make the sky purple", "add a red hat", "turn it into a watercolor painting")


def photos() -> list[bytes]:
    from skimage import data

    out = []
    for img in (data.chelsea(), data.coffee(), data.astronaut()[::2, ::2]):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifacts: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "varedit_deploy.cli", "serve", "--artifacts",
                                      str(artifacts), "--port", str(self.port), "--log-level", "warning", *args])
        until = time.monotonic() + 300
        while time.monotonic() < until:
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        return 0.0

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/ready").status_code == 200

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(120)


_local = threading.local()


def client() -> httpx.Client:
    """This load thread's keep-alive client, as a real one (the openai SDK) keeps a client: making an
    httpx client per request costs about 24 ms here (its SSL context), the client's time, not the server's."""
    if not hasattr(_local, "client"):
        _local.client = httpx.Client(timeout=600)
    return _local.client


def edit(url: str, photo: bytes, prompt: str, seed: int, stream: bool = False, output_format: str = "png") -> dict:
    files = {"image": ("p.png", photo, "image/png")}
    data = {"prompt": prompt, "seed": str(seed), "output_format": output_format}
    t0 = time.perf_counter()
    if not stream:
        r = client().post(f"{url}/v1/images/edits", files=files, data=data)
        latency = time.perf_counter() - t0
        timing = dict(part.strip().split(";dur=") for part in r.headers.get("server-timing", "").split(",") if part)
        # what HTTP added: the request's time less its queueing and its time in a worker
        http = latency - (float(timing["queue"]) + float(timing["worker"])) / 1e3 if timing else float("nan")
        return {"status": r.status_code, "latency": latency, "http": http,
                "edit": float(timing.get("edit", "nan")) / 1e3}
    first = None
    with client().stream("POST", f"{url}/v1/images/edits", files=files,
                         data={**data, "stream": "true", "partial_images": "1"}) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("event: image_edit.partial_image"):
                first = time.perf_counter() - t0
        return {"status": r.status_code, "latency": time.perf_counter() - t0, "first_preview": first}


def load(url: str, pics: list[bytes], concurrency: int, requests: int, stream: bool = False,
         output_format: str = "png") -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda i: edit(url, pics[0], PROMPTS[0], i, stream, output_format), range(requests)))
    wall = time.perf_counter() - t0
    lat = np.array([r["latency"] for r in runs])
    out = {"format": output_format, "concurrency": concurrency, "requests": requests, "ok": sum(r["status"] == 200 for r in runs),
           "edits_per_s": requests / wall, **{f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)}}
    if not stream:
        http, edit_s = np.array([r["http"] for r in runs]), np.array([r["edit"] for r in runs])
        out["http_overhead_p50_ms"] = float(np.nanmedian(http) * 1e3)
        out["http_overhead_share_of_edit"] = float(np.nanmedian(http / edit_s))
    if stream:
        first = np.array([r["first_preview"] for r in runs], dtype=float)
        out["first_preview_p50"] = float(np.nanmedian(first))
        out["first_preview_share"] = float(np.nanmedian(first / lat))
    return out


def direct_edit_seconds(artifacts: Path, pic: bytes, repeats: int = 8) -> float:
    from varedit_deploy.runtime.pipeline import EditPipeline

    pipe = EditPipeline.from_artifacts(artifacts)
    img = Image.open(io.BytesIO(pic)).convert("RGB")
    pipe.edit(img, PROMPTS[0], seed=0)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pipe.edit(img, PROMPTS[0], seed=i)
        times.append(time.perf_counter() - t0)
    pipe.close()
    return float(np.median(times))


def faults(server: Server, pics: list[bytes], requests: int = 100, concurrency: int = 8) -> dict:
    rng = random.Random(0)
    kinds = (["disconnect"] * 10 + ["malformed"] * 5 + ["oversized"] * 5 + ["not_image"] * 5 + ["ok"] * 75)
    plan = [kinds[i % len(kinds)] for i in range(requests)]
    rng.shuffle(plan)
    url = server.url

    def one(i: int) -> tuple[str, int | None]:
        kind = plan[i]
        if kind == "ok":
            return kind, edit(url, pics[i % 3], PROMPTS[i % 3], i)["status"]
        if kind == "disconnect":
            req = httpx.Request("POST", f"{url}/v1/images/edits", files={"image": ("p.png", pics[0], "image/png")},
                                data={"prompt": PROMPTS[0], "seed": str(i)})
            body = req.read()
            head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {req.headers['content-type']}"
                    f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(head + body)
                time.sleep(rng.uniform(0.05, 0.5))
            return kind, None
        if kind == "malformed":
            r = httpx.post(f"{url}/v1/images/edits", content=b"--xyz\r\nContent-Disposition: form-data; name=\"pro",
                           headers={"content-type": "multipart/form-data; boundary=xyz"}, timeout=60)
        elif kind == "oversized":
            r = httpx.post(f"{url}/v1/images/edits", files={"image": ("p.png", os.urandom(21 * 2**20), "image/png")},
                           data={"prompt": "x"}, timeout=60)
        else:
            r = httpx.post(f"{url}/v1/images/edits", files={"image": ("p.png", b"%PDF-1.7 not an image", "image/png")},
                           data={"prompt": "x"}, timeout=60)
        return kind, r.status_code

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    time.sleep(1.0)
    counts: dict[str, dict[str, int]] = {}
    for kind, status in results:
        counts.setdefault(kind, {}).setdefault(str(status), 0)
        counts[kind][str(status)] += 1
    outcomes = {o: server.metric(f'varedit_edits_total{{outcome="{o}"}}') for o in ("ok", "cancelled", "deadline",
                                                                                       "error")}
    accepted = sum(outcomes.values())
    return {"requests": requests, "by_kind": counts, "edits_by_outcome": outcomes,
            "server_5xx": sum(n for kind in counts.values() for s, n in kind.items() if s.startswith("5")),
            "accepted_edits": accepted, "expected_accepted": plan.count("ok") + plan.count("disconnect"),
            "ready_after": server.ready()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--soak", type=int, default=1000)
    ap.add_argument("--phases", default="load,soak,faults", help="which phases to run (default all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.md")
    args = ap.parse_args()
    with artifact_or_demo(args.artifacts) as artifacts:
        run(args, artifacts)


def run(args: argparse.Namespace, artifacts: Path) -> None:
    pics = photos()
    phases = set(args.phases.split(","))
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "artifacts": str(artifacts),
                    "date": time.strftime("%Y-%m-%d")}
    if "load" in phases:
        print("[load] direct pipeline edits (no server)", flush=True)
        report["direct_edit_s"] = direct_edit_seconds(artifacts, pics[0])
        print("[load] concurrency 1, 4, 16; batching off and on; streaming", flush=True)
        report["load"] = load_phase(artifacts, pics)
    if "soak" in phases:
        print(f"[soak] {args.soak} requests at concurrency 4", flush=True)
        report["soak"] = soak_phase(artifacts, pics, args.soak)
    if "faults" in phases:
        print("[faults] mixed into the load", flush=True)
        server = Server(artifacts, "--max-queue", "256")
        report["faults"] = faults(server, pics)
        report["faults"]["exit_status_after_sigterm"] = server.stop()
        print(f"      {report['faults']}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    from varedit_deploy.fileio import write_text

    write_text(args.out.with_suffix(".json"), json.dumps(report, indent=1))
    write_text(args.out, render(report) + "\n")
    print(render(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


def load_phase(artifacts: Path, pics: list[bytes]) -> list[dict]:
    rows = []
    for batch in (1, 16):
        server = Server(artifacts, "--max-batch", str(batch), "--cache-mib", "0", "--max-queue", "256")
        for stream in (False, True) if batch == 1 else (False,):
            for c in (1, 4, 16):
                rows.append({"stream": stream, "batch": batch, **load(server.url, pics, c, max(8, 2 * c), stream)})
                print(f"      {rows[-1]}", flush=True)
        if batch == 1:  # the same edits answered as jpeg: how much of the overhead is the PNG encoder
            rows.append({"stream": False, "batch": batch, **load(server.url, pics, 1, 8, output_format="jpeg")})
            print(f"      {rows[-1]}", flush=True)
        server.stop()
    return rows


def soak_phase(artifacts: Path, pics: list[bytes], requests: int) -> dict:
    server = Server(artifacts, "--max-queue", "256")
    rss = {"start": server.rss_mib()}
    statuses: list[int] = []
    lock = threading.Lock()

    def soak_one(i: int) -> None:
        status = edit(server.url, pics[i % 3], PROMPTS[(i // 3) % 3], i)["status"]
        with lock:
            statuses.append(status)
            if len(statuses) == requests // 10:
                rss["after_10pct"] = server.rss_mib()
            if len(statuses) == requests // 2:
                rss["middle"] = server.rss_mib()
            if len(statuses) % 100 == 0:
                print(f"      {len(statuses)} done, {len(statuses) - statuses.count(200)} not 200, "
                      f"RSS {server.rss_mib():.0f} MiB", flush=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(soak_one, range(requests)))
    rss["end"] = server.rss_mib()
    soak = {"requests": requests, "ok": statuses.count(200), "errors": len(statuses) - statuses.count(200),
            "seconds": time.perf_counter() - t0, "rss_mib": rss,
            "cache_hits": {c: server.metric(f'varedit_cache_hits_total{{cache="{c}"}}') for c in ("text", "image")}}
    soak["exit_status_after_sigterm"] = server.stop()
    print(f"      {soak}", flush=True)
    return soak


def render(r: dict) -> str:
    lines = [f"# serve_load ({r['date']}, {r['machine']})", ""]
    if "load" in r:
        lines += render_load(r)
    if "soak" in r:
        s = r["soak"]
        rss = {k: f"{v:.0f}" for k, v in s["rss_mib"].items()}
        lines += ["", f"Soak: {s['requests']} requests, {s['ok']} ok, {s['errors']} errors in {s['seconds']:.0f} s; "
                  f"RSS MiB {rss}; cache hits {s['cache_hits']}; exit status after SIGTERM "
                  f"{s['exit_status_after_sigterm']}."]
    if "faults" in r:
        lines += ["", f"Faults: {json.dumps(r['faults'])}"]
    return "\n".join(lines)


def render_load(r: dict) -> list[str]:
    ms = 1e3
    lines = [f"Direct `EditPipeline.edit` (no server): {r['direct_edit_s'] * ms:.0f} ms per edit.", "",
             "| mode | max-batch | concurrency | requests | ok | p50 ms | p95 ms | p99 ms | edits/s "
             "| HTTP overhead p50 ms (share of the edit) | first preview p50 ms (share of its edit) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for x in r["load"]:
        first = (f"{x['first_preview_p50'] * ms:.0f} ({x['first_preview_share']:.0%})" if x["stream"] else "-")
        http = ("-" if x["stream"] else
                f"{x['http_overhead_p50_ms']:.1f} ({x['http_overhead_share_of_edit']:.1%})")
        mode = ("stream, partial_images=1" if x["stream"] else "b64_json") + f", {x.get('format', 'png')}"
        lines.append(f"| {mode} | {x['batch']} | {x['concurrency']} | "
                     f"{x['requests']} | {x['ok']} | {x['p50'] * ms:.0f} | {x['p95'] * ms:.0f} | {x['p99'] * ms:.0f} | "
                     f"{x['edits_per_s']:.2f} | {http} | {first} |")
    return lines


if __name__ == "__main__":
    main()
