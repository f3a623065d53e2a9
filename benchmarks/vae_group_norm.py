"""The VAE's GroupNorm at 1024 px: float32 accuracy on ONNX Runtime, and its fp16 TensorRT-RTX placement.

    python benchmarks/vae_group_norm.py [--artifacts ART] [--target sm89]

1. One GroupNorm over 32 groups of 1024 x 1024 values (the first level of a 1024-px VAE),
   exported the way nn.GroupNorm exports (InstanceNormalization) and the way model/vae.py's
   `group_norm` does, run on ONNX Runtime's CPU provider and in torch (nn.GroupNorm runs
   torch's fused kernel), compared with float64 `F.group_norm` and timed (median of 5).
2. With `--artifacts` (any exported artifact, e.g. `varedit-deploy export --fixture
   ../shared/fixtures/tiny-8b-1024 --out ART`) and tensorrt_rtx installed: the VAE graphs
   lowered to fp16 (build/precision.py) and parsed into a strongly typed network; the layers
   inside the GroupNorm scopes by type and output type, next to the convolutions; then the
   engines built for `--target` (`varedit-deploy build ... --precision fp16`).
Writes benchmarks/results/vae_group_norm.md.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def ort_accuracy() -> list[str]:
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    from varedit_deploy.model.vae import GroupNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 1024, 1024, generator=g) * 3 + 1.5
    ours = GroupNorm(32, 32, eps=1e-6).requires_grad_(False)
    ours.weight.copy_(torch.randn(32, generator=g))
    ours.bias.copy_(torch.randn(32, generator=g))
    plain = torch.nn.GroupNorm(32, 32, eps=1e-6).requires_grad_(False)
    plain.load_state_dict(ours.state_dict())
    ref = F.group_norm(x.double(), 32, ours.weight.double(), ours.bias.double(), eps=1e-6).numpy()
    rows = ["| form | exported as | ORT CPU vs float64 (max abs) | torch vs float64 (max abs) | ORT ms | torch ms |",
            "|---|---|---:|---:|---:|---:|"]
    for name, module in (("nn.GroupNorm", plain), ("model/vae.py group_norm", ours)):
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), buf, opset_version=17, dynamo=False, input_names=["x"])
            eager = module(x).double().numpy()
            torch_ms = _median_ms(lambda: module(x))
        import onnx

        ops = sorted({n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node} - {"Constant", "Shape"})
        session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.numpy()})[0]
        ort_ms = _median_ms(lambda: session.run(None, {"x": x.numpy()}))
        rows.append(f"| {name} | {', '.join(ops)} | {np.abs(got - ref).max():.2e} | {np.abs(eager - ref).max():.2e} "
                    f"| {ort_ms:.0f} | {torch_ms:.0f} |")
    return rows


def _median_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[repeats // 2]


def rtx_placement(artifacts: Path, target: str) -> list[str]:
    import onnx

    from varedit_deploy.artifact import read_manifest
    from varedit_deploy.builder.engines import BuildOptions, build_engines
    from varedit_deploy.export.precision import to_half
    from varedit_deploy.builder.tensorrt_api import make_logger, strongly_typed_network
    from varedit_deploy.runtime.tensorrt_import import import_tensorrt

    trt = import_tensorrt("tensorrt-rtx")
    manifest = read_manifest(artifacts)
    logger = make_logger(trt, gpu_less=True)
    rows = [f"TensorRT-RTX {trt.__version__}, ART = `{manifest.config.name}` exported ({manifest.config.image_size} px), "
            "fp16 lowering, strongly typed network: layers by type and output type", "",
            "| graph | where | layer type | output type | layers |", "|---|---|---|---|---:|"]
    graphs = ["vae_encoder", "vae_decoder"]
    for graph in graphs:
        builder = trt.Builder(logger)
        network = strongly_typed_network(trt, builder)
        parser = trt.OnnxParser(network, logger)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "g.onnx"
            onnx.save_model(to_half(onnx.load(str(manifest.graph_path(graph))), "fp16"), str(path),
                            save_as_external_data=True, all_tensors_to_one_file=True, location="g.onnx.data")
            if not parser.parse_from_file(str(path)):
                raise SystemExit(f"{graph}: " + "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors)))
        kinds = collections.Counter()
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            where = "GroupNorm" if "/norm" in layer.name else "rest"
            out = str(layer.get_output(0).dtype).rsplit(".", 1)[-1] if layer.num_outputs else "-"
            kind = str(layer.type).rsplit(".", 1)[-1]
            if where == "GroupNorm" and out != "INT64" or kind == "CONVOLUTION":
                kinds[(where, kind, out)] += 1
        rows += [f"| {graph} | {w} | {k} | {o} | {n} |" for (w, k, o), n in sorted(kinds.items())]
    t0 = time.perf_counter()
    out = build_engines(artifacts, BuildOptions(flavour="tensorrt-rtx", precision="fp16", target=target),
                        progress=lambda _: None, graphs=graphs)
    sizes = ", ".join(f"{g} {(out / f'{g}.engine').stat().st_size / 1e6:.2f} MB" for g in graphs)
    rows += ["", f"`varedit-deploy build --precision fp16 --target {target}` of these two graphs: built in "
                 f"{time.perf_counter() - t0:.1f} s ({sizes})."]
    return rows


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", type=Path, help="an exported artifact, for the TensorRT-RTX part")
    ap.add_argument("--target", default="sm89")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    command = "python benchmarks/vae_group_norm.py" + (f" --artifacts ART --target {args.target}" if args.artifacts else "")
    lines = [f"`{command}` ({platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {_version('onnxruntime')}, "
             f"torch {_version('torch')})", "",
             "GroupNorm(32) over [1, 32, 1024, 1024] (x ~ 3 N(0,1) + 1.5, random affine), opset 17:", "",
             *ort_accuracy()]
    if args.artifacts:
        lines += ["", *rtx_placement(args.artifacts, args.target)]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_group_norm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
