"""`varedit-deploy`: a thin CLI over the library; each subcommand fills arguments and calls one function.

Heavy modules (torch, onnx, onnxruntime) are imported inside the handlers, so `--help` and
the torch-free commands start fast. A `VareditError` becomes a one-line message and exit 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import VareditError


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's own)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance weight")
    g.add_argument("--tau", type=float, help="temperature (> 0)")
    g.add_argument("--seed", type=int, help="noise seed")
    g.add_argument("--top-p", type=float, dest="top_p", help="drop a bit value whose probability is <= 1 - top_p")
    g.add_argument("--noise", choices=["torch-cpu", "numpy"], default=None,
                   help="noise source (torch-cpu replays the official CPU draws)")


def _sampling_from(args: argparse.Namespace, base):
    import dataclasses

    from .errors import InputError

    updates = {k: getattr(args, k) for k in ("cfg", "tau", "seed", "top_p") if getattr(args, k) is not None}
    if updates.get("tau", 1.0) <= 0:
        raise InputError(f"--tau must be positive, got {updates['tau']}")
    if not 0.0 < updates.get("top_p", 0.5) <= 1.0:
        raise InputError(f"--top-p must be in (0, 1], got {updates['top_p']}")
    return dataclasses.replace(base, **updates)


def _cmd_parity(args: argparse.Namespace) -> int:
    from .parity import check_fixture

    report = check_fixture(args.fixture, args.backend, args.artifacts)
    print(report.table())
    return 0 if report.ok else 1


def _cmd_edit(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .imaging import load_image, save_image

    if not args.instruction.strip():
        raise InputError("the instruction is empty; say what to change, e.g. 'make the sky purple'")
    image = load_image(args.image)
    if args.artifacts is not None:
        from .runtime.pipeline import EditPipeline

        pipe = EditPipeline.from_artifacts(args.artifacts, backend=args.backend or "onnxruntime")
        sampling = _sampling_from(args, pipe.config.sampling)
        result = pipe.edit(image, args.instruction, sampling=sampling, noise=args.noise or "numpy")
    else:
        result = _edit_reference(args, image)
    save_image(result.image, args.out)
    print(f"wrote {args.out}")
    _print_timings(result.timings)
    return 0


def _edit_reference(args: argparse.Namespace, image):
    from .config import from_name
    from .errors import InputError
    from .model.edit import edit
    from .model.loaded import VAREditModel
    from .sampling import make_noise

    if args.backend not in (None, "torch"):
        raise InputError("--checkpoint-dir/--random-weights run the torch reference; use --artifacts for "
                         f"the {args.backend} backend")
    config = from_name(args.model)
    if args.random_weights:
        from .model.tiny_text import write_tiny_text_encoder

        model = VAREditModel.random(config, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            model.attach_text_encoder(write_tiny_text_encoder(tmp, config.transformer.text_channels), "fp32")
    elif args.checkpoint_dir is not None:
        model = VAREditModel.from_release(args.checkpoint_dir, config, text_precision=args.text_precision)
    else:
        raise InputError("say where the model comes from: --checkpoint-dir DIR, --artifacts DIR or --random-weights")
    sampling = _sampling_from(args, config.sampling)
    noise = make_noise(args.noise or "torch-cpu", sampling.seed)
    return edit(model, image, args.instruction, sampling, noise)


def _load_model_for(args: argparse.Namespace):
    """The model named by --checkpoint-dir/--fixture/--random-weights (exactly one)."""
    from .config import from_name
    from .errors import InputError
    from .model.loaded import VAREditModel

    chosen = [x for x in (args.checkpoint_dir, args.fixture, args.random_weights or None) if x is not None]
    if len(chosen) != 1:
        raise InputError("give exactly one model source: --checkpoint-dir DIR, --fixture DIR or --random-weights")
    if args.fixture is not None:
        return VAREditModel.from_fixture(args.fixture)
    config = from_name(args.model)
    if args.checkpoint_dir is not None:
        return VAREditModel.from_release(args.checkpoint_dir, config, text_precision="fp32")
    from .model.tiny_text import write_tiny_text_encoder

    model = VAREditModel.random(config, seed=0)
    text_dir = args.out.parent / f".{args.out.name}.t5"
    model.attach_text_encoder(write_tiny_text_encoder(text_dir, config.transformer.text_channels), "fp32")
    return model


def _cmd_export(args: argparse.Namespace) -> int:
    import shlex
    import shutil

    from .export.artifacts import export_artifacts

    model = _load_model_for(args)
    command = "varedit-deploy " + " ".join(shlex.quote(a) for a in args.argv)
    try:
        export_artifacts(model, args.out, precision=args.precision, source={"command": command})
    finally:
        shutil.rmtree(args.out.parent / f".{args.out.name}.t5", ignore_errors=True)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .artifact import read_manifest

    manifest = read_manifest(args.artifacts, verify=False)
    data = manifest.data
    cfg = manifest.config
    sched = data["schedule"]
    print(f"artifact {manifest.folder}")
    print(f"  model {cfg.name}: depth {cfg.transformer.depth}, width {cfg.transformer.dim}, "
          f"{cfg.transformer.heads} heads, {cfg.transformer.d_tok} bits/token, {sched['image_size']} px, "
          f"{len(sched['sides'])} scales {sched['sides']}")
    print(f"  precision {data['precision']}, exported by {data['exporter']}")
    quant = manifest.quantization
    if quant is not None:
        groups = len(quant["quantized_groups"]) + len(quant["kept_in_high_precision"]) + len(quant["excluded_groups"])
        print(f"  quantised {quant['mode']} ({quant['method']}), {quant['high_precision']} elsewhere, KV cache "
              f"{manifest.kv_cache_dtype}: {len(quant['quantized_groups'])} of {groups} layer groups; "
              f"accuracy report {quant['report']}")
    print(f"  {'graph':<14} {'MB':>9} {'ops':>5}  TensorRT-unsupported")
    for name, g in manifest.graphs.items():
        mb = sum(f["bytes"] for f in g["files"]) / 1e6
        print(f"  {name:<14} {mb:>9.2f} {sum(g['ops'].values()):>5}  {', '.join(g['tensorrt_unsupported_ops']) or '-'}")
    tok = data.get("tokenizer", {}).get("files", [])
    print(f"  tokenizer: {', '.join(f['path'] for f in tok) or 'none (fixture export: starts at text_cond)'}")
    from .build.engines import describe_engine_set

    for engine_set in sorted((manifest.folder / "engines").glob("*/engines.json")):
        print("\n".join("  " + line for line in describe_engine_set(engine_set.parent)))
    problems = manifest.verify(full=True)
    if problems:
        print("DAMAGED: " + "; ".join(problems))
        return 1
    print(f"complete and intact ({len(manifest.all_files())} files, sha256 verified)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, args.model, args.image, args.instruction, args.seed if args.seed is not None else 0)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from .build.engines import BuildOptions, build_engines

    for target in args.target:
        opts = BuildOptions(flavour=args.flavour, precision=args.precision, target=target,
                            workspace_gib=args.workspace, weight_streaming=args.weight_streaming,
                            timing_cache=args.timing_cache)
        print(f"building {args.flavour} engines for {target}, {args.precision}")
        build_engines(args.artifacts, opts)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import shlex

    from .calibration.quantize import QuantizeOptions, quantize_artifacts

    names = ("mode", "method", "high_precision", "min_bit_agreement", "calibration", "calibration_edits", "held_out",
             "fixture", "kv_cache", "samples_per_scale")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.exclude is not None:
        given["exclude"] = tuple(args.exclude)
    opts = QuantizeOptions(**given, search=not args.no_search)
    quantize_artifacts(args.artifacts, args.out, opts,
                       command="varedit-deploy " + " ".join(shlex.quote(a) for a in args.argv))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .build.memory_plan import DEVICES, plan_table
    from .config import from_name
    from .errors import InputError

    if (args.device is None) == (args.memory_gib is None):
        raise InputError(f"give --device ({', '.join(DEVICES)}) or --memory-gib N")
    print(plan_table(from_name(args.model), args.device, args.memory_gib, args.workspace, args.text_len))
    return 0


def _print_timings(timings: dict[str, float]) -> None:
    print(f"{'stage':<16} {'ms':>10}")
    for name, sec in timings.items():
        print(f"{name:<16} {sec * 1e3:>10.1f}")


def _model_source_args(p: argparse.ArgumentParser, third: tuple[str, str]) -> None:
    src = p.add_argument_group("model source (one of)")
    src.add_argument("--checkpoint-dir", type=Path, help="release folder with the official .pth files and flan-t5-xl/")
    src.add_argument(third[0], type=Path, help=third[1])
    src.add_argument("--random-weights", action="store_true", help="random weights of --model, with a tiny T5")
    p.add_argument("--model", default="2b-512", help="model preset: 2b-512, 8b-512, 8b-1024, tiny-2b, tiny-8b")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varedit-deploy", description="Deploy VAREdit: reference, export, runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="reproduce a golden fixture of the official code and report the differences")
    p.add_argument("--fixture", required=True, type=Path, help="fixture folder (config.json, *.safetensors)")
    p.add_argument("--backend", default="torch", help="torch (reference), onnxruntime, tensorrt, tensorrt-rtx")
    p.add_argument("--artifacts", type=Path, help="replay this export of the fixture (e.g. a quantised one) "
                                                  "instead of exporting it afresh")
    p.set_defaults(func=_cmd_parity)

    p = sub.add_parser("edit", help="edit a photo with an instruction")
    _model_source_args(p, ("--artifacts", "exported artifact folder (see `export`)"))
    p.add_argument("--backend", help="torch (the reference; the default with --checkpoint-dir or --random-weights), "
                                     "or with --artifacts: onnxruntime (default), tensorrt, tensorrt-rtx")
    p.add_argument("--text-precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="T5 precision (fp16 with fp32 FFN output, as official)")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", required=True, type=Path)
    _sampling_args(p)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("export", help="export a model to a folder of ONNX graphs with a manifest")
    _model_source_args(p, ("--fixture", "fixture folder (no T5: the artifact starts at text_cond)"))
    p.add_argument("--out", required=True, type=Path, help="artifact folder to write (replaced atomically)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="graph precision (default fp32; engines can also be lowered at build time)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("build", help="build TensorRT / TensorRT-RTX engines from an artifact")
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--flavour", default="tensorrt-rtx", choices=["tensorrt", "tensorrt-rtx"])
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8", "fp8", "int4"],
                   help="engine precision (default: fp16 for an fp32 artifact, the stored precision of an fp16/bf16 "
                        "one, the quantisation mode of a quantised one)")
    p.add_argument("--target", nargs="+", default=["sm89"],
                   help="SM targets for tensorrt-rtx (sm75 sm80 sm86 sm89 sm120 sm121); 'current' for tensorrt")
    p.add_argument("--timing-cache", type=Path, help="timing cache file to read and update")
    p.add_argument("--workspace", type=float, help="workspace limit in GiB")
    p.add_argument("--weight-streaming", action="store_true", help="build with weight streaming enabled")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("quantize", help="quantise an fp32 artifact (INT8, FP8, INT4 weight-only) from calibrated "
                                        "Q/DQ, with a sensitivity search and an accuracy report")
    p.add_argument("--artifacts", required=True, type=Path, help="fp32 artifact folder (see `export`)")
    p.add_argument("--out", required=True, type=Path, help="quantised artifact folder to write (replaced atomically)")
    p.add_argument("--mode", required=True, choices=["int8", "fp8", "int4"],
                   help="int8: W8A8; fp8: E4M3 weights and activations; int4: block-wise weight-only")
    p.add_argument("--method", help="calibration: int8 entropy (default) or max; fp8 max; int4 awq_clip (default), "
                                    "awq_lite or rtn_dq")
    p.add_argument("--high-precision", choices=["fp16", "fp32"],
                   help="what is not quantised is stored in (default fp16)")
    p.add_argument("--exclude", nargs="*", metavar="PATTERN",
                   help="layer groups to keep in high precision, as regular expressions over names like "
                        "blocks.3.fc2 (default: the recipe's; with no pattern: none)")
    p.add_argument("--min-bit-agreement", type=float,
                   help="teacher-forced bit agreement the sensitivity search must reach (default 0.99)")
    p.add_argument("--no-search", action="store_true", help="quantise every candidate group, no sensitivity search")
    p.add_argument("--calibration", type=Path,
                   help="folder of photos with instructions.txt, or a CSV image,instruction[,split] "
                        "(default: photos from scikit-image and the bundled sample x 32 instructions)")
    p.add_argument("--calibration-edits", type=int, help="use only the first N calibration edits")
    p.add_argument("--held-out", type=int, help="use only the first N held-out edits")
    p.add_argument("--samples-per-scale", type=int, help="recorded inputs per graph and input shape (default 8)")
    p.add_argument("--fixture", type=Path, help="for artifacts exported from a golden fixture (no text encoder): "
                                                "its text features stand in for every instruction")
    p.add_argument("--kv-cache", choices=["int8"], help="an 8-bit KV cache with per-channel scales")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("plan", help="memory plan per precision for a device (e.g. Jetson) or a memory size")
    p.add_argument("--model", default="8b-512")
    p.add_argument("--device", help="orin-agx-64, orin-agx-32, orin-nx-16, orin-nano-8, thor-128, ...")
    p.add_argument("--memory-gib", type=float, help="memory available to the process")
    p.add_argument("--workspace", type=float, default=1.0, help="TensorRT workspace in GiB (default 1)")
    p.add_argument("--text-len", type=int, default=77, help="instruction tokens to plan for (default 77)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("inspect", help="show what an artifact holds and verify every file's hash")
    p.add_argument("artifacts", type=Path)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("demo", help="build a small model, export it, edit a real photo on ONNX Runtime")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    p.add_argument("--model", default="tiny-2b", help="tiny-2b or tiny-8b")
    p.add_argument("--image", type=Path, help="photo to edit (default: the bundled VAREdit sample)")
    p.add_argument("--instruction", default="make the sky purple")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args))
    except VareditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
