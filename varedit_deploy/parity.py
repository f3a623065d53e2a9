"""Fixture parity: reproduce a golden fixture of the official code and report every difference.

Teacher forcing: each scale's logits are computed from the fixture's earlier bits, so the
comparison isolates one scale at a time (RNG streams cannot be matched across
implementations, logits can). The sampled bits are still drawn with the fixture seed's
official CPU noise and must all agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig, load_fixture_config
from .errors import ConfigError
from .imaging import to_uint8

LOGIT_TOL = 2e-4  # max |dlogit| / max |logit|
PIXEL_TOL = 1e-4  # max |d decoded| in [-1, 1] units
FEATURE_TOL = 1e-4  # relative, VAE encoder output and source prefix
CODES_TOL = 1e-5  # absolute, summed codes


@dataclass
class ScaleRow:
    scale: int
    side: int
    logit_err: float
    logit_max: float
    bits_total: int
    bits_differ: int

    @property
    def rel(self) -> float:
        return self.logit_err / max(self.logit_max, 1e-30)

    @property
    def ok(self) -> bool:
        return self.rel <= LOGIT_TOL and self.bits_differ == 0


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
            )
        lines.append(f"{'tensor':<16} {'error':>10} {'kind':>9} {'tolerance':>10}  ok")
        for t in self.tensors:
            kind = "relative" if t.relative else "absolute"
            lines.append(f"{t.name:<16} {t.value:>10.3e} {kind:>9} {t.tol:>10.1e}  {'yes' if t.ok else 'NO'}")
        lines.append(f"final image (uint8): max difference {self.image_lsb} LSB (information; decoded pixels gate)")
        lines.append(f"verdict: {'PASS' if self.ok else 'FAIL'} (tolerances: logits {LOGIT_TOL:g} relative, "
                     f"0 differing bits, decoded pixels {PIXEL_TOL:g})")
        return "\n".join(lines)


@dataclass
class FixtureData:
    folder: Path
    config: ModelConfig
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]

    @classmethod
    def load(cls, folder: str | Path) -> "FixtureData":
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"fixture {folder}: no such folder")
        config = load_fixture_config(folder / "config.json")
        data = {}
        for name in ("inputs", "expected"):
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise ConfigError(f"fixture {folder} lacks {path.name}")
            data[name] = load_file(str(path))
        return cls(folder, config, data["inputs"], data["expected"])

    @property
    def text_features(self) -> np.ndarray:
        lt = int(self.inputs["text_lens"][0])
        return self.inputs["text_features"][:lt][None].astype(np.float32)

    def teacher_bits(self) -> list[np.ndarray]:
        """The fixture's bits per scale in token layout [1, n, d_tok] (what the sampler emitted)."""
        d_tok = self.config.transformer.d_tok
        return [self.expected[f"sampled_{s}"].reshape(1, -1, d_tok) for s in range(self.config.schedule.num_scales)]


def _max_abs(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


@dataclass
class FixtureRun:
    """What a backend produced for a fixture under teacher forcing."""

    raw_features: np.ndarray | None  # None where a backend only has the prefix
    source_prefix: np.ndarray
    guided_logits: list[np.ndarray]  # per scale [n * d_tok, 2]
    bits: list[np.ndarray]  # per scale, sampled with the fixture seed's official noise
    summed: np.ndarray  # [1, d, H, W]
    decoded: np.ndarray  # [1, 3, S, S]


def compare(fixture: FixtureData, run: FixtureRun, backend: str) -> ParityReport:
    exp = fixture.expected
    report = ParityReport(str(fixture.folder), backend)
    for s, side in enumerate(fixture.config.schedule.sides):
        ref = exp[f"logits_{s}"].reshape(-1, 2)
        got = run.guided_logits[s].reshape(-1, 2)
        ref_bits = exp[f"sampled_{s}"].reshape(-1)
        got_bits = run.bits[s].reshape(-1)
        report.scales.append(ScaleRow(
            s, side, _max_abs(got - ref), _max_abs(ref), ref_bits.size, int(np.sum(got_bits != ref_bits))
        ))
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
        raw = model.vae.encoder(torch.from_numpy(fixture.inputs["source_tensor"][None]))
        prefix = latent_to_tokens(raw, cfg.transformer.patchify)
        teacher = [torch.from_numpy(b) for b in fixture.teacher_bits()]
        gen = generate(model, torch.from_numpy(fixture.text_features), prefix,
                       SamplerInputs.from_params(cfg.sampling), TorchCPUNoise(cfg.sampling.seed), teacher)
        decoded = model.vae.decoder(gen.summed)
    return FixtureRun(
        raw.numpy(), prefix.numpy(), [r.guided_logits.numpy() for r in gen.scales],
        [r.bits.numpy() for r in gen.scales], gen.summed.numpy(), decoded.numpy(),
    )


def run_exported(fixture: FixtureData, backend: str, artifacts: str | Path | None = None) -> FixtureRun:
    """Export the fixture's model (or take `artifacts`, exported from it and perhaps quantised) and
    replay it on `backend` under teacher forcing (exported here: fp32 graphs, and TensorRT backends
    first build fp32 engines for this GPU; given: its graphs and the engines built for it)."""
    import tempfile

    from .artifact import read_manifest
    from .export.artifacts import export_artifacts
    from .model.loaded import VAREditModel
    from .runtime.pipeline import EditPipeline
    from .sampling import SamplerInputs, TorchCPUNoise

    cfg = fixture.config
    with tempfile.TemporaryDirectory() as tmp:
        options = {}
        if artifacts is not None:
            folder = Path(artifacts)
            if read_manifest(folder).config.to_dict() != cfg.to_dict():
                raise ConfigError(f"artifact {folder} is not an export of fixture {fixture.folder} (model configs differ)")
        else:
            folder = export_artifacts(VAREditModel.from_fixture(fixture.folder), Path(tmp) / "artifact",
                                      source={"fixture": str(fixture.folder)}, progress=lambda _: None)
        if backend in ("tensorrt", "tensorrt-rtx") and artifacts is None:
            from .build.engines import BuildOptions, build_engines
            from .runtime.gpu import current_compute_capability

            target = current_compute_capability() if backend == "tensorrt-rtx" else "current"
            build_engines(folder, BuildOptions(flavour=backend, precision="fp32", target=target),
                          progress=lambda _: None)
            options = {"precision": "fp32"}
        pipe = EditPipeline.from_artifacts(folder, backend=backend, **options)
        prefix = pipe.encode_image(fixture.inputs["source_tensor"][None])
        loop = pipe.loop.run(fixture.text_features, prefix, SamplerInputs.from_params(cfg.sampling),
                             TorchCPUNoise(cfg.sampling.seed), fixture.teacher_bits())
        decoded = pipe.decode(loop.summed)
        read = pipe.backend.read
        run = FixtureRun(None, read(prefix), loop.guided_logits, loop.bits, read(loop.summed), decoded)
        pipe.close()
    return run


BACKENDS = ("torch", "onnxruntime", "tensorrt", "tensorrt-rtx")


def check_fixture(folder: str | Path, backend: str = "torch", artifacts: str | Path | None = None) -> ParityReport:
    """`artifacts`: replay that artifact (an export of this fixture, perhaps quantised) instead of exporting."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown parity backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if artifacts is not None and backend == "torch":
        raise ConfigError("--artifacts replays an exported artifact: choose --backend onnxruntime, tensorrt or tensorrt-rtx")
    fixture = FixtureData.load(folder)
    run = run_reference(fixture) if backend == "torch" else run_exported(fixture, backend, artifacts)
    label = backend
    if artifacts is not None:
        from .artifact import read_manifest

        quant = read_manifest(artifacts, verify=False).quantization
        label += f" on {artifacts}" + (f" ({quant['mode']} {quant['method']}, {quant['high_precision']} elsewhere)"
                                       if quant else "")
    return compare(fixture, run, label)
