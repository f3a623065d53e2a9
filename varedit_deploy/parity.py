"""Fixture parity: reproduce a golden fixture of the official code and report every difference.

Teacher forcing: each scale's logits are computed from the fixture's earlier bits, so the
comparison isolates one scale at a time (RNG streams cannot be matched across
implementations, logits can). The sampled bits are still drawn with the fixture seed's
official CPU noise and must agree, except where the official draw was a near-tie: a bit whose
official sampling margin (`sampling_margin`) is below the logit tolerance can be flipped by a
correct float32 implementation, so such a bit is reported as explained; any other fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ConfigError
from .fixtures import FixtureData
from .imaging import to_uint8
from .runtime.registry import ARTIFACT_BACKENDS, MODEL_BACKENDS

LOGIT_TOL = 2e-4  # max |dlogit| / max |logit|
PIXEL_TOL = 1e-4  # max |d decoded| in [-1, 1] units
FEATURE_TOL = 1e-4  # relative, VAE encoder output and source prefix
CODES_TOL = 1e-5  # absolute, summed codes


def sampling_margin(logits: np.ndarray, noise: np.ndarray, drop_threshold: float) -> np.ndarray:
    """How far each official draw is from turning over, in logit units, per row of [R, 2].

    The official sampler (fixtures README "Sampling") draws bit 1 iff p1 / E1 > p0 / E0, unless
    top-p dropped a value (p <= drop_threshold). With D = l1 - l0 that is: bit 1 iff
    D > clip(log E1 - log E0, -T, T), T = log((1 - drop_threshold) / drop_threshold). Moving the
    two logits by m in opposite directions moves D by 2m, so the smallest change of the logits
    (largest absolute change of any one) that flips the draw is |D - flip point| / 2.
    """
    lg = np.asarray(logits, np.float64).reshape(-1, 2)
    e = np.asarray(noise, np.float64).reshape(-1, 2)
    thr = float(drop_threshold)
    t = np.inf if thr <= 0 else np.log((1.0 - thr) / thr)
    flip_point = np.clip(np.log(e[:, 1]) - np.log(e[:, 0]), -t, t)
    return np.abs(lg[:, 1] - lg[:, 0] - flip_point) / 2


@dataclass
class ScaleRow:
    scale: int
    side: int
    logit_err: float
    logit_max: float
    bits_total: int
    bits_differ: int
    bits_explained: int = 0  # differing bits whose official margin is below the logit tolerance
    worst_margin: float = 0.0  # the largest official margin among the explained ones

    @property
    def rel(self) -> float:
        return self.logit_err / max(self.logit_max, 1e-30)

    @property
    def logit_tol(self) -> float:
        """The absolute logit tolerance at every position of this scale."""
        return LOGIT_TOL * self.logit_max

    @property
    def ok(self) -> bool:
        return self.rel <= LOGIT_TOL and self.bits_differ == self.bits_explained


@dataclass
class TensorRow:
    name: str
    err: float
    ref: float
    tol: float
    relative: bool

    @property
    def value(self) -> float:
        return self.err / max(self.ref, 1e-30) if self.relative else self.err

    @property
    def ok(self) -> bool:
        return self.value <= self.tol


@dataclass
class ParityReport:
    fixture: str
    backend: str
    scales: list[ScaleRow] = field(default_factory=list)
    tensors: list[TensorRow] = field(default_factory=list)
    image_lsb: int = 0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.scales) and all(t.ok for t in self.tensors)

    def table(self) -> str:
        lines = [
            f"parity: fixture {self.fixture}, backend {self.backend}",
            f"{'scale':>5} {'side':>4} {'max|dlogit|':>12} {'max|logit|':>11} {'ratio':>9} {'bits differ':>14}  ok",
        ]
        for r in self.scales:
            lines.append(
                f"{r.scale:>5} {r.side:>4} {r.logit_err:>12.3e} {r.logit_max:>11.3e} {r.rel:>9.2e} "
                f"{r.bits_differ:>6}/{r.bits_total:<7}  {'yes' if r.ok else 'NO'}"
                + (f"  ({r.bits_explained} near-tie, margin <= {r.worst_margin:.1e} < tolerance {r.logit_tol:.1e})"
                   if r.bits_explained else "")
            )
        lines.append(f"{'tensor':<16} {'error':>10} {'kind':>9} {'tolerance':>10}  ok")
        for t in self.tensors:
            kind = "relative" if t.relative else "absolute"
            lines.append(f"{t.name:<16} {t.value:>10.3e} {kind:>9} {t.tol:>10.1e}  {'yes' if t.ok else 'NO'}")
        lines.append(f"final image (uint8): max difference {self.image_lsb} LSB (information; decoded pixels gate)")
        explained = sum(r.bits_explained for r in self.scales)
        lines.append(f"near-ties: {explained} differing bit(s) whose official sampling margin is below the logit "
                     f"tolerance (explained); any other differing bit fails")
        lines.append(f"verdict: {'PASS' if self.ok else 'FAIL'} (tolerances: logits {LOGIT_TOL:g} relative, "
                     f"no unexplained differing bit, decoded pixels {PIXEL_TOL:g})")
        return "\n".join(lines)


def _max_abs(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


@dataclass
class FixtureRun:
    """What a backend produced for a fixture under teacher forcing."""

    raw_features: np.ndarray | None  # None where a backend only has the prefix
    source_prefix: np.ndarray
    guided_logits: list[np.ndarray]  # per scale [n * d_tok, 2]
    bits: list[np.ndarray]  # per scale, sampled with the fixture seed's official noise
    summed: np.ndarray | None  # [1, d, H, W]; None after only the first scales
    decoded: np.ndarray | None  # [1, 3, S, S]; likewise


def official_noise(config: ModelConfig) -> list[np.ndarray]:
    """The Exp(1) noise the official sampler drew at every scale ([n_s * d_tok, 2]) for the config's seed."""
    from .sampling import TorchCPUNoise

    noise = TorchCPUNoise(config.sampling.seed)
    return [noise.draw(n * config.transformer.d_tok) for n in config.schedule.tokens]


def compare(fixture: FixtureData, run: FixtureRun, backend: str) -> ParityReport:
    from .sampling import SamplerInputs

    exp = fixture.expected
    report = ParityReport(str(fixture.folder), backend)
    threshold = float(SamplerInputs.from_params(fixture.config.sampling).drop_threshold[0])
    noise = official_noise(fixture.config)
    for s, side in enumerate(fixture.config.schedule.sides):
        ref = exp[f"logits_{s}"].reshape(-1, 2)
        got = run.guided_logits[s].reshape(-1, 2)
        ref_bits = exp[f"sampled_{s}"].reshape(-1)
        differ = run.bits[s].reshape(-1) != ref_bits
        row = ScaleRow(s, side, _max_abs(got - ref), _max_abs(ref), ref_bits.size, int(np.sum(differ)))
        if row.bits_differ:
            margins = sampling_margin(ref[differ], noise[s][differ], threshold)
            near = margins[margins < row.logit_tol]
            row.bits_explained, row.worst_margin = int(near.size), float(near.max()) if near.size else 0.0
        report.scales.append(row)
    pairs = [
        ("source_prefix", run.source_prefix, exp["source_prefix"], FEATURE_TOL, True),
        ("summed_codes", run.summed, exp["summed_codes"][:, :, 0], CODES_TOL, False),
        ("decoded", run.decoded, exp["decoded"], PIXEL_TOL, False),
    ]
    if run.raw_features is not None:
        pairs.insert(0, ("raw_features", run.raw_features, exp["raw_features"], FEATURE_TOL, True))
    for name, got, ref, tol, relative in pairs:
        if got.shape != ref.shape:
            raise AssertionError(f"{name}: shape {got.shape}, fixture {ref.shape}")
        report.tensors.append(TensorRow(name, _max_abs(got - ref), _max_abs(ref), tol, relative))
    ours_bgr = to_uint8(run.decoded)[..., ::-1].astype(np.int32)
    report.image_lsb = int(np.max(np.abs(ours_bgr - exp["image_uint8_bgr"][0].astype(np.int32))))
    return report


def run_reference(fixture: FixtureData) -> FixtureRun:
    """The PyTorch reference under teacher forcing."""
    import torch

    from .model.codes import latent_to_tokens
    from .model.edit import generate
    from .model.loaded import VAREditModel
    from .sampling import SamplerInputs, TorchCPUNoise

    model = VAREditModel.from_fixture(fixture.folder)
    cfg = fixture.config
    with torch.inference_mode():
        raw = model.vae.encoder(torch.from_numpy(fixture.pixels))
        prefix = latent_to_tokens(raw, cfg.transformer.patchify)
        teacher = [torch.from_numpy(b) for b in fixture.teacher_bits()]
        gen = generate(model, torch.from_numpy(fixture.text_features), prefix,
                       SamplerInputs.from_params(cfg.sampling), TorchCPUNoise(cfg.sampling.seed), teacher)
        decoded = model.vae.decoder(gen.summed)
    return FixtureRun(
        raw.numpy(), prefix.numpy(), [r.guided_logits.numpy() for r in gen.scales],
        [r.bits.numpy() for r in gen.scales], gen.summed.numpy(), decoded.numpy(),
    )


def run_exported(fixture: FixtureData, backend: str, artifacts: str | Path | None = None,
                 providers: list | None = None) -> FixtureRun:
    """Export the fixture's model (or take `artifacts`, exported from it and perhaps quantised) and
    replay it on `backend` under teacher forcing (exported here: fp32 graphs, and TensorRT backends
    first build fp32 engines for this GPU; given: its graphs and the engines built for it);
    `providers`: ONNX Runtime's execution providers (runtime/providers.py). The
    export skips its per-graph comparison with torch: this replay against the official tensors is
    the stronger check, and at 1024 px the comparison doubles the export time."""
    import tempfile

    from .artifact import read_manifest
    from .export.artifacts import export_artifacts
    from .model.loaded import VAREditModel
    from .runtime.pipeline import EditPipeline
    from .sampling import TorchCPUNoise

    cfg = fixture.config
    with tempfile.TemporaryDirectory() as tmp:
        options = {}
        if artifacts is not None:
            folder = Path(artifacts)
            if read_manifest(folder).config != cfg:
                raise ConfigError(f"artifact {folder} is not an export of fixture {fixture.folder} (model configs differ)")
        else:
            folder = export_artifacts(VAREditModel.from_fixture(fixture.folder), Path(tmp) / "artifact",
                                      source={"fixture": str(fixture.folder)}, progress=lambda _: None,
                                      validate=False)
        if backend in ("tensorrt", "tensorrt-rtx") and artifacts is None:
            from .builder.engines import BuildOptions, build_engines
            from .runtime.gpu import current_compute_capability

            target = current_compute_capability() if backend == "tensorrt-rtx" else "current"
            build_engines(folder, BuildOptions(flavour=backend, precision="fp32", target=target),
                          progress=lambda _: None)
            options = {"precision": "fp32"}
        if providers:
            options["providers"] = providers
        pipe = EditPipeline.from_artifacts(folder, backend=backend, **options)
        try:
            run = pipe.generate(text_features=fixture.text_features, pixels=fixture.pixels, sampling=cfg.sampling,
                                noise=TorchCPUNoise(cfg.sampling.seed), teacher_bits=fixture.teacher_bits())
        finally:
            pipe.close()
    return FixtureRun(None, run.source_prefix, run.guided_logits, run.bits, run.summed, run.decoded)


def run_fast_path(fixture: FixtureData, scales: int | None = None, cuda_graphs: bool | None = None) -> FixtureRun:
    """The torch fast path (preallocated caches, fused Triton kernels) in fp32 under teacher forcing:
    compiled on a GPU (TF32 off: the fixtures are fp32), in Triton's CPU interpreter elsewhere.
    `scales` runs only the first scales (summed codes and image are then not produced); `cuda_graphs`
    False runs each graph's Python once, in order (a capture runs it twice: warm-up, then capture)."""
    import contextlib
    import os

    import torch

    from .model.loaded import VAREditModel
    from .sampling import TorchCPUNoise

    cuda = torch.cuda.is_available()
    if not cuda:  # read when the kernels are defined, so before the fast path is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .runtime.pipeline import EditPipeline

    cfg = fixture.config
    pipe = EditPipeline.from_model(VAREditModel.from_fixture(fixture.folder), device="cuda" if cuda else "cpu",
                                   dtype=torch.float32, cuda_graphs=cuda_graphs)
    exact = torch.backends.cudnn.flags(enabled=True, allow_tf32=False) if cuda else contextlib.nullcontext()
    try:
        with exact:
            run = pipe.generate(text_features=fixture.text_features, pixels=fixture.pixels, sampling=cfg.sampling,
                                noise=TorchCPUNoise(cfg.sampling.seed), teacher_bits=fixture.teacher_bits(),
                                scales=scales)
    finally:
        pipe.close()
    return FixtureRun(None, run.source_prefix, run.guided_logits, run.bits, run.summed if scales is None else None,
                      run.decoded)


BACKENDS = tuple(MODEL_BACKENDS) + tuple(ARTIFACT_BACKENDS)


def check_fixture(folder: str | Path, backend: str = "torch", artifacts: str | Path | None = None,
                  providers: list | None = None) -> ParityReport:
    """`artifacts`: replay that artifact (an export of this fixture, perhaps quantised) instead of exporting;
    `providers`: ONNX Runtime's execution providers, with backend onnxruntime."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown parity backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if artifacts is not None and backend in ("torch", "torch-fast"):
        raise ConfigError("--artifacts replays an exported artifact: choose --backend onnxruntime, tensorrt or tensorrt-rtx")
    if providers and backend != "onnxruntime":
        raise ConfigError(f"execution providers are ONNX Runtime's: they go with backend onnxruntime, not {backend}")
    fixture = FixtureData.load(folder)
    if backend == "torch":
        run = run_reference(fixture)
    elif backend == "torch-fast":
        run = run_fast_path(fixture)
    else:
        run = run_exported(fixture, backend, artifacts, providers)
    label = backend + (f" ({', '.join(str(p) for p in providers)})" if providers else "")
    if artifacts is not None:
        from .artifact import read_manifest

        quant = read_manifest(artifacts, verify="none").quantization
        label += f" on {artifacts}" + (f" ({quant['mode']} {quant['method']}, {quant['high_precision']} elsewhere)"
                                       if quant else "")
    return compare(fixture, run, label)
