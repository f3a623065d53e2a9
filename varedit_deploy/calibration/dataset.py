"""Calibration sets: (photo, instruction) pairs, split into pairs to calibrate on and held-out pairs to report on.

The default set uses real photos that installed packages really contain (scikit-image's
astronaut, coffee, chelsea and rocket, and the bundled VAREdit sample) and the 32 instructions
of `instructions.json` (add, remove, replace, colour, style, background). Held-out pairs use
photos and instructions that calibration never sees. A user set is a folder of photos with an
`instructions.txt` (one instruction per line), or a CSV with `image,instruction[,split]` columns.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError, require
from ..imaging import SAMPLE_PHOTO, load_image

INSTRUCTIONS = Path(__file__).with_name("instructions.json")
CALIBRATION_PHOTOS = ("skimage:astronaut", "skimage:coffee", "skimage:chelsea")
HELD_OUT_PHOTOS = ("skimage:rocket", "bundled:sample.jpg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
HELD_OUT_EVERY = 4  # user sets without a split column: every 4th pair is held out


@dataclass(frozen=True)
class EditPair:
    image: str  # a file path, "skimage:<name>" or "bundled:sample.jpg"
    instruction: str
    kind: str = "user"  # edit type of the default set

    def load(self) -> Image.Image:
        if self.image.startswith("skimage:"):
            data = require("skimage.data", "quant", "scikit-image")
            return Image.fromarray(getattr(data, self.image.split(":", 1)[1])())
        if self.image == "bundled:sample.jpg":
            return load_image(SAMPLE_PHOTO)
        return load_image(self.image)


@dataclass(frozen=True)
class CalibrationSet:
    calibration: tuple[EditPair, ...]
    held_out: tuple[EditPair, ...]
    source: str  # "default" or the folder / CSV it was read from

    def limited(self, calibration: int | None, held_out: int | None) -> "CalibrationSet":
        """The first `calibration` and `held_out` pairs (None: all), e.g. for quick checks."""
        for name, n in (("--calibration-edits", calibration), ("--held-out", held_out)):
            if n is not None and n < 1:
                raise InputError(f"{name} must be at least 1, got {n}")
        return CalibrationSet(self.calibration[:calibration], self.held_out[:held_out], self.source)

    def sha256(self) -> str:
        """Hash of every pair's pixels and instruction, in order: what the manifest records."""
        h = hashlib.sha256()
        for split, pairs in (("calibration", self.calibration), ("held_out", self.held_out)):
            for pair in pairs:
                pixels = np.asarray(pair.load(), np.uint8)
                h.update(f"{split}\0{pair.instruction}\0{pixels.shape}\0".encode())
                h.update(pixels.tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        return f"{self.source}: {len(self.calibration)} calibration and {len(self.held_out)} held-out edits"


def default_set() -> CalibrationSet:
    entries = json.loads(INSTRUCTIONS.read_text())["instructions"]
    calib = [e for e in entries if not e.get("held_out")]
    held = [e for e in entries if e.get("held_out")]
    return CalibrationSet(
        tuple(EditPair(CALIBRATION_PHOTOS[i % len(CALIBRATION_PHOTOS)], e["text"], e["kind"]) for i, e in enumerate(calib)),
        tuple(EditPair(HELD_OUT_PHOTOS[i % len(HELD_OUT_PHOTOS)], e["text"], e["kind"]) for i, e in enumerate(held)),
        "default",
    )


def load_set(path: str | Path | None) -> CalibrationSet:
    """The default set (None), a folder of photos with instructions.txt, or a CSV; checked before any work."""
    if path is None:
        return default_set()
    path = Path(path)
    if path.is_dir():
        pairs = _folder_pairs(path)
        split = [(i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) for i in range(len(pairs))]
    elif path.is_file():
        pairs, split = _csv_pairs(path)
    else:
        raise InputError(f"calibration set {path}: no such folder or CSV file")
    for pair in pairs:  # an unreadable photo fails here, not halfway through calibration
        pair.load()
    calib = tuple(p for p, held in zip(pairs, split) if not held)
    held = tuple(p for p, h in zip(pairs, split) if h)
    if not calib or not held:
        raise InputError(f"calibration set {path} has {len(calib)} calibration and {len(held)} held-out pairs; "
                         "it needs at least one of each (give at least 2 pairs, or a split column)")
    return CalibrationSet(calib, held, str(path))


def _instruction_lines(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"instruction list {path} cannot be read ({e})") from None
    while lines and not lines[-1].strip():  # a trailing newline is not a blank instruction
        lines.pop()
    if not lines:
        raise InputError(f"instruction list {path} is empty; write one instruction per line")
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise InputError(f"instruction list {path} has blank lines ({', '.join(map(str, blank[:5]))}); "
                         "write one instruction per line, none empty")
    return [line.strip() for line in lines]


def _folder_pairs(folder: Path) -> list[EditPair]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"calibration set {folder} has no photos ({', '.join(IMAGE_SUFFIXES)})")
    listing = folder / "instructions.txt"
    if not listing.is_file():
        raise InputError(f"calibration set {folder} has no instructions.txt (one instruction per line)")
    instructions = _instruction_lines(listing)
    n = max(len(images), len(instructions))
    return [EditPair(str(images[i % len(images)]), instructions[i % len(instructions)]) for i in range(n)]


def _csv_pairs(path: Path) -> tuple[list[EditPair], list[bool]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"calibration CSV {path} cannot be read ({e})") from None
    if not rows:
        raise InputError(f"calibration CSV {path} has no rows (columns: image,instruction[,split])")
    missing = {"image", "instruction"} - set(rows[0])
    if missing:
        raise InputError(f"calibration CSV {path} lacks the column(s) {', '.join(sorted(missing))} "
                         f"(it has {', '.join(rows[0])}); columns: image,instruction[,split]")
    pairs, split = [], []
    for i, row in enumerate(rows, 2):  # line 1 is the header
        image, text = (row.get("image") or "").strip(), (row.get("instruction") or "").strip()
        if not image or not text:
            raise InputError(f"calibration CSV {path}, line {i}: empty {'image' if not image else 'instruction'}")
        where = (row.get("split") or "").strip() or ("held_out" if (i - 2) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
                                                 else "calibration")
        if where not in ("calibration", "held_out"):
            raise InputError(f"calibration CSV {path}, line {i}: split must be calibration or held_out, not {where!r}")
        pairs.append(EditPair(str((path.parent / image) if not Path(image).is_absolute() else image), text))
        split.append(where == "held_out")
    return pairs, split
