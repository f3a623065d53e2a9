"""Which ONNX Runtime graph a fixture's logit differences come from.

    python benchmarks/parity_attribution.py [--fixture ../shared/fixtures/tiny-8b-1024]

Exports the fixture, runs its `text_cond` graph and the source pass (`source_embed`, `step`
with an empty past, `sar_pool`) on ONNX Runtime, then runs the torch reference's steps
(teacher-forced) from the torch or the ORT outputs of those two stages, and prints max |dlogit| / max |logit| per scale for each combination, next to the full
ORT loop's (what `varedit-deploy parity --backend onnxruntime` reports). Writes
benchmarks/results/parity_attribution-<fixture>.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", type=Path, default=Path("../shared/fixtures/tiny-8b-1024"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    import torch

    from varedit_deploy.export.artifacts import export_artifacts
    from varedit_deploy.model.codes import NextScaleInput, latent_to_tokens
    from varedit_deploy.model.loaded import VAREditModel
    from varedit_deploy.model.sampler import guided_logits
    from varedit_deploy.model.transformer import SourceKV, TextCondition
    from varedit_deploy.fixtures import FixtureData
    from varedit_deploy.parity import check_fixture
    from varedit_deploy.runtime.kv_cache import SOURCE
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import SamplerInputs

    fx = FixtureData.load(args.fixture)
    cfg, model = fx.config, VAREditModel.from_fixture(fx.folder)
    tr, depth = model.transformer, cfg.transformer.depth
    with torch.inference_mode():
        prefix = latent_to_tokens(model.vae.encoder(torch.from_numpy(fx.inputs["source_tensor"][None])),
                                  cfg.transformer.patchify)
        cond = {"torch": tr.text_condition(torch.from_numpy(fx.text_features))}
        source = {"torch": tr.source_pass(prefix, cond["torch"])}
    with tempfile.TemporaryDirectory() as tmp:
        art = export_artifacts(model, Path(tmp) / "art", progress=lambda _: None, validate=False)
        pipe = EditPipeline.from_artifacts(art)
        loop, be = pipe.loop, pipe.backend
        feats, text_k, text_v = loop.text_buffers(fx.text_features.shape[1])
        be.write(feats, fx.text_features)
        be.graph("text_cond").run({"text_features": feats}, {
            "start_token": loop.x[0], "modulation": loop.modulation, "head_modulation": loop.head_modulation,
            "text_k": text_k, "text_v": text_v})
        be.write(loop.prefix, prefix.numpy())
        be.graph("source_embed").run({"source_prefix": loop.prefix}, {"x": loop.x[-1]})
        be.graph("step").run(*loop._step_io(SOURCE, text_k, text_v))
        source_k, source_v = loop.cache.source(0)
        be.graph("sar_pool").run({"source_k": source_k, "source_v": source_v},
                                 {"sar_k": loop.cache.sar_k, "sar_v": loop.cache.sar_v})
        host = [torch.from_numpy(np.array(a)) for a in (loop.x[0], loop.modulation, loop.head_modulation, text_k, text_v)]
        cond["ORT"] = TextCondition(*host)
        source["ORT"] = SourceKV(torch.from_numpy(loop.cache.sar_k.copy()), torch.from_numpy(loop.cache.sar_v.copy()),
                                 [torch.from_numpy(loop.cache.source(i)[0].copy()) for i in range(depth)],
                                 [torch.from_numpy(loop.cache.source(i)[1].copy()) for i in range(depth)])
        pipe.close()

    cw, inv_tau, _ = (torch.from_numpy(a) for a in SamplerInputs.from_params(cfg.sampling).arrays())
    teacher = [torch.from_numpy(b) for b in fx.teacher_bits()]
    sched, heads, head_dim = cfg.schedule, cfg.transformer.heads, cfg.transformer.head_dim

    def torch_steps(c: TextCondition, src: SourceKV) -> list[float]:
        past_k = [torch.zeros(0, 2, heads, head_dim), *src.layer_k[1:]]  # layer 0 reads the SAR instead
        past_v = [torch.zeros(0, 2, heads, head_dim), *src.layer_v[1:]]
        x, summed, ratios = c.start_token, torch.zeros(1, cfg.vae.codebook_dim, sched.latent_side, sched.latent_side), []
        with torch.inference_mode():
            for s, (start, n) in enumerate(zip(sched.starts, sched.tokens)):
                logits, new_k, new_v = tr.step(x, c.modulation, c.head_modulation, c.text_k, c.text_v,
                                               src.sar_k[start:start + n], src.sar_v[start:start + n], past_k, past_v)
                past_k = [torch.cat([p, k]) for p, k in zip(past_k, new_k)]
                past_v = [torch.cat([p, v]) for p, v in zip(past_v, new_v)]
                ref = fx.expected[f"logits_{s}"].reshape(-1, 2)
                ratios.append(float(np.abs(guided_logits(logits, cw, inv_tau).numpy() - ref).max() / np.abs(ref).max()))
                summed, tokens = NextScaleInput(cfg, s)(teacher[s], summed)
                if tokens is not None:
                    x = tr.embed_tokens(tokens, s + 1)
        return ratios

    rows = [(f"{c} text_cond, {s} source_pass, torch steps", torch_steps(cond[c], source[s]))
            for c, s in (("torch", "torch"), ("ORT", "torch"), ("torch", "ORT"), ("ORT", "ORT"))]
    rows.append(("ONNX Runtime loop (parity --backend onnxruntime)",
                 [r.rel for r in check_fixture(fx.folder, "onnxruntime").scales]))
    lines = [f"`python benchmarks/parity_attribution.py --fixture {args.fixture}`: max |dlogit| / max |logit| per "
             "scale against the fixture (gate 2e-4)", "",
             "| graphs | " + " | ".join(str(s) for s in range(sched.num_scales)) + " | worst |",
             "|---" * (sched.num_scales + 2) + "|"]
    lines += [f"| {label} | " + " | ".join(f"{r:.1e}" for r in ratios) + f" | {max(ratios):.1e} |" for label, ratios in rows]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"parity_attribution-{fx.folder.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
