"""Every subcommand through bad arguments and inputs, as a careful new user meets them.

Each case must end with a non-zero exit (2 for options that are malformed, out of range or do
not go together; 1 for everything else), exactly one line on stderr starting with `error:`,
no traceback, and no file created, changed or removed anywhere in the workspace or in the
artifact and fixture it reads. Add a case whenever a new option appears.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import fixture_dir, png_header, unwritable_folder
from varedit_deploy.cli import main

USAGE, FAILURE = 2, 1
EDIT = ["edit", "--random-weights", "--model", "tiny-2b", "--instruction", "make it red"]
EDIT_ART = ["edit", "--artifacts", "{art}", "--instruction", "make it red"]
EDIT_ART_IO = EDIT_ART + ["--image", "{img}", "--out", "o.png"]


@pytest.fixture
def ws(tmp_path, monkeypatch, tiny_artifact) -> dict[str, str]:
    """A workspace of good and bad inputs; the current folder is the workspace."""
    monkeypatch.chdir(tmp_path)
    return make_workspace(tmp_path, tiny_artifact)


def make_workspace(tmp_path, tiny_artifact) -> dict[str, str]:
    """The good and bad inputs of the cases in `tmp_path` (benchmarks/reliability_table.py uses it too)."""
    rng = np.random.default_rng(0)
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    Image.new("RGB", (8, 8), "red").save(tmp_path / "tiny.png")
    (tmp_path / "huge.png").write_bytes(png_header(10000, 10000))
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    (tmp_path / "fake-art").mkdir()
    (tmp_path / "fake-art" / "manifest.json").write_text("{not json")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "link-to-empty").symlink_to(tmp_path / "empty-dir")
    return {"ws": str(tmp_path), "img": str(good), "art": str(tiny_artifact), "ro": str(unwritable_folder(tmp_path)),
            "fixture": str(fixture_dir("tiny-2b"))}


def snapshot(*roots: str) -> dict[str, tuple[int, int] | None]:
    """Every path under `roots`: files with (size, mtime), folders as None (their mtimes move
    when a write check creates and removes a probe file)."""
    found: dict[str, tuple[int, int] | None] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                found[os.path.join(folder, name)] = None
            for name in files:
                st = os.lstat(os.path.join(folder, name))
                found[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return found


CASES = [
    # --- edit: inputs
    ("edit-image-missing", EDIT + ["--image", "{ws}/nope.png", "--out", "o.png"], FAILURE, "no such file"),
    ("edit-image-empty", EDIT + ["--image", "{ws}/empty.png", "--out", "o.png"], FAILURE, "not a readable image"),
    ("edit-image-text", EDIT + ["--image", "{ws}/text.png", "--out", "o.png"], FAILURE, "not a readable image"),
    ("edit-image-truncated", EDIT + ["--image", "{ws}/truncated.png", "--out", "o.png"], FAILURE, "truncated"),
    ("edit-image-folder", EDIT + ["--image", "{ws}/notes", "--out", "o.png"], FAILURE, "is a folder"),
    ("edit-image-tiny", EDIT + ["--image", "{ws}/tiny.png", "--out", "o.png"], FAILURE, "is 8x8 px"),
    ("edit-image-huge", EDIT + ["--image", "{ws}/huge.png", "--out", "o.png"], FAILURE, "is 10000x10000 px"),
    ("edit-image-bomb", EDIT + ["--image", "{ws}/bomb.png", "--out", "o.png"], FAILURE, "too large"),
    ("edit-instruction-empty", ["edit", "--random-weights", "--image", "{img}", "--instruction", " ", "--out", "o.png"],
     FAILURE, "instruction is empty"),
    # --- edit: outputs, checked before any work
    ("edit-out-extension", EDIT + ["--image", "{img}", "--out", "o.xyz"], FAILURE, "unknown image extension"),
    ("edit-out-read-only", EDIT + ["--image", "{img}", "--out", "{ro}/o.png"], FAILURE, "cannot write in"),
    ("edit-out-under-a-file", EDIT + ["--image", "{img}", "--out", "{ws}/a-file/o.png"], FAILURE, "is a file"),
    ("edit-out-no-extension", EDIT + ["--image", "{img}", "--out", "{ws}/empty-dir"], FAILURE, "unknown image ext"),
    ("edit-out-is-a-folder", EDIT + ["--image", "{img}", "--out", "{ws}/folder.png"], FAILURE, "is a folder"),
    # --- edit: sampling values
    ("edit-cfg-nan", EDIT_ART_IO + ["--cfg", "nan"], USAGE, "cfg must be a finite"),
    ("edit-cfg-negative", EDIT_ART_IO + ["--cfg", "-1"], USAGE, "[0, 20]"),
    ("edit-cfg-huge", EDIT_ART_IO + ["--cfg", "1e9"], USAGE, "[0, 20]"),
    ("edit-cfg-text", EDIT_ART_IO + ["--cfg", "high"], USAGE, "not a number"),
    ("edit-cfg-no-value", EDIT_ART_IO + ["--cfg"], USAGE, "expected one argument"),
    ("edit-tau-zero", EDIT_ART_IO + ["--tau", "0"], USAGE, "tau must be"),
    ("edit-tau-inf", EDIT_ART_IO + ["--tau", "inf"], USAGE, "tau must be"),
    ("edit-top-p-zero", EDIT_ART_IO + ["--top-p", "0"], USAGE, "(0, 1]"),
    ("edit-top-p-big", EDIT_ART_IO + ["--top-p", "1.5"], USAGE, "(0, 1]"),
    ("edit-seed-negative", EDIT_ART_IO + ["--seed", "-5"], USAGE, "seed must be"),
    ("edit-seed-huge", EDIT_ART_IO + ["--seed", str(2**63)], USAGE, "seed must be"),
    ("edit-seed-fraction", EDIT_ART_IO + ["--seed", "1.5"], USAGE, "whole number"),
    ("edit-noise-unknown", EDIT_ART_IO + ["--noise", "gauss"], USAGE, "invalid choice"),
    # --- edit: model sources
    ("edit-no-source", ["edit", "--image", "{img}", "--instruction", "x", "--out", "o.png"], USAGE,
     "one of the arguments"),
    ("edit-two-sources", EDIT_ART_IO + ["--random-weights"], USAGE, "not allowed with"),
    ("edit-model-with-artifacts", EDIT_ART_IO + ["--model", "tiny-2b"], USAGE, "do not apply to --artifacts"),
    ("edit-backend-without-artifacts", EDIT + ["--backend", "tensorrt", "--image", "{img}", "--out", "o.png"], USAGE,
     "give --artifacts"),
    ("edit-torch-with-artifacts", EDIT_ART_IO + ["--backend", "torch"], USAGE, "with --artifacts use"),
    ("edit-model-unknown", ["edit", "--random-weights", "--model", "9b-512", "--image", "{img}", "--instruction", "x",
                            "--out", "o.png"], USAGE, "invalid choice"),
    ("edit-artifacts-missing", ["edit", "--artifacts", "{ws}/nope", "--image", "{img}", "--instruction", "x",
                                "--out", "o.png"], FAILURE, "no such folder"),
    ("edit-artifacts-not-one", ["edit", "--artifacts", "{ws}/notes", "--image", "{img}", "--instruction", "x",
                                "--out", "o.png"], FAILURE, "not an exported artifact"),
    # --- edit: ONNX Runtime's providers and the artifact's tokenizers
    ("edit-provider-unknown", EDIT_ART_IO + ["--providers", "npu"], USAGE, "unknown execution provider 'npu'"),
    ("edit-provider-option", EDIT_ART_IO + ["--providers", "openvino:mode=slow"], USAGE, "mode 'slow' is not one of"),
    ("edit-provider-syntax", EDIT_ART_IO + ["--providers", "cuda:graphs"], USAGE, "KEY=VALUE separated by commas"),
    ("edit-providers-with-torch", EDIT + ["--image", "{img}", "--out", "o.png", "--providers", "cpu"], USAGE,
     "goes with --backend onnxruntime, not torch"),
    ("edit-provider-missing", EDIT_ART_IO + ["--providers", "nv_tensorrt_rtx"], FAILURE, "nv_tensorrt_rtx"),
    ("edit-provider-graph-unknown", EDIT_ART_IO + ["--providers", "cuda:graphs=vae"], FAILURE,
     "graphs= names vae, which artifact"),
    ("edit-tokenizer-without-artifacts", EDIT + ["--image", "{img}", "--out", "o.png", "--tokenizer", "graph"], USAGE,
     "goes with --artifacts"),
    ("edit-tokenizer-unknown", EDIT_ART_IO + ["--tokenizer", "spm"], USAGE, "invalid choice"),
    ("edit-artifacts-bad-json", ["edit", "--artifacts", "{ws}/fake-art", "--image", "{img}", "--instruction", "x",
                                 "--out", "o.png"], FAILURE, "not valid JSON"),
    ("edit-checkpoint-dir-empty", ["edit", "--checkpoint-dir", "{ws}/empty-dir", "--image", "{img}", "--instruction",
                                   "x", "--out", "o.png"], FAILURE, "lacks files"),
    # --- export
    ("export-into-other-files", ["export", "--random-weights", "--model", "tiny-2b", "--out", "{ws}/notes"], FAILURE,
     "not an artifact"),
    ("export-over-artifact", ["export", "--random-weights", "--model", "tiny-2b", "--out", "{ws}/fake-art"], FAILURE,
     "add --overwrite"),
    ("export-overwrite-unlisted", ["export", "--random-weights", "--model", "tiny-2b", "--out", "{ws}/fake-art",
                                   "--overwrite"], FAILURE, "whose files it can list"),
    ("export-out-read-only", ["export", "--random-weights", "--model", "tiny-2b", "--out", "{ro}/art"], FAILURE,
     "cannot write in"),
    ("export-out-is-a-file", ["export", "--random-weights", "--model", "tiny-2b", "--out", "{ws}/a-file"], FAILURE,
     "is a file"),
    ("export-out-is-a-link", ["export", "--random-weights", "--model", "tiny-2b", "--out", "{ws}/link-to-empty"],
     FAILURE, "is a symbolic link; give the folder it points to"),
    ("export-fixture-missing", ["export", "--fixture", "{ws}/nope", "--out", "{ws}/art"], FAILURE, "no such folder"),
    ("export-not-a-fixture", ["export", "--fixture", "{ws}/notes", "--out", "{ws}/art"], FAILURE,
     "lacks transformer.safetensors, vae.safetensors"),
    ("export-fixture-and-model", ["export", "--fixture", "{fixture}", "--model", "tiny-2b", "--out", "{ws}/art"], USAGE,
     "does not apply to --fixture"),
    ("export-two-sources", ["export", "--fixture", "{fixture}", "--random-weights", "--out", "{ws}/art"], USAGE,
     "not allowed with"),
    ("export-precision", ["export", "--fixture", "{fixture}", "--precision", "int8", "--out", "{ws}/art"], USAGE,
     "invalid choice"),
    ("export-no-out", ["export", "--fixture", "{fixture}"], USAGE, "required: --out"),
    # --- build
    ("build-artifacts-missing", ["build", "--artifacts", "{ws}/nope"], FAILURE, "no such folder"),
    ("build-not-an-artifact", ["build", "--artifacts", "{ws}/notes"], FAILURE, "not an exported artifact"),
    ("build-target-sm87", ["build", "--artifacts", "{art}", "--target", "sm87"], FAILURE, "Jetson Orin is sm87"),
    ("build-workspace-negative", ["build", "--artifacts", "{art}", "--workspace", "-1"], USAGE, "positive"),
    ("build-workspace-nan", ["build", "--artifacts", "{art}", "--workspace", "nan"], USAGE, "positive"),
    ("build-precision", ["build", "--artifacts", "{art}", "--precision", "int2"], USAGE, "invalid choice"),
    ("build-quantized-precision", ["build", "--artifacts", "{art}", "--precision", "int8"], FAILURE,
     "engines are built from a quantised artifact"),
    # --- quantize
    ("quantize-nothing", ["quantize"], USAGE, "required: --artifacts, --out, --mode"),
    ("quantize-mode", ["quantize", "--artifacts", "{art}", "--out", "{ws}/q", "--mode", "int2"], USAGE, "invalid choice"),
    ("quantize-budget", ["quantize", "--artifacts", "{art}", "--out", "{ws}/q", "--mode", "int8",
                         "--min-bit-agreement", "0"], USAGE, "above 0 and at most 1"),
    ("quantize-held-out", ["quantize", "--artifacts", "{art}", "--out", "{ws}/q", "--mode", "int8", "--held-out", "0"],
     USAGE, "at least 1"),
    ("quantize-missing", ["quantize", "--artifacts", "{ws}/nope", "--out", "{ws}/q", "--mode", "int8"], FAILURE,
     "no such folder"),
    ("build-flavour", ["build", "--artifacts", "{art}", "--flavour", "trt"], USAGE, "invalid choice"),
    # --- inspect
    ("inspect-missing", ["inspect", "{ws}/nope"], FAILURE, "no such folder"),
    ("inspect-not-an-artifact", ["inspect", "{ws}/notes"], FAILURE, "not an exported artifact"),
    ("ranges-not-an-artifact", ["ranges", "--artifacts", "{ws}/notes"], FAILURE, "not an exported artifact"),
    ("inspect-bad-json", ["inspect", "{ws}/fake-art"], FAILURE, "not valid JSON"),
    ("inspect-nothing", ["inspect"], USAGE, "required: artifacts"),
    # --- plan
    ("plan-no-budget", ["plan"], USAGE, "give one of --device"),
    ("plan-two-budgets", ["plan", "--device", "orin-nx-16", "--memory-gib", "8"], USAGE, "give one of --device"),
    ("plan-device-unknown", ["plan", "--device", "orin-xx"], USAGE, "invalid choice"),
    ("plan-memory-negative", ["plan", "--memory-gib", "-4"], USAGE, "positive"),
    ("plan-text-len-zero", ["plan", "--memory-gib", "8", "--text-len", "0"], USAGE, "from 1 to 512"),
    ("plan-text-len-huge", ["plan", "--memory-gib", "8", "--text-len", "9999"], USAGE, "from 1 to 512"),
    ("plan-model-unknown", ["plan", "--memory-gib", "8", "--model", "70b"], USAGE, "invalid choice"),
    # --- parity
    ("parity-fixture-missing", ["parity", "--fixture", "{ws}/nope"], FAILURE, "no such folder"),
    ("parity-not-a-fixture", ["parity", "--fixture", "{ws}/notes"], FAILURE, "no such file"),
    ("parity-backend-unknown", ["parity", "--fixture", "{fixture}", "--backend", "tvm"], USAGE, "invalid choice"),
    ("parity-providers-with-torch", ["parity", "--fixture", "{fixture}", "--providers", "openvino"], USAGE,
     "goes with --backend onnxruntime, not torch"),
    # --- demo
    ("demo-into-other-files", ["demo", "--out", "{ws}/notes"], FAILURE, "did not write"),
    ("demo-out-read-only", ["demo", "--out", "{ro}/demo"], FAILURE, "cannot write in"),
    ("demo-out-is-a-file", ["demo", "--out", "{ws}/a-file"], FAILURE, "is a file"),
    ("demo-model-big", ["demo", "--out", "{ws}/d", "--model", "2b-512"], USAGE, "invalid choice"),
    ("demo-image-missing", ["demo", "--out", "{ws}/d", "--image", "{ws}/nope.png"], FAILURE, "no such file"),
    ("demo-image-tiny", ["demo", "--out", "{ws}/d", "--image", "{ws}/tiny.png"], FAILURE, "is 8x8 px"),
    ("demo-seed-negative", ["demo", "--seed", "-1"], USAGE, "seed must be"),
    ("demo-timed-edits-zero", ["demo", "--timed-edits", "0"], USAGE, "from 1 to 50"),
    ("demo-instruction-empty", ["demo", "--out", "{ws}/d", "--instruction", ""], FAILURE, "instruction is empty"),
    # --- serve (each fails before a port is taken)
    ("serve-artifacts-missing", ["serve", "--artifacts", "{ws}/nope"], FAILURE, "no such folder"),
    ("serve-not-an-artifact", ["serve", "--artifacts", "{ws}/notes"], FAILURE, "not an exported artifact"),
    ("serve-no-artifacts", ["serve"], USAGE, "required: --artifacts"),
    ("serve-port-huge", ["serve", "--artifacts", "{art}", "--port", "70000"], USAGE, "port number"),
    ("serve-max-batch-zero", ["serve", "--artifacts", "{art}", "--max-batch", "0"], USAGE, "at least 1"),
    ("serve-timeout-negative", ["serve", "--artifacts", "{art}", "--timeout", "-3"], USAGE, "positive"),
    ("serve-cache-nan", ["serve", "--artifacts", "{art}", "--cache-mib", "nan"], USAGE, ">= 0"),
    ("serve-backend-unknown", ["serve", "--artifacts", "{art}", "--backend", "torch"], USAGE, "invalid choice"),
    ("serve-providers-with-tensorrt", ["serve", "--artifacts", "{art}", "--backend", "tensorrt", "--providers", "cuda"],
     USAGE, "goes with --backend onnxruntime, not tensorrt"),
    # --- the program
    ("no-command", [], USAGE, "required: COMMAND"),
    ("unknown-command", ["frobnicate"], USAGE, "invalid choice"),
    ("unknown-option", ["inspect", "{art}", "--verbose"], USAGE, "unrecognized arguments"),
]


def _argv(template: list[str], ws: dict[str, str]) -> list[str]:
    return [a.format(**ws) for a in template]


@pytest.mark.parametrize("argv, code, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_error_line_and_changes_nothing(ws, capsys, argv, code, message):
    roots = (ws["ws"], ws["art"], ws["fixture"])
    before = snapshot(*roots)
    assert main(_argv(argv, ws)) == code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert snapshot(*roots) == before


def test_every_subcommand_has_cases():
    from varedit_deploy.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert commands <= {c[1][0] for c in CASES if c[1]}


def test_every_option_has_help():
    from varedit_deploy.cli import build_parser

    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        for action in sub._actions:  # noqa: SLF001
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("argv, code, message", [
    (["edit", "--artifacts", "{art}", "--image", "{img}", "--instruction", "x", "--out", "o.png", "--seed", "-5"],
     USAGE, "seed must be"),
    (EDIT + ["--image", "{ws}/huge.png", "--out", "o.png"], FAILURE, "is 10000x10000 px"),
    (EDIT + ["--image", "{ws}/bomb.png", "--out", "o.png"], FAILURE, "too large"),
    (["export", "--random-weights", "--model", "tiny-2b", "--out", "{ws}/notes"], FAILURE, "not an artifact"),
], ids=["seed", "huge-image", "bomb-image", "export-into-other-files"])
def test_a_real_process_prints_one_line_and_no_traceback(ws, argv, code, message):
    before = snapshot(ws["ws"])
    run = subprocess.run([sys.executable, "-m", "varedit_deploy.cli", *_argv(argv, ws)], capture_output=True,
                         text=True, cwd=ws["ws"])
    assert run.returncode == code
    assert run.stderr.splitlines() == [run.stderr.strip()] and run.stderr.startswith("error: "), run.stderr
    assert message in run.stderr and "Traceback" not in run.stdout + run.stderr
    assert "DecompressionBomb" not in run.stderr
    assert snapshot(ws["ws"]) == before


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "varedit_deploy.cli", "--version"], capture_output=True, text=True)
    from varedit_deploy import __version__

    assert out.returncode == 0 and out.stdout.strip() == f"varedit-deploy {__version__}"
    out = subprocess.run([sys.executable, "-m", "varedit_deploy.cli", "build", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "(default: tensorrt-rtx)" in out.stdout and "(default: for an fp32 artifact bf16" in out.stdout


def test_sigterm_mid_export_leaves_nothing_half_written(tmp_path):
    """`timeout`, `kill` and job schedulers send SIGTERM: it is handled like Ctrl-C, so the export's
    temporary folder is removed (it held a partial artifact: gigabytes at release size)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "varedit_deploy.cli", "export", "--random-weights", "--model",
                             "tiny-2b", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    until = time.monotonic() + 120
    while not any((p / "graphs").is_dir() for p in tmp_path.glob(".art.*")) and time.monotonic() < until:
        time.sleep(0.05)
    assert any(tmp_path.glob(".art.*")), "the export never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_inside_a_c_extensions_import_is_a_termination_not_a_missing_package(monkeypatch, capsys):
    """A SIGTERM landing while a C extension initialises comes back as ImportError ("initialization
    failed", caused by the interrupt: pybind11's way), which `require` words as a missing package; the
    command must still end as terminated (143), as it did under load mid-quantize in the suite."""
    import argparse
    import importlib

    from varedit_deploy import cli
    from varedit_deploy.errors import require

    def interrupted_import(name, package=None):
        try:
            raise cli.Terminated()
        except cli.Terminated as signal_raised:
            raise ImportError("initialization failed") from signal_raised

    command = argparse.ArgumentParser()  # a command whose first act is importing ONNX Runtime
    command.set_defaults(func=lambda args: require("onnxruntime", "ort"))
    monkeypatch.setattr(cli, "build_parser", lambda: command)
    monkeypatch.setattr(importlib, "import_module", interrupted_import)
    assert cli.main([]) == 143
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    monkeypatch.setattr(importlib, "import_module", lambda name, package=None: (_ for _ in ()).throw(ImportError()))
    assert cli.main([]) == 1  # a package really missing is still that
    assert "which is not installed" in capsys.readouterr().err
