"""Atomic writes: files and folders appear complete or not at all, and nothing we did not write is lost.

Temporary files and folders are created with the modes a plain `open`/`mkdir` gives under the
current umask (0644/0755 under umask 022), not the owner-only modes of `mkstemp`/`mkdtemp`,
so renaming them into place leaves what a normal write would have left.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from .errors import OutputError


def _create_beside(path: Path, make: Callable[[Path], None]) -> Path:
    """A new hidden name beside `path`, created by `make` (which fails if the name exists)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _new_file(tmp: Path) -> None:
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as for open()


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, before any work, if `path` could not be created: its nearest existing folder
    must be a folder we can write in (tried with a probe file, which also covers read-only mounts
    and the superuser, where permission bits say nothing)."""
    path = Path(path).absolute()
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        probe = _create_beside(folder / "write-check", _new_file)
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write in {folder} ({e.strerror or e})") from None
    probe.unlink()


@contextlib.contextmanager
def _parents_of(path: Path) -> Iterator[None]:
    """Create the missing folders above `path`; if the block fails, remove those still empty again
    (a failed write leaves the tree as it found it, not an empty `engines/`)."""
    missing = [folder for folder in path.parents if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.
    A file replaced keeps its mode, as it would when overwritten in place."""
    path = Path(path)
    with _parents_of(path):
        tmp = _create_beside(path, _new_file)
        try:
            yield tmp
            if path.is_file():
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it takes `path`'s place only if the block succeeds.

    A missing or empty `path` is simply taken. A non-empty one is swapped out and deleted only
    with `replace=True`, which the caller passes after checking that it holds only what we wrote.
    """
    path = Path(path)
    with _parents_of(path):
        tmp = _create_beside(path, lambda p: p.mkdir(0o777))
        try:
            yield tmp
            if path.is_dir() and replace and any(path.iterdir()):
                old = _create_beside(path, lambda p: p.mkdir(0o700))
                os.replace(path, old)  # a rename onto the empty placeholder
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)
                    raise
                shutil.rmtree(old)
            else:
                try:
                    os.replace(tmp, path)  # POSIX: onto a missing name or an empty folder only
                except OSError as e:
                    raise OutputError(f"{path} exists and is not an empty folder; nothing was changed") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def unlisted_files(folder: Path, listed: Iterable[str]) -> list[str]:
    """Entries under `folder` that are neither in `listed` (relative POSIX paths) nor folders
    on the way to one, nor empty folders: what a writer that replaces `folder` would delete
    without having written."""
    keep = set(listed)
    keep |= {parent.as_posix() for name in keep for parent in PurePosixPath(name).parents}
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in sorted(files) + sorted(dirs):
            entry = (rel / name).as_posix()
            empty = name in dirs and not any(not p.is_dir() or p.is_symlink() for p in Path(root, name).rglob("*"))
            # (folders holding no files, e.g. what a failed build leaves, are nothing to lose)
            if entry not in keep and not empty:
                found.append(entry + ("/" if name in dirs else ""))
        dirs[:] = [d for d in dirs if (rel / d).as_posix() in keep]
    return sorted(found)
