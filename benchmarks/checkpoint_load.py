"""Peak memory of loading official release files (`edit --checkpoint-dir`): time and peak RSS.

    python benchmarks/checkpoint_load.py --model 2b-512 --depth 8 --dtype bf16 [--work /tmp]

Writes a release folder in the official layout (random weights; `--depth` cuts the blocks so it
fits a shared machine; `--dtype` is the checkpoint's dtype, the model loads in fp32), then runs
`VAREditModel.from_release` in a fresh process and reports its VmHWM beside the model's bytes.
Writes benchmarks/results/checkpoint_load-<model>-d<depth>-<dtype>.json and deletes the folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CHILD = """
import dataclasses, json, sys, time
from pathlib import Path
from varedit_deploy.config import from_name
from varedit_deploy.model.loaded import VAREditModel
base = from_name(sys.argv[2])
config = dataclasses.replace(base, transformer=dataclasses.replace(base.transformer, depth=int(sys.argv[3]),
                                                                  block_chunks=int(sys.argv[3])))
t0 = time.perf_counter()
model = VAREditModel.from_release(Path(sys.argv[1]), config, text_precision="fp32")
seconds = time.perf_counter() - t0
held = sum(p.numel() * p.element_size() for m in (model.transformer, model.vae) for p in m.parameters())
s = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(json.dumps({"seconds": seconds, "model_bytes": held,
                  **{k + "_kB": int(s[k].split()[0]) for k in ("VmHWM", "RssAnon", "RssFile")}}))
"""


def write_release(folder: Path, config, dtype: str) -> None:
    import torch

    from varedit_deploy.model.checkpoint import ours_to_official_transformer
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.model.tiny_text import write_tiny_text_encoder

    cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = VAREditModel.random(config)
    state = ours_to_official_transformer(model.transformer.state_dict(), config.transformer.block_chunks)
    torch.save({k: v.to(cast) for k, v in state.items()}, folder / config.transformer_file)
    torch.save({"vae": {k: v.to(cast) for k, v in model.vae.state_dict().items()}}, folder / config.vae_file)
    write_tiny_text_encoder(folder / config.text_encoder_dir, config.transformer.text_channels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="2b-512")
    ap.add_argument("--depth", type=int, default=8, help="blocks to keep (the release has 32 or 40)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="the checkpoint's dtype")
    ap.add_argument("--work", type=Path, default=Path("/tmp"))
    args = ap.parse_args()

    from varedit_deploy.config import from_name

    base = from_name(args.model)
    config = dataclasses.replace(base, transformer=dataclasses.replace(base.transformer, depth=args.depth,
                                                                      block_chunks=args.depth))
    folder = args.work / f"checkpoint-load-{args.model}-d{args.depth}-{args.dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        write_release(folder, config, args.dtype)
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), args.model, str(args.depth)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    finally:
        shutil.rmtree(folder)
    result = {"command": "python benchmarks/checkpoint_load.py " + " ".join(sys.argv[1:]), **json.loads(out)}
    result["peak_over_model"] = result["VmHWM_kB"] * 1024 / result["model_bytes"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"checkpoint_load-{args.model}-d{args.depth}-{args.dtype}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
