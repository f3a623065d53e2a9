"""What every bad input the tests try gets, as the user sees it: the CLI's cases, hostile artifacts and
engine sets through every command that reads artifacts, and bad HTTP requests to a running server.

    python benchmarks/reliability_table.py    # about 3 minutes on 2 cores

Runs the inputs of tests/test_cli_errors.py, tests/test_containment.py and tests/test_serve.py on a
fresh tiny-2b artifact and writes what came back (exit status and the `error:` line, or the HTTP
status, error code and message) to benchmarks/results/reliability.md.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _run(argv: list[str]) -> tuple[int, str]:
    """A CLI command in this process: its exit status and what it printed on stderr."""
    from varedit_deploy.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue().strip()


def _short(text: str, *folders: Path) -> str:
    for folder in folders:
        text = text.replace(str(folder), "…")
    return re.sub(r"\s+", " ", text).replace("|", "\\|")


def cli_rows(art: Path, work: Path) -> list[str]:
    from test_cli_errors import CASES, make_workspace

    rows = []
    for name, template, _code, _words in CASES:
        ws_dir = work / f"ws-{name}"
        ws_dir.mkdir()
        previous = os.getcwd()
        os.chdir(ws_dir)
        try:
            ws = make_workspace(ws_dir, art)
            code, err = _run([a.format(**ws) for a in template])
        finally:
            os.chdir(previous)
        rows.append(f"| `{name}` | {code} | {_short(err, ws_dir, art, Path(ws['fixture']))} |")
    return rows


def artifact_rows(art: Path, work: Path) -> list[str]:
    import numpy as np
    from PIL import Image

    from test_containment import COMMANDS, ESCAPES

    photo = work / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photo)
    rows = []
    for name, plant, _words in ESCAPES:
        hostile = work / name / "art"
        shutil.copytree(art, hostile, copy_function=os.link)
        plant(hostile)
        outcomes: Counter = Counter()
        line = ""
        for command, template in COMMANDS.items():
            if command == "export-overwrite" and name.startswith("external-"):
                continue  # it opens no graph (see tests/test_containment.py)
            out = work / name / command
            out.mkdir()
            code, err = _run([a.format(art=hostile, photo=photo, ws=out) for a in template])
            outcomes[(code, "refused" in err and err.count("\n") == 0)] += 1
            line = line or err
        summary = ", ".join(f"{n} × exit {code}{' one line, refused' if ok else ' (NOT refused)'}"
                            for (code, ok), n in sorted(outcomes.items()))
        rows.append(f"| `{name}` | {summary} | {_short(line, hostile.parent, art)} |")
    return rows


def http_rows(art: Path) -> list[str]:
    import httpx
    from skimage import data

    from test_serve import KEY, _png, _post, error_cases, running

    photo = _png(data.chelsea()[::2, ::2])
    rows = []
    with running(art, api_key=KEY, max_batch=4) as (url, _server):
        auth = {"Authorization": f"Bearer {KEY}"}
        for fields, _status, _code, _param in error_cases(photo):
            shown = {k: (v[:24] + b"..." if isinstance(v, bytes) and len(v) > 24 else v) if k != "prompt"
                     else (v if len(v) < 20 else v[:12] + f"... ({len(v)} chars)") for k, v in fields.items()}
            if fields.get("photo") is photo:
                shown["photo"] = "a good PNG"
            reply = _post(url, **fields)
            rows.append(_http_row(repr(shown), reply))
        extra = [
            ("image sent as the text '/etc/passwd'", lambda: httpx.post(
                f"{url}/v1/images/edits", files={"prompt": (None, "x"), "image": (None, "/etc/passwd")}, headers=auth)),
            ("a JSON body", lambda: httpx.post(f"{url}/v1/images/edits", json={"prompt": "x"}, headers=auth)),
            ("multipart without a boundary", lambda: httpx.post(
                f"{url}/v1/images/edits", content=b"--x\r\ngarbage",
                headers={**auth, "Content-Type": "multipart/form-data"})),
            ("PUT", lambda: httpx.put(f"{url}/v1/images/edits", headers=auth)),
            ("GET /v1/models without the key", lambda: httpx.get(f"{url}/v1/models")),
        ]
        rows += [_http_row(what, send()) for what, send in extra]
    return rows


def _http_row(what: str, reply) -> str:
    try:
        error = reply.json().get("error", {})
    except ValueError:
        error = {}
    return (f"| {_short(what)} | {reply.status_code} | {error.get('code', '-')} | "
            f"{_short(error.get('message', reply.text[:80]))} |")


def main() -> None:
    out = ROOT / "benchmarks" / "results" / "reliability.md"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        art = work / "art"
        assert _run(["export", "--random-weights", "--model", "tiny-2b", "--out", str(art)])[0] == 0
        sections = [
            ("CLI: bad options, photos, destinations and folders (tests/test_cli_errors.py)",
             "| case | exit | what it prints |\n|---|---:|---|", cli_rows(art, work)),
            ("Artifacts and engine sets that reach outside (tests/test_containment.py): inspect, edit, build, "
             "quantize, plan --artifacts, serve, export --overwrite",
             "| escape | outcome over the commands | the line (inspect) |\n|---|---|---|", artifact_rows(art, work)),
            ("HTTP: bad requests to `varedit-deploy serve` (tests/test_serve.py)",
             "| request | status | code | message |\n|---|---:|---|---|", http_rows(art)),
        ]
    text = "# What bad inputs get\n\n`python benchmarks/reliability_table.py` on a tiny-2b artifact.\n"
    for title, head, rows in sections:
        text += f"\n## {title}\n\n{head}\n" + "\n".join(rows) + "\n"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
