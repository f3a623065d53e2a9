"""The benchmarks' default model: the demo's tiny-2b (random weights), exported to a temporary folder."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def artifact_or_demo(artifacts: Path | None) -> Iterator[Path]:
    """`artifacts` itself, or a fresh `varedit-deploy export --random-weights --model tiny-2b` removed afterwards."""
    if artifacts is not None:
        yield artifacts
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "varedit_deploy.cli", "export", "--random-weights", "--model", "tiny-2b",
                        "--out", f"{tmp}/art"], check=True, stdout=subprocess.DEVNULL)
        yield Path(tmp) / "art"
