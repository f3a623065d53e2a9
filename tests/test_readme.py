"""The README's Python example runs as printed, where the README says it does."""

import re

from PIL import Image

from conftest import ROOT
from varedit_deploy.imaging import SAMPLE_PHOTO


def test_the_python_example_runs_as_printed(tmp_path, monkeypatch, tiny_artifact, capsys):
    """In a checkout after `varedit-deploy demo`: the demo's artifact and the bundled photo."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
              if "EditPipeline" in b]  # the other Python block is the `serve` client example
    assert len(blocks) == 1
    (tmp_path / "demo-output").mkdir()
    (tmp_path / "demo-output" / "artifacts").symlink_to(tiny_artifact)
    (tmp_path / "varedit_deploy").symlink_to(ROOT / "varedit_deploy")
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert Image.open(tmp_path / "edited.png").size == Image.open(SAMPLE_PHOTO).size
    assert "'total':" in capsys.readouterr().out
