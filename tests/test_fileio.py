"""Atomic writes end with the permissions a plain write gives, and never delete what they did not write."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import unwritable_folder
from varedit_deploy.errors import OutputError
from varedit_deploy.fileio import atomic_dir, atomic_path, check_writable, unlisted_files, write_text
from varedit_deploy.imaging import save_image


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_folders_get_the_modes_of_a_plain_write(tmp_path, umask):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain-dir").mkdir()
    write_text(tmp_path / "atomic.txt", "x")
    save_image(Image.fromarray(np.zeros((16, 16, 3), np.uint8)), tmp_path / "atomic.png")
    with atomic_dir(tmp_path / "atomic-dir") as tmp:
        (tmp / "inside").write_text("x")
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "atomic.png") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "atomic-dir") == _mode(tmp_path / "plain-dir")
    assert _mode(tmp_path / "plain.txt") == 0o666 & ~umask and _mode(tmp_path / "plain-dir") == 0o777 & ~umask


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "shared.txt"
    path.write_text("old")
    path.chmod(0o640)
    write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o640


def test_atomic_dir_takes_a_missing_or_empty_folder_and_refuses_a_full_one(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("new", "empty"):
        with atomic_dir(tmp_path / name) as tmp:
            (tmp / "a").write_text("a")
        assert (tmp_path / name / "a").read_text() == "a"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an empty folder"):
        with atomic_dir(tmp_path / "full") as tmp:
            (tmp / "a").write_text("a")
    assert os.listdir(tmp_path / "full") == ["notes.txt"]
    with atomic_dir(tmp_path / "full", replace=True) as tmp:
        (tmp / "a").write_text("a")
    assert os.listdir(tmp_path / "full") == ["a"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "full", "new"]  # no temporary left behind


def test_a_failed_block_leaves_the_old_folder_and_no_temporary(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "art", replace=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert sorted(os.listdir(tmp_path)) == ["art"] and os.listdir(tmp_path / "art") == ["old"]


def test_a_failed_write_removes_the_folders_it_made_and_only_those(tmp_path):
    (tmp_path / "art" / "kept").mkdir(parents=True)
    for write in (atomic_dir, atomic_path):
        with pytest.raises(OSError):
            with write(tmp_path / "art" / "engines" / "set" / "x") as tmp:
                raise OSError(28, "No space left on device")
        assert sorted(os.listdir(tmp_path / "art")) == ["kept"]  # no empty engines/set/ left behind
    with atomic_path(tmp_path / "art" / "engines" / "x") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "art" / "engines" / "x").read_text() == "x"


def test_unlisted_files_are_what_a_replacement_would_lose(tmp_path):
    for name in ("manifest.json", "graphs/a.onnx", "graphs/b.onnx", "graphs/notes.txt", "mine/x", "engines/e/e.bin"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    listed = ["manifest.json", "graphs/a.onnx", "graphs/b.onnx", "engines/e/e.bin", "graphs/missing.onnx"]
    assert unlisted_files(tmp_path, listed) == ["graphs/notes.txt", "mine/"]
    (tmp_path / "engines" / "left-by-a-failed-build" / "empty").mkdir(parents=True)  # nothing in it to lose
    assert unlisted_files(tmp_path, listed) == ["graphs/notes.txt", "mine/"]


def test_check_writable_probes_instead_of_trusting_mode_bits(tmp_path):
    check_writable(tmp_path / "a" / "b" / "c.png", "output")
    assert os.listdir(tmp_path) == []  # the probe is gone and nothing was created
    with pytest.raises(OutputError, match="cannot write in"):
        check_writable(unwritable_folder(tmp_path) / "x.png", "output")
