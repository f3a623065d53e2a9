"""`varedit-deploy`: a thin CLI over the library; each subcommand fills arguments and calls one function.

Heavy modules (torch, onnx, onnxruntime) are imported inside the handlers, so `--help` and
the torch-free commands start fast. Every failure the user can fix ends as one line on stderr
starting with `error:`: exit 2 for options that are malformed, out of range or do not go
together (argparse's convention), exit 1 for everything else (`VareditError`, and the file
system's own errors such as a full disk). Destinations are checked before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .config import PRESETS, SAMPLING_RANGES, SamplingConfig, check_sampling_option, check_seed, sampling_range
from .errors import ConfigError, VareditError

PROG = "varedit-deploy"
DEFAULT_MODEL = "2b-512"
TINY_MODELS = [name for name in PRESETS if name.startswith("tiny-")]


class UsageError(VareditError):
    """Options that are malformed, out of range or do not go together (exit 2, as argparse's own)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' for options with a real default; not for flags or options left unset."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (one `error:` line in `main`) instead of printed with usage."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------ option values
def _value(kind: Callable[[str], object], check: Callable[[object], object]) -> Callable[[str], object]:
    """An argparse type: parse with `kind`, then apply the library's own check of the value."""
    def parse(text: str) -> object:
        try:
            return check(kind(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {'whole ' if kind is int else ''}number: {text!r}") from None
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _positive(value: object) -> object:
    if not 0 < value < float("inf"):  # type: ignore[operator]
        raise ConfigError(f"must be a positive finite number, got {value!r}")
    return value


def _text_len(value: object) -> object:
    if not 1 <= value <= 512:  # type: ignore[operator]
        raise ConfigError(f"must be from 1 to 512 (the text encoder's limit), got {value}")
    return value


def _edit_count(value: object) -> object:
    if not 1 <= value <= 50:  # type: ignore[operator]
        raise ConfigError(f"must be from 1 to 50, got {value}")
    return value


def _at_least_one(value: object) -> object:
    if value < 1:  # type: ignore[operator]
        raise ConfigError(f"must be at least 1, got {value}")
    return value


def _pixel_limit(value: object) -> object:
    """Photos are refused past MAX_SIDE a side anyway (and Pillow's bomb guard starts above MAX_SIDE^2)."""
    from .imaging import MAX_SIDE

    if not 1 <= value <= MAX_SIDE * MAX_SIDE:  # type: ignore[operator]
        raise ConfigError(f"must be from 1 to {MAX_SIDE}^2 = {MAX_SIDE * MAX_SIDE}, got {value}")
    return value


def _not_negative(value: object) -> object:
    if not 0 <= value < float("inf"):  # type: ignore[operator]
        raise ConfigError(f"must be a finite number >= 0, got {value!r}")
    return value


def _fraction(value: object) -> object:
    if not 0 < value <= 1:  # type: ignore[operator]
        raise ConfigError(f"must be above 0 and at most 1, got {value!r}")
    return value


def _port(value: object) -> object:
    if not 0 <= value <= 65535:  # type: ignore[operator]
        raise ConfigError(f"must be a port number from 0 to 65535, got {value}")
    return value


def _sampling_value(name: str) -> Callable[[str], object]:
    return _value(float, lambda v: check_sampling_option(name, v))


SEED = _value(int, check_seed)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    r = SamplingConfig()
    g = p.add_argument_group(f"sampling (default: the model's own; releases: cfg {r.cfg:g}, tau {r.tau:g}, "
                             f"top-p {r.top_p:g}, seed {r.seed})")
    g.add_argument("--cfg", type=_sampling_value("cfg"),
                   help=f"classifier-free guidance weight, {sampling_range('cfg')}; 1 turns guidance off")
    g.add_argument("--tau", type=_sampling_value("tau"), help=f"sampling temperature, {sampling_range('tau')}")
    g.add_argument("--top-p", type=_sampling_value("top_p"), dest="top_p",
                   help=f"drop a bit value whose probability is <= 1 - top_p, {sampling_range('top_p')}")
    g.add_argument("--seed", type=SEED, help="noise seed, an integer from 0 to 2**63 - 1")
    g.add_argument("--noise", choices=["torch-cpu", "numpy"],
                   help="noise source: torch-cpu replays the official CPU draws (needs torch); numpy needs no torch "
                        "(default: torch-cpu for the torch reference, numpy with --artifacts)")


def _sampling_from(args: argparse.Namespace, base: SamplingConfig) -> SamplingConfig:
    """The model's sampling defaults with the options given on the command line (already checked)."""
    return dataclasses.replace(base, **{k: getattr(args, k) for k in SAMPLING_RANGES.keys() | {"seed"}
                                        if getattr(args, k) is not None})


# ------------------------------------------------------------------ handlers
def _cmd_parity(args: argparse.Namespace) -> int:
    from .parity import check_fixture

    _check_providers(args, args.backend)
    report = check_fixture(args.fixture, args.backend, args.artifacts, providers=args.providers)
    print(report.table())
    if not report.ok:
        raise VareditError(f"{args.backend} does not reproduce {args.fixture}: see the rows marked NO above")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .imaging import check_output, load_image, save_image
    from .timings import format_timings

    _check_edit_options(args)
    if not args.instruction.strip():
        raise InputError("the instruction is empty; say what to change, e.g. 'make the sky purple'")
    check_output(args.out)
    image = load_image(args.image)
    if args.artifacts is not None:
        from .runtime.pipeline import EditPipeline
        from .runtime.registry import DEFAULT_ARTIFACT_BACKEND

        backend = args.backend or DEFAULT_ARTIFACT_BACKEND
        options = {"providers": args.providers} if args.providers else {}
        pipe = EditPipeline.from_artifacts(args.artifacts, backend=backend, verify=args.verify,
                                            tokenizer=args.tokenizer, **options)
        words = pipe.tokenizer.source if pipe.tokenizer is not None else "none (the artifact has no text encoder)"
        print(f"running on {pipe.backend.describe()}; tokenizer: {words}")
        result = pipe.edit(image, args.instruction, sampling=_sampling_from(args, pipe.config.sampling),
                           noise=args.noise or "numpy")
    else:
        result = _edit_reference(args, image)
    save_image(result.image, args.out)
    print(f"wrote {args.out}")
    print(format_timings(result.timings_ms))
    return 0


def _check_providers(args: argparse.Namespace, backend: str | None) -> None:
    if args.providers and backend != "onnxruntime":
        raise UsageError(f"--providers chooses ONNX Runtime's execution providers: it goes with --backend onnxruntime, "
                         f"not {backend or 'the default backend'}")


def _check_edit_options(args: argparse.Namespace) -> None:
    _check_providers(args, args.backend or ("onnxruntime" if args.artifacts is not None else "torch"))
    if args.tokenizer != "auto" and args.artifacts is None:
        raise UsageError("--tokenizer chooses between an artifact's tokenizers: it goes with --artifacts")
    if args.artifacts is not None:
        given = [flag for flag, value in (("--model", args.model), ("--text-precision", args.text_precision))
                 if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} do not apply to --artifacts: the artifact holds its model "
                             "and graphs (see `varedit-deploy inspect`)")
        if args.backend == "torch":
            from .runtime.registry import ARTIFACT_BACKENDS

            raise UsageError("--backend torch runs --checkpoint-dir or --random-weights; with --artifacts use "
                             f"{', '.join(ARTIFACT_BACKENDS)}")
    elif args.backend not in (None, "torch"):
        raise UsageError(f"--backend {args.backend} runs exported graphs: give --artifacts DIR (from `export`); "
                         "--checkpoint-dir and --random-weights run the torch reference")


def _edit_reference(args: argparse.Namespace, image):
    from .config import from_name
    from .model.edit import edit
    from .model.loaded import VAREditModel
    from .sampling import make_noise

    config = from_name(args.model or DEFAULT_MODEL)
    if args.random_weights:
        from .model.tiny_text import write_tiny_text_encoder

        model = VAREditModel.random(config, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            model.attach_text_encoder(write_tiny_text_encoder(tmp, config.transformer.text_channels), "fp32")
    else:
        model = VAREditModel.from_release(args.checkpoint_dir, config, text_precision=args.text_precision or "fp16")
    sampling = _sampling_from(args, config.sampling)
    return edit(model, image, args.instruction, sampling, make_noise(args.noise or "torch-cpu", sampling.seed))


def _cmd_export(args: argparse.Namespace) -> int:
    import shlex

    from .export.artifacts import export_artifacts
    from .export.destination import check_export_target

    if args.fixture is not None and args.model is not None:
        raise UsageError("--model does not apply to --fixture: the fixture's config.json holds its model")
    check_export_target(args.out, args.overwrite)  # before loading anything
    command = "varedit-deploy " + " ".join(shlex.quote(a) for a in args.argv)
    with tempfile.TemporaryDirectory() as text_dir:
        export_artifacts(_export_source(args, Path(text_dir)), args.out, precision=args.precision,
                         source={"command": command}, overwrite=args.overwrite, attention=args.attention)
    return 0


def _export_source(args: argparse.Namespace, text_dir: Path):
    """What --checkpoint-dir/--fixture/--random-weights name, read lazily: release files
    memory-mapped, random weights drawn tensor by tensor in the export precision (a tiny T5 in
    `text_dir`)."""
    from .config import from_name
    from .export.source import ExportSource
    from .model.loaded import VAREditModel

    if args.fixture is not None:
        return ExportSource.from_model(VAREditModel.from_fixture(args.fixture))
    config = from_name(args.model or DEFAULT_MODEL)
    if args.checkpoint_dir is not None:
        return ExportSource.from_release(args.checkpoint_dir, config)
    from .model.tiny_text import write_tiny_text_encoder

    text_folder = write_tiny_text_encoder(text_dir, config.transformer.text_channels)
    return ExportSource.random(config, seed=0, text_folder=text_folder, precision=args.precision)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .errors import ArtifactError
    from .inspection import inspect_artifact

    lines, intact = inspect_artifact(args.artifacts)
    print("\n".join(lines))
    if not intact:
        raise ArtifactError(f"artifact {args.artifacts} has problems: see the PROBLEM lines above")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, args.model, args.image, args.instruction, args.seed, args.timed_edits)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from .builder.engines import BuildOptions, build_engines

    defaults = BuildOptions()
    flavour = args.flavour or defaults.flavour
    precision = args.precision or "bf16 for fp32 graphs where the target has it (else fp16), or the artifact's"
    targets = args.target or ([defaults.target] if flavour == "tensorrt-rtx" else ["current"])
    chosen = [("flavour", flavour, args.flavour), ("target", " ".join(targets), args.target),
              ("precision", precision, args.precision)]
    print("build: " + ", ".join(f"{name} {value}{'' if given else ' (default)'}" for name, value, given in chosen))
    for target in targets:
        opts = BuildOptions(flavour=flavour, precision=args.precision, target=target, workspace_gib=args.workspace,
                            weight_streaming=args.weight_streaming, timing_cache=args.timing_cache,
                            strip_weights=args.strip_weights, strict_fp16=args.strict_fp16)
        print(f"building {flavour} engines for {target}")
        build_engines(args.artifacts, opts)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import shlex

    from .calibration.quantize import QuantizeOptions, quantize_artifacts

    names = ("mode", "method", "high_precision", "min_bit_agreement", "calibration", "calibration_edits", "held_out",
             "fixture", "kv_cache", "samples_per_scale", "calibration_scales", "report_scales")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.exclude is not None:
        given["exclude"] = tuple(args.exclude)
    opts = QuantizeOptions(**given, search=not args.no_search, stream=True if args.stream else None)
    quantize_artifacts(args.artifacts, args.out, opts,
                       command="varedit-deploy " + " ".join(shlex.quote(a) for a in args.argv))
    return 0


def _cmd_ranges(args: argparse.Namespace) -> int:
    from .calibration.ranges import record_ranges

    record_ranges(args.artifacts, args.calibration, args.edits, args.fixture)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .config import from_name
    from .errors import InputError
    from .memory_plan import DEVICES, artifact_data, artifact_table, plan_data, plan_table

    if args.artifacts is not None:
        from .artifact import read_manifest

        manifest = read_manifest(args.artifacts, verify="size")
        engines = args.engines or sorted(p.parent for p in (manifest.folder / "engines").glob("*/engines.json"))
        missing = [str(e) for e in engines if not (e / "engines.json").is_file()]
        if missing:
            raise InputError(f"no engines.json in {', '.join(missing)} (build engines with `varedit-deploy build`)")
        data = artifact_data(manifest, engines, args.workspace, args.text_len, kv8=args.kv_cache == "int8")
        print(json.dumps(data, indent=1) if args.json else artifact_table(data))
        return 0
    if (args.device is None) == (args.memory_gib is None):
        raise UsageError(f"give one of --device ({', '.join(DEVICES)}) or --memory-gib N")
    data = plan_data(from_name(args.model), args.device, args.memory_gib, args.workspace, args.text_len)
    print(json.dumps(data, indent=1) if args.json else plan_table(data))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    # The server's own numpy work (previews, resizes) is small; a multi-threaded BLAS next to ONNX
    # Runtime's thread pool oversubscribes the cores (measured: a preview 66 ms instead of 2 ms on a
    # busy 2-core machine). Set before numpy is first imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .runtime.registry import DEFAULT_ARTIFACT_BACKEND
    from .serve.options import ServeOptions
    from .serve.server import serve

    _check_providers(args, args.backend or DEFAULT_ARTIFACT_BACKEND)
    given = {k: v for k, v in vars(args).items() if k in ServeOptions.__dataclass_fields__ and v is not None}
    for key in ("cors_origins", "providers"):
        if key in given:
            given[key] = tuple(given[key])
    if args.max_upload_mib is not None:
        given["max_upload_bytes"] = int(args.max_upload_mib * 2**20)
    if args.cache_mib is not None:
        given["text_cache_bytes"] = given["image_cache_bytes"] = int(args.cache_mib * 2**20)
    given.setdefault("api_key", os.environ.get("VAREDIT_API_KEY") or None)
    return serve(ServeOptions(**given), log_level=args.log_level)


# ------------------------------------------------------------------ parser
def _provider_args(p: argparse.ArgumentParser) -> None:
    from .runtime.providers import PROVIDERS, parse_provider

    p.add_argument("--providers", nargs="+", metavar="PROVIDER", type=_value(str, parse_provider),
                   help="with --backend onnxruntime: its execution providers in order, each NAME[:KEY=VALUE,...]; "
                        f"names {', '.join(PROVIDERS)}; e.g. openvino:mode=exact (fp32) or openvino:mode=fast "
                        "(bf16), tensorrt:cache_dir=DIR (README, 'Execution providers'; default: cpu)")


def _model_source_args(p: argparse.ArgumentParser, third: tuple[str, str]) -> None:
    src = p.add_argument_group("model source (exactly one)").add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint-dir", type=Path, help="release folder with the official .pth files and flan-t5-xl/")
    src.add_argument(third[0], type=Path, help=third[1])
    src.add_argument("--random-weights", action="store_true",
                     help="random weights of --model with a tiny T5: a pipeline check, not a trained model")
    p.add_argument("--model", choices=list(PRESETS), metavar="MODEL",
                   help=f"model preset with --checkpoint-dir or --random-weights: {', '.join(PRESETS)} "
                        f"(default: {DEFAULT_MODEL})")


def _add_parity(sub) -> None:
    from .runtime.registry import ARTIFACT_BACKENDS, MODEL_BACKENDS

    p = sub.add_parser("parity", help="reproduce a golden fixture of the official code and report the differences")
    p.add_argument("--fixture", required=True, type=Path, help="fixture folder (config.json, *.safetensors)")
    p.add_argument("--backend", default="torch", choices=[*MODEL_BACKENDS, *ARTIFACT_BACKENDS],
                   help="torch (the reference), torch-fast (the fused-kernel fast path, fp32), or the exported "
                        f"graphs on {', '.join(ARTIFACT_BACKENDS)}")
    p.add_argument("--artifacts", type=Path, help="replay this export of the fixture (e.g. a quantised one) "
                                                  "instead of exporting it afresh")
    _provider_args(p)
    p.set_defaults(func=_cmd_parity)


def _add_edit(sub) -> None:
    from .imaging import MAX_SIDE, MIN_SIDE, OUTPUT_FORMATS
    from .runtime.registry import ARTIFACT_BACKENDS
    from .runtime.tokenizer import TOKENIZERS

    p = sub.add_parser("edit", help="edit a photo with an instruction")
    _model_source_args(p, ("--artifacts", "exported artifact folder (see `export`)"))
    p.add_argument("--backend", choices=["torch", *ARTIFACT_BACKENDS],
                   help="torch (the reference: --checkpoint-dir, --random-weights), or with --artifacts: "
                        f"{', '.join(ARTIFACT_BACKENDS)} (default: torch, or onnxruntime with --artifacts)")
    p.add_argument("--text-precision", choices=["fp16", "bf16", "fp32"],
                   help="T5 precision with --checkpoint-dir: fp16 keeps the FFN output in fp32, as official "
                        "(default: fp16)")
    p.add_argument("--verify", default="quick", choices=["size", "quick", "full"],
                   help="artifact check before loading: quick (sizes, and each large file's sha256 once, then "
                        "trusted while unchanged), full (every sha256 now) or size")
    _provider_args(p)
    p.add_argument("--tokenizer", default="auto", choices=TOKENIZERS,
                   help="with --artifacts: the artifact's tokenizer graph (ONNX Runtime + onnxruntime-extensions), "
                        "its tokenizer.json (tokenizers), or auto: the graph where onnxruntime-extensions is installed")
    p.add_argument("--image", required=True, type=Path,
                   help=f"photo to edit (png, jpg, webp, ...; {MIN_SIDE} to {MAX_SIDE} px on each side)")
    p.add_argument("--instruction", required=True, help="what to change, e.g. 'make the sky purple'")
    p.add_argument("--out", required=True, type=Path,
                   help=f"edited image to write, at the photo's size ({', '.join(OUTPUT_FORMATS)})")
    _sampling_args(p)
    p.set_defaults(func=_cmd_edit)


def _add_export(sub) -> None:
    from .graph_io import ATTENTION_FORMS
    from .precisions import GRAPH_PRECISIONS

    p = sub.add_parser("export", help="export a model to a folder of ONNX graphs with a manifest")
    _model_source_args(p, ("--fixture", "fixture folder (no T5: the artifact starts at text_cond)"))
    p.add_argument("--out", required=True, type=Path,
                   help="artifact folder to write: new or empty, or an artifact to replace with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the artifact in --out (keeps built engines whose graphs do not change)")
    p.add_argument("--precision", default="fp32", choices=GRAPH_PRECISIONS,
                   help="graph precision; fp32 graphs can also be lowered when engines are built")
    p.add_argument("--attention", default="fused", choices=ATTENTION_FORMS,
                   help="the step's attentions: fused (ONNX Attention, opset 23: one fused layer each in TensorRT "
                        ">= 10.14 and TensorRT-RTX), decomposed (MatMul-Softmax-MatMul, opset 17: for older "
                        "TensorRT such as JetPack 6's 10.3) or plugin (fused, each self-attention our Triton "
                        "kernel as a TensorRT plugin; TensorRT only, not ONNX Runtime)")
    p.set_defaults(func=_cmd_export)


def _add_build(sub) -> None:
    from .builder.engines import RTX_TARGETS, BuildOptions
    from .precisions import ENGINE_PRECISIONS

    p = sub.add_parser("build", help="build TensorRT / TensorRT-RTX engines from an artifact")
    p.add_argument("--artifacts", required=True, type=Path,
                   help="artifact folder (from `export`); engines go to its engines/ folder")
    p.add_argument("--flavour", choices=["tensorrt", "tensorrt-rtx"],
                   help="tensorrt-rtx builds ahead of time on any machine; tensorrt builds on the GPU that runs "
                        f"the engines (default: {BuildOptions.flavour})")
    p.add_argument("--precision", choices=ENGINE_PRECISIONS,
                   help="engine precision (default: for an fp32 artifact bf16 where the target has it, sm80 on, else "
                        "fp16; the stored precision of an fp16/bf16 artifact; the mode of a quantised one)")
    p.add_argument("--target", nargs="+", metavar="TARGET",
                   help=f"GPU targets: for tensorrt-rtx one or more of {' '.join(RTX_TARGETS)}; for tensorrt "
                        f"'current' (default: {BuildOptions.target} for tensorrt-rtx, current for tensorrt)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file to read and update")
    p.add_argument("--workspace", type=_value(float, _positive), help="workspace limit in GiB (default: TensorRT's)")
    p.add_argument("--weight-streaming", action="store_true",
                   help="build with weight streaming (part of the weights may stay in host memory)")
    p.add_argument("--strict-fp16", action="store_true",
                   help="refuse an fp16 build of fp32 graphs whose range record (`varedit-deploy ranges`) has values "
                        "beyond fp16's safe range, listing them (default: keep those nodes fp32)")
    p.add_argument("--strip-weights", action="store_true",
                   help="weight-stripped, refittable engines: the weights ship once, in the artifact, and the runtime "
                        "refits each engine from its graph file at load (the artifact's precision must be the engines')")
    p.set_defaults(func=_cmd_build)


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantise an artifact (INT8, FP8, INT4 weight-only) from calibrated Q/DQ, with "
                                        "an accuracy report; release sizes and 16-bit sources are streamed")
    p.add_argument("--artifacts", required=True, type=Path,
                   help="artifact folder (see `export`): fp32, or at release size fp32, fp16 or bf16")
    p.add_argument("--out", required=True, type=Path, help="quantised artifact folder to write (replaced atomically)")
    p.add_argument("--mode", required=True, choices=["int8", "fp8", "int4"],
                   help="int8: W8A8; fp8: E4M3 weights and activations; int4: block-wise weight-only")
    p.add_argument("--method", help="calibration: int8 entropy (default) or max; fp8 max; int4 awq_clip (default), "
                                    "awq_lite or rtn_dq")
    p.add_argument("--high-precision", choices=["fp16", "fp32", "bf16"],
                   help="what is not quantised is stored in (default fp16 from fp32 artifacts, else the artifact's own)")
    p.add_argument("--exclude", nargs="*", metavar="PATTERN",
                   help="layer groups to keep in high precision, as regular expressions over names like "
                        "blocks.3.fc2 (default: the recipe's; with no pattern: none)")
    p.add_argument("--min-bit-agreement", type=_value(float, _fraction),
                   help="teacher-forced bit agreement the sensitivity search must reach (default 0.99)")
    p.add_argument("--no-search", action="store_true", help="quantise every candidate group, no sensitivity search")
    p.add_argument("--calibration", type=Path,
                   help="folder of photos with instructions.txt, or a CSV image,instruction[,split] "
                        "(default: photos from scikit-image and the bundled sample x 32 instructions)")
    p.add_argument("--calibration-edits", type=_value(int, _at_least_one),
                   help="use only the first N calibration edits (streamed: 4 by default)")
    p.add_argument("--held-out", type=_value(int, _at_least_one),
                   help="use only the first N held-out edits (streamed: 2 by default)")
    p.add_argument("--samples-per-scale", type=_value(int, _at_least_one), help="recorded inputs per graph and input shape (default 8)")
    p.add_argument("--fixture", type=Path, help="for artifacts exported from a golden fixture (no text encoder): "
                                                "its text features stand in for every instruction")
    p.add_argument("--kv-cache", choices=["int8"], help="an 8-bit KV cache with per-channel scales")
    p.add_argument("--stream", action="store_true",
                   help="quantise graph by graph, one weight in memory at a time (rtn_dq/max, no search): the default "
                        "for graphs over 2 GiB and 16-bit artifacts")
    p.add_argument("--calibration-scales", type=_value(int, _at_least_one),
                   help="streamed: calibrate on the first N scales of each edit (default all; whole release edits take "
                        "minutes each on a CPU)")
    p.add_argument("--report-scales", type=_value(int, _not_negative),
                   help="streamed: compare the first N scales with the source (default all; 0: no comparison)")
    p.set_defaults(func=_cmd_quantize)


def _add_ranges(sub) -> None:
    from .calibration.ranges import DEFAULT_EDITS

    p = sub.add_parser("ranges", help="record every tensor's largest value in the fp32 graphs on real edits, so that "
                                      "fp16 builds keep out-of-range nodes fp32")
    p.add_argument("--artifacts", required=True, type=Path,
                   help="fp32 artifact folder: the record goes into it (engines built before become stale)")
    p.add_argument("--calibration", type=Path,
                   help="folder of photos with instructions.txt, or a CSV image,instruction[,split] (default: the "
                        "calibration photos and instructions `quantize` uses)")
    p.add_argument("--edits", type=_value(int, _at_least_one), default=DEFAULT_EDITS,
                   help="calibration edits to run (a release model's edit takes minutes on a CPU)")
    p.add_argument("--fixture", type=Path, help="for artifacts exported from a golden fixture (no text encoder): "
                                                "its text features stand in for every instruction")
    p.set_defaults(func=_cmd_ranges)


def _add_plan(sub) -> None:
    from .memory_plan import DEVICES

    p = sub.add_parser("plan", help="memory plan per precision for a device (e.g. Jetson) or a memory size")
    p.add_argument("--model", default="8b-512", choices=list(PRESETS), metavar="MODEL",
                   help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--device", choices=list(DEVICES), metavar="DEVICE", help=f"one of {', '.join(DEVICES)}")
    p.add_argument("--memory-gib", type=_value(float, _positive), help="memory available to the process, GiB")
    p.add_argument("--workspace", type=_value(float, _positive), default=1.0, help="TensorRT workspace in GiB")
    p.add_argument("--text-len", type=_value(int, _text_len), default=77, help="instruction tokens to plan for, 1-512")
    p.add_argument("--artifacts", type=Path, help="an exported artifact: what it and its engines really hold, "
                                                  "beside the estimate")
    p.add_argument("--engines", type=Path, nargs="+", help="engine folders to report (default: ARTIFACTS/engines/*)")
    p.add_argument("--kv-cache", choices=["int8"], help="with --artifacts: also its weights with an 8-bit KV cache "
                                                        "(what `quantize --kv-cache int8` would run with)")
    p.add_argument("--json", action="store_true", help="print the table as JSON (`rows`: one object per precision)")
    p.set_defaults(func=_cmd_plan)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show what an artifact holds and verify every file's size and sha256")
    p.add_argument("artifacts", type=Path, help="artifact folder (from `export`), engines included")
    p.set_defaults(func=_cmd_inspect)


def _add_serve(sub) -> None:
    from .imaging import MAX_SIDE
    from .runtime.registry import ARTIFACT_BACKENDS, DEFAULT_ARTIFACT_BACKEND

    p = sub.add_parser("serve", help="serve edits over HTTP: OpenAI-style POST /v1/images/edits (needs [serve])",
                       description="An OpenAI Images API compatible edit server; see docs/serving.md. "
                                   "Defaults are in varedit_deploy/serve/options.py.")
    p.add_argument("--artifacts", required=True, help="exported artifact folder (see `export`)")
    p.add_argument("--backend", choices=list(ARTIFACT_BACKENDS), help=f"default {DEFAULT_ARTIFACT_BACKEND}")
    _provider_args(p)
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=_value(int, _port), help="default 8000")
    p.add_argument("--api-key", dest="api_key",
                   help="require 'Authorization: Bearer KEY' on /v1/* (or set VAREDIT_API_KEY)")
    p.add_argument("--model-name", dest="model_name", help="model id in /v1/models (default varedit-<preset>)")
    p.add_argument("--workers", type=_value(int, _at_least_one), help="pipelines, one per device (TensorRT: GPUs 0..N-1); default 1")
    p.add_argument("--max-batch", dest="max_batch", type=_value(int, _at_least_one), help="edits per pipeline call (default 1)")
    p.add_argument("--batch-window-ms", dest="batch_window_ms", type=_value(float, _not_negative),
                   help="how long a worker waits to fill a batch (default 5)")
    p.add_argument("--max-queue", dest="max_queue", type=_value(int, _at_least_one), help="edits waiting before 429 (default 64)")
    p.add_argument("--timeout", dest="timeout_s", type=_value(float, _positive), help="per-request deadline in s (default 300)")
    p.add_argument("--max-upload-mib", dest="max_upload_mib", type=_value(float, _positive), help="request body limit (default 20)")
    p.add_argument("--max-pixels", dest="max_pixels", type=_value(int, _pixel_limit),
                   help=f"source image pixel limit, at most {MAX_SIDE}^2 (default 4096^2)")
    p.add_argument("--cache-mib", dest="cache_mib", type=_value(float, _not_negative),
                   help="size of each of the T5 and VAE-encoder caches (default 64; 0 turns them off)")
    p.add_argument("--cors-origin", dest="cors_origins", action="append",
                   help="allow browser calls from this origin (repeatable; default: no CORS)")
    p.add_argument("--no-ui", dest="ui", action="store_const", const=False,
                   help="no playground page at GET / (default: serve it)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="how much the server logs")
    p.set_defaults(func=_cmd_serve)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a small model, export it, edit a real photo on ONNX Runtime")
    p.add_argument("--out", type=Path, default=Path("demo-output"),
                   help="output folder: new, empty, or a previous demo's")
    p.add_argument("--model", default=TINY_MODELS[0], choices=TINY_MODELS, help="small built-in model")
    p.add_argument("--image", type=Path, help="photo to edit (default: the bundled VAREdit sample)")
    p.add_argument("--instruction", default="make the sky purple", help="what to change")
    p.add_argument("--seed", type=SEED, default=0, help="noise seed, an integer from 0 to 2**63 - 1")
    p.add_argument("--timed-edits", type=_value(int, _edit_count), default=5,
                   help="edits timed on each side after one warm-up each, 1-50")
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Deploy VAREdit: reference, export, runtime.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_parity, _add_edit, _add_export, _add_build, _add_quantize, _add_ranges, _add_plan, _add_inspect,
                _add_serve, _add_demo):
        add(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a job scheduler), raised like Ctrl-C so that half-written output is
    removed on the way out (atomic folders and files clean up on any exception)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _interruption(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind an error, if any. One that lands inside a C extension's import comes
    back as an ImportError (pybind11's "initialization failed", caused by it), which `require` then words
    as a missing package; the interrupt is what happened."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _os_error(e: OSError) -> str:
    """One line for a refusal of the file system; a full disk says what to do (every write is atomic, so
    what the command had written so far is gone again)."""
    text = f"{e.filename}: " if e.filename else ""
    text += str(e.strerror or e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; free some space and run it again (the partial output was removed)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        try:
            args = build_parser().parse_args(argv)
            args.argv = argv
            return int(args.func(args))
        except (VareditError, OSError, MemoryError) as e:
            interrupt = _interruption(e)
            if interrupt is None:
                raise
            raise interrupt from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VareditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system's own refusals (disk full, permissions) that no check foresaw
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory; try a smaller model or free memory", file=sys.stderr)
        return 1
    except Terminated:
        print("error: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
