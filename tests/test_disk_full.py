"""A full disk and an interrupted command leave nothing half-written: export, build, quantize, the server.

Each disk-full case runs on a small tmpfs mounted for the test (root only: CI runs as root and sets
VAREDIT_REQUIRE_TMPFS=1, so there a mount that fails is a failure, not a skip). The command must end
with one `error:` line and exit 1 (the server: HTTP 507 and then serve on), and the disk must hold
exactly what it held before, down to the bytes in use. SIGTERM mid-build and mid-quantize must
leave no temporary folder either (export's is tests/test_cli_errors.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from varedit_deploy.cli import main

from test_cli_errors import snapshot
from test_serve import running

QUICK_QUANTIZE = ["--mode", "int8", "--no-search", "--calibration-edits", "1", "--held-out", "1",
                  "--samples-per-scale", "1"]
# The release-size path (calibration/streamed.py), forced on the tiny model: statistics, then graph by graph.
STREAMED_QUANTIZE = ["--mode", "int8", "--stream", "--kv-cache", "int8", "--calibration-edits", "1", "--held-out", "1"]


@contextlib.contextmanager
def small_disk(folder: Path, size_bytes: int):
    """A tmpfs of `size_bytes` mounted on `folder` for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={-(-size_bytes // 4096) * 4}k", "tmpfs",
                            str(folder)], capture_output=True, text=True)
    if mount.returncode:
        reason = f"cannot mount a tmpfs here ({mount.stderr.strip() or 'mount failed'}): needs root"
        if os.environ.get("VAREDIT_REQUIRE_TMPFS"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def used_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(autouse=True)
def _own_temp_folder(tmp_path, monkeypatch):
    """Each test's temporary files in a folder of its own (some cases put it on the small disk)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_export_onto_a_full_disk(tmp_path, capsys):
    with small_disk(tmp_path / "disk", 6 * 2**20) as disk:
        before = used_bytes(disk)
        assert main(["export", "--random-weights", "--model", "tiny-2b", "--out", str(disk / "art")]) == 1
        assert "No space left on device; free some space" in _one_error_line(capsys)
        assert list(disk.iterdir()) == [] and used_bytes(disk) == before


@pytest.mark.parametrize("full", ["engines", "temporary files"])
def test_build_onto_a_full_disk(tiny_artifact, tmp_path, capsys, monkeypatch, full):
    """The artifact on a disk with room for 1 MiB more: the first engine (or, with the temporary folder
    there too, the first graph lowered to fp16 for TensorRT) does not fit."""
    with small_disk(tmp_path / "disk", tree_bytes(tiny_artifact) + 2**20 + 64 * 4096) as disk:
        art = disk / "art"
        shutil.copytree(tiny_artifact, art)
        if full == "temporary files":
            (disk / "tmp").mkdir()
            monkeypatch.setenv("TMPDIR", str(disk / "tmp"))
            monkeypatch.setattr(tempfile, "tempdir", str(disk / "tmp"))
        before, in_use = snapshot(str(disk)), used_bytes(disk)
        assert main(["build", "--artifacts", str(art), "--precision", "fp16"]) == 1
        assert "No space left on device; free some space" in _one_error_line(capsys)
        assert snapshot(str(disk)) == before and used_bytes(disk) == in_use


@pytest.mark.parametrize("full, how", [("artifact", QUICK_QUANTIZE), ("temporary files", QUICK_QUANTIZE),
                                       ("artifact", STREAMED_QUANTIZE), ("temporary files", STREAMED_QUANTIZE)],
                         ids=["artifact", "temporary-files", "streamed-artifact", "streamed-temporary-files"])
def test_quantize_onto_a_full_disk(tiny_artifact, tmp_path, capsys, monkeypatch, full, how):
    """The quantised artifact does not fit (written last; streamed: graph by graph), or the temporary
    files do not (ModelOpt's and quantize's own; streamed: the instrumented graphs of the statistics)."""
    with small_disk(tmp_path / "disk", 4 * 2**20) as disk:
        if full == "temporary files":
            monkeypatch.setenv("TMPDIR", str(disk))
            monkeypatch.setattr(tempfile, "tempdir", str(disk))
        in_use = used_bytes(disk)
        assert main(["quantize", "--artifacts", str(tiny_artifact), "--out", str(disk / "q"), *how]) == 1
        assert "No space left on device" in _one_error_line(capsys)  # (ModelOpt's failures are named as such)
        assert list(disk.iterdir()) == [] and used_bytes(disk) == in_use


def test_the_server_answers_507_when_an_upload_cannot_spool_and_serves_on(tiny_artifact, tmp_path, monkeypatch):
    """Uploads over 1 MiB spool to a temporary file; with no room for it the request gets 507 (Retry-After),
    the spool is gone, and the next request is served."""
    noise = np.random.default_rng(0).integers(0, 255, (1100, 1100, 3), dtype=np.uint8)
    big, small = io.BytesIO(), io.BytesIO()
    Image.fromarray(noise).save(big, format="PNG", compress_level=0)
    Image.fromarray(noise[:64, :96]).save(small, format="PNG")
    assert big.tell() > 3 * 2**20
    with small_disk(tmp_path / "disk", 2**20) as disk:
        monkeypatch.setattr(tempfile, "tempdir", str(disk))
        in_use = used_bytes(disk)
        with running(tiny_artifact) as (url, _server):
            def post(data: bytes) -> httpx.Response:
                return httpx.post(f"{url}/v1/images/edits", files={"image": ("p.png", data, "image/png")},
                                  data={"prompt": "make it red"}, timeout=120)

            refused = post(big.getvalue())
            assert refused.status_code == 507, refused.text
            assert refused.json()["error"]["code"] == "insufficient_storage" and refused.headers["Retry-After"]
            until = time.monotonic() + 10  # the spool is closed when the failed request is let go
            while used_bytes(disk) != in_use and time.monotonic() < until:
                time.sleep(0.1)
            assert used_bytes(disk) == in_use and list(disk.iterdir()) == []
            assert post(small.getvalue()).status_code == 200


# ------------------------------------------------------------------ interrupted (SIGTERM) mid-write
def _terminate_when(proc: subprocess.Popen, started, timeout: float = 300) -> str:
    """SIGTERM `proc` as soon as `started()` holds; its stderr."""
    until = time.monotonic() + timeout
    while not started() and time.monotonic() < until and proc.poll() is None:
        time.sleep(0.05)
    assert started(), f"the command never got that far: {proc.communicate(timeout=60)[1]}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    return err


def test_sigterm_mid_build_leaves_the_artifact_as_it_was(tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    before = snapshot(str(art))
    proc = subprocess.Popen([sys.executable, "-m", "varedit_deploy.cli", "build", "--artifacts", str(art),
                             "--precision", "fp16"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = _terminate_when(proc, lambda: any((art / "engines").glob(".*.tmp/*.engine")))
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert snapshot(str(art)) == before  # no engine set, no temporary folder, not even engines/


@pytest.mark.parametrize("how", [QUICK_QUANTIZE, STREAMED_QUANTIZE], ids=["modelopt", "streamed"])
def test_sigterm_mid_quantize_leaves_nothing(tiny_artifact, tmp_path, _own_temp_folder, how):
    out = tmp_path / "q"
    proc = subprocess.Popen([sys.executable, "-m", "varedit_deploy.cli", "quantize", "--artifacts",
                             str(tiny_artifact), "--out", str(out), *how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = _terminate_when(proc, lambda: any(tmp_path.glob(".q.*.tmp")) and any(_own_temp_folder.iterdir()))
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    # (TensorRT-RTX's library keeps a session id in $TMPDIR/.ses, after a completed run too: not an output)
    assert [p.name for p in _own_temp_folder.iterdir() if p.name != ".ses"] == []
