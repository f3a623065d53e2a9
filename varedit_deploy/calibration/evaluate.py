"""How far a lower-precision artifact is from fp32 on held-out edits: bits, logits and images.

Teacher forcing isolates each scale: the artifact under test is fed the fp32 run's bits and the
same noise, so a scale's bits differ only where that scale's logits moved enough to flip a draw.
Free running (its own bits fed back) gives the images a user would see, compared by PSNR and
SSIM. Artifacts without a text encoder (exported from a golden fixture) take the fixture's text
features for every instruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifact import Manifest
from ..errors import InputError, require
from ..fixtures import FixtureData
from ..imaging import postprocess
from ..runtime.pipeline import EditPipeline
from ..sampling import NumpyNoise
from .dataset import EditPair


@dataclass(frozen=True)
class TextSource:
    """Where an instruction's T5 features come from: the artifact's text encoder, or fixed features."""

    fixed: np.ndarray | None = None  # [1, Lt, Ct5]
    origin: str = "the artifact's text encoder"

    def conditioning(self, instruction: str) -> dict[str, object]:
        """`EditPipeline.generate`'s conditioning argument for `instruction`."""
        return {"text_features": self.fixed} if self.fixed is not None else {"instruction": instruction}


@dataclass
class EditRun:
    pair: EditPair
    seed: int
    bits: list[np.ndarray]  # per scale [1, n, d_tok]
    logits: list[np.ndarray]  # per scale guided logits [n * d_tok, 2]
    features: np.ndarray  # host copies of what the loop was fed
    prefix: np.ndarray
    image: np.ndarray | None = None  # HxWx3 uint8 at the photo's size


def text_source(manifest: Manifest, fixture: Path | None) -> TextSource:
    """Where the instructions' T5 features come from: the artifact's text encoder, or (an artifact exported
    from a golden fixture, which has none) that fixture's features for every instruction."""
    if manifest.has_graph("text_encoder"):
        if fixture is not None:
            raise InputError("--fixture gives text features to artifacts without a text encoder; this one has one")
        return TextSource()
    if fixture is None:
        raise InputError(f"artifact {manifest.folder} has no text encoder (it was exported from a fixture); "
                         "pass --fixture DIR to calibrate with that fixture's text features")
    data = FixtureData.load(fixture)
    if data.config != manifest.config:
        raise InputError(f"fixture {fixture} is a {data.config.name} model; artifact {manifest.folder} is "
                         f"{manifest.config.name}")
    return TextSource(data.text_features, f"the fixture's one instruction ({fixture}) for every pair")


def run_edit(pipe: EditPipeline, text: TextSource, pair: EditPair, seed: int, teacher: EditRun | None = None,
             reuse_inputs: bool = False, decode: bool = True, scales: int | None = None) -> EditRun:
    """One edit with numpy noise of `seed`; `teacher` feeds its bits back (and, with `reuse_inputs`,
    its text features and source prefix) instead of this pipeline's own. `scales`: only the first
    scales (no image), where whole edits cost too much."""
    decode = decode and scales is None
    photo = pair.load()
    if reuse_inputs and teacher is not None:
        inputs = {"text_features": teacher.features, "source_prefix": teacher.prefix}
    else:
        inputs = {**text.conditioning(pair.instruction), "photo": photo}
    run = pipe.generate(**inputs, noise=NumpyNoise(seed), teacher_bits=teacher.bits if teacher is not None else None,
                        scales=scales, decode=decode)
    image = np.asarray(postprocess(run.decoded, photo.size)) if decode else None
    return EditRun(pair, seed, run.bits, run.guided_logits, run.text_features, run.source_prefix, image)


def reference_runs(pipe: EditPipeline, text: TextSource, pairs) -> list[EditRun]:
    """Free-running edits of the held-out pairs (seed = position): what the others are compared with."""
    return [run_edit(pipe, text, pair, seed) for seed, pair in enumerate(pairs)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class Agreement:
    """Teacher-forced agreement with the reference, per scale, summed over the held-out edits."""

    same_bits: list[int] = field(default_factory=list)
    bits: list[int] = field(default_factory=list)
    kl_sum: list[float] = field(default_factory=list)  # sum over bit rows of KL(reference || tested)

    def add(self, ref: EditRun, got: EditRun) -> None:
        if not self.bits:
            n = len(ref.bits)
            self.same_bits, self.bits, self.kl_sum = [0] * n, [0] * n, [0.0] * n
        for s, (a, b, la, lb) in enumerate(zip(ref.bits, got.bits, ref.logits, got.logits)):
            self.same_bits[s] += int(np.sum(a == b))
            self.bits[s] += a.size
            p, q = _log_softmax(la), _log_softmax(lb)
            self.kl_sum[s] += float(np.sum(np.exp(p) * (p - q)))

    @property
    def per_scale(self) -> list[float]:
        return [s / n for s, n in zip(self.same_bits, self.bits)]

    @property
    def overall(self) -> float:
        return sum(self.same_bits) / sum(self.bits)

    @property
    def per_scale_kl(self) -> list[float]:
        """Mean KL divergence per sampled bit (nats)."""
        return [k / n for k, n in zip(self.kl_sum, self.bits)]


def teacher_forced(pipe: EditPipeline, text: TextSource, refs: list[EditRun], reuse_inputs: bool) -> Agreement:
    agreement = Agreement()
    for ref in refs:
        agreement.add(ref, run_edit(pipe, text, ref.pair, ref.seed, teacher=ref, reuse_inputs=reuse_inputs,
                                    decode=False))
    return agreement


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    metrics = require("skimage.metrics", "quant", "scikit-image")
    return float(metrics.structural_similarity(a, b, channel_axis=2, data_range=255))


def image_scores(images: list[np.ndarray], against: list[np.ndarray]) -> dict[str, float]:
    """Mean PSNR (dB; identical pairs count as 100 dB) and SSIM of `images` against `against`."""
    psnrs = [min(psnr(a, b), 100.0) for a, b in zip(images, against)]
    return {"psnr_db": float(np.mean(psnrs)), "ssim": float(np.mean([ssim(a, b) for a, b in zip(images, against)]))}
