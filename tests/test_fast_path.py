"""The torch fast path (TorchBackend: preallocated caches, fused Triton kernels).

On a CPU Triton's interpreter runs the kernels, on a GPU host the compiled kernels do. The fp32
path is held to the golden fixtures like the reference; the bf16 autocast branch reports its
agreement with the fp32 reference and must stay within bounds derived from bf16 (on the CPU here;
on GPUs with CUDA graphs in test_gpu.py).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_GPU, fixture_dir
from varedit_deploy.config import from_name
from varedit_deploy.model import attention
from varedit_deploy.model.codes import NextScaleInput
from varedit_deploy.model.loaded import VAREditModel
from varedit_deploy.fixtures import FixtureData
from varedit_deploy.parity import LOGIT_TOL, compare, run_fast_path, run_reference
from varedit_deploy.sampling import SamplerInputs, TorchCPUNoise, draw_edit

@pytest.mark.parametrize("name", ["tiny-2b", "8b-1024"])
def test_every_parameter_and_buffer_is_built_on_the_requested_device(name):
    """Tables made on the CPU (RoPE, SAR pooling, resampling) follow `with torch.device(...)` like the
    weights: a model built for a GPU has no CPU buffer left in it. Built on `meta`: no memory at all."""
    config = from_name(name)
    with torch.device("meta"):
        model = VAREditModel.empty(config)
        steps = [NextScaleInput(config, s) for s in range(config.schedule.num_scales)]
    tensors = [(f"{type(m).__name__}.{n}", t) for m in (model.transformer, model.vae, *steps)
               for n, t in (*m.named_parameters(), *m.named_buffers())]
    names = {n for n, _ in tensors}
    assert {"VAREditTransformer.rope_cos", "VAREditTransformer.sar_pool_0", "NextScaleInput.up"} <= names
    elsewhere = [n for n, t in tensors if t.device.type != "meta"]
    assert not elsewhere, elsewhere


def test_sar_pooling_is_fp32_and_rounds_once_under_bf16_autocast():
    """The official code pools the SAR references in fp32 and rounds once (`F.interpolate(mode='area')` on
    bf16 K/V). The reference's source pass runs under bf16 autocast (the official run, the GPU benchmark),
    which must not round the two pooling products to bf16: the fast path pools outside autocast, and
    the difference would be charged to it. One implementation (`sar_pool`), the same bits either way."""
    model = VAREditModel.random(from_name("tiny-2b"), seed=2)
    tr, sched, t = model.transformer, model.config.schedule, model.config.transformer
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(sched.source_tokens, 2, t.heads, t.head_dim, generator=g).to(torch.bfloat16) for _ in "kv")
    plain_k, plain_v = tr.sar_pool(k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_k, auto_v = tr.sar_pool(k, v)
    assert torch.equal(plain_k, auto_k) and torch.equal(plain_v, auto_v)
    # ... and that is adaptive average pooling (fp64 here) rounded once to bf16: within half a bf16 unit.
    side, first = sched.source_side, 0
    grid = k.double().permute(1, 2, 3, 0).reshape(2 * t.heads, t.head_dim, side, side)
    for n, s_side in zip(sched.tokens, sched.sides):
        expected = F.adaptive_avg_pool2d(grid, s_side).reshape(2, t.heads, t.head_dim, n).permute(3, 0, 1, 2)
        error = (auto_k[first:first + n].double() - expected).abs()
        assert (error <= 2.0**-8 * (1 + 2.0**-16) * expected.abs() + 1e-30).all(), s_side
        first += n


def test_every_captured_graph_of_the_fast_path_shares_one_memory_pool(tiny_text_dir, photos, monkeypatch):
    """One pool per captured graph (~31 for 2B) overstates the peak and wastes memory at 8B: the backend
    makes one pool handle and passes it to every capture. Checked on the CPU with torch's graph API
    recorded instead of run (the captured bodies still run, eagerly)."""
    import contextlib

    from varedit_deploy.imaging import as_rgb, preprocess
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    handles, captures = [], []

    class RecordedGraph:
        def replay(self):  # the body already ran under `graph`
            pass

        def reset(self):
            pass

    def graph_pool_handle():
        handles.append(object())
        return handles[-1]

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, **_):
        captures.append(pool)
        yield

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", graph_pool_handle)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordedGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    model = VAREditModel.random(from_name("tiny-2b"), seed=1)
    model.attach_text_encoder(tiny_text_dir, "fp32")
    pipe = EditPipeline.from_model(model, device="cpu", dtype=torch.float32, cuda_graphs=True)
    features = pipe.encode_text("make it red")
    prefix = pipe.encode_image(preprocess(as_rgb(photos["coffee"]), model.config.image_size))
    loop = pipe.loop.run(features, prefix, SamplerInputs.from_params(model.config.sampling), NumpyNoise(1), scales=2)
    pipe.loop.collect(loop, record=True)
    # The source pass's step, then two scales of step, sample and next input: seven captures, one pool.
    assert len(handles) == 1 and len(captures) == 7 and all(pool is handles[0] for pool in captures)
    pipe.close()


def official_margins(fixture: FixtureData) -> list[np.ndarray]:
    """Per scale and bit, how far the official logits and noise were from drawing the other bit, in
    logit units: the sampling comparison log(p1/E1) > log(p0/E0) and the two top-p thresholds."""
    t, sched = fixture.config.transformer, fixture.config.schedule
    noise = draw_edit(TorchCPUNoise(fixture.config.sampling.seed), [n * t.d_tok for n in sched.tokens])
    threshold = float(SamplerInputs.from_params(fixture.config.sampling).drop_threshold[0])
    edge = np.log(threshold / (1 - threshold))  # p <= threshold  <=>  logit difference <= edge
    margins, first = [], 0
    for s, n in enumerate(sched.tokens):
        logits = fixture.expected[f"logits_{s}"].reshape(-1, 2).astype(np.float64)
        e = noise[first:first + n * t.d_tok].astype(np.float64)
        first += n * t.d_tok
        d = logits[:, 1] - logits[:, 0]
        margins.append(np.minimum.reduce([np.abs(d - np.log(e[:, 1] / e[:, 0])), np.abs(d + edge), np.abs(d - edge)]))
    return margins


# A bf16 rounding (cross-attention and text pool q, k, v and output: `round_bf16`) is a near-tie when moving
# its fp32 input by NEAR_TIE x the largest |value| of its row changes the result. That reach is the worst-case
# rounding error of an fp32 dot product of 256 terms (256 x 2^-24 of its absolute sum, itself about the row's
# scale): two correct fp32 orders of summation (the reference's and the fused kernels') may land either side
# of a boundary within it, and nowhere else. It is 1/256 of a bf16 step at the row's largest values, so a
# wrong rounding (truncation, the wrong neighbour) of any value that matters is not taken for a tie.
NEAR_TIE = 2.0**-16


class OfficialRoundings:
    """`round_bf16` for the fast path, teacher-forced on the official bf16 decisions at near-ties.

    The bits' near-tie rule one level down. A correct fp32 implementation can land on the other side of
    a bf16 rounding boundary where the official value was a few ulps from it, and a flipped q or output
    of cross-attention moves every later logit: at 1024 px on a 2-core EPYC, scale 5 layer 0's q
    (uncond row, head 1, token 17, channel 8) is exactly the boundary 1.27734375 in the fast path and
    1.27734339 (3 fp32 ulps below) in the reference, which costs 2.3e-4 of the largest logit. `official`
    holds every decision of the eager reference (which reproduces the fixtures), call by call; the fast
    path makes the same calls in the same order and keeps its own rounding except where the official one
    differs and is that of an input within the near-tie reach (counted in `near_ties`); any other
    difference is `unexplained`."""

    def __init__(self, official: list[torch.Tensor]):
        self.official, self.calls, self.near_ties, self.unexplained = official, 0, 0, 0
        self.round = attention.round_bf16  # the package's, before this object replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        official = self.official[self.calls].to(x.device)
        self.calls += 1
        assert official.shape == x.shape, f"rounding {self.calls}: official {official.shape}, fast path {x.shape}"
        own = self.round(x)
        reach = NEAR_TIE * x.abs().amax(-1, keepdim=True)
        # rounding is monotonic: the inputs within reach round to every bf16 value from the first to the last
        within = (self.round(x - reach) <= official) & (official <= self.round(x + reach))
        differ = own != official
        self.near_ties += int((differ & within).sum())
        self.unexplained += int((differ & ~within).sum())
        return torch.where(differ & within, official, own)


def official_roundings(fixture: FixtureData, monkeypatch) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Every `round_bf16` result of the eager reference on `fixture`, in call order, and its guided logits."""
    recorded, rounding = [], attention.round_bf16

    def recording(x: torch.Tensor) -> torch.Tensor:
        recorded.append(rounding(x))
        return recorded[-1]

    with monkeypatch.context() as m:
        m.setattr(attention, "round_bf16", recording)
        logits = run_reference(fixture).guided_logits
    return recorded, logits


def test_a_flipped_bf16_near_tie_is_taken_back_and_a_wrong_rounding_is_not():
    """The 1024-px case in small: the fast path's q exactly on a bf16 boundary (ties to even: up), the
    official one 3 fp32 ulps below it (down). That alone is taken back; a truncating rounding is not."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 1.27734375  # halfway between the bf16 values 1.2734375 and 1.28125
    below = x.clone()
    below[0, 0] = 1.27734375 - 3 * 2.0**-23
    official = below.to(torch.bfloat16).float()
    teacher = OfficialRoundings([official])
    assert torch.equal(teacher(x), official) and (teacher.near_ties, teacher.unexplained) == (1, 0)
    truncated = (x.view(torch.int32) & -0x10000).view(torch.float32)
    teacher = OfficialRoundings([truncated])
    teacher(x)
    assert teacher.unexplained > x.numel() // 4, teacher.unexplained


# Triton's interpreter needs tens of minutes for the last scales at 1024 px (4096 queries over 14.6k
# keys, per layer): on the CPU the 1024-px fixture runs its first 7 scales (the 4096-token source, the
# 13-scale RoPE offsets and SAR pooling, key ranges of ~4.4k split across blocks); GPUs run all 13.
SCALES_ON_CPU = {"tiny-8b-1024": 7}


# Not traced by coverage (pytest-cov's marker): under its tracer, Triton's CPU interpreter made
# these three take about 13 minutes on our 2-core machine (the whole suite untraced: 13); the kernels stay
# covered by the smaller tests here and in tests/test_plugins.py.
@pytest.mark.no_cover
@pytest.mark.parametrize("name", ["tiny-2b", "tiny-8b", "tiny-8b-1024"])
def test_fast_path_reproduces_the_official_fixtures(name, monkeypatch):
    """fp32 fast path, teacher-forced on the fixture's bits with the official noise and on the official
    bf16 roundings at near-ties (`OfficialRoundings`): logits within the parity tolerance at every
    scale, no other rounding differing, and every sampled bit equal to the official one unless its
    official margin is below the logit tolerance (1024 px has a few near-ties; fixtures README)."""
    fixture = FixtureData.load(fixture_dir(name))
    scales = None if HAS_GPU else SCALES_ON_CPU.get(name)
    official, reference_logits = official_roundings(fixture, monkeypatch)
    for s, logits in enumerate(reference_logits):  # so its roundings are the official ones
        ref = fixture.expected[f"logits_{s}"].reshape(-1, 2)
        assert np.abs(logits.reshape(-1, 2) - ref).max() <= LOGIT_TOL * np.abs(ref).max(), s
    teacher = OfficialRoundings(official)
    monkeypatch.setattr(attention, "round_bf16", teacher)
    run = run_fast_path(fixture, scales, cuda_graphs=False)  # one call of each graph's Python, in order
    assert len(run.bits) == (scales or fixture.config.schedule.num_scales)
    # q, k, v and output of the text pool, then of every layer's cross-attention in the source pass and each scale
    assert teacher.calls == 4 * (1 + fixture.config.transformer.depth * (1 + len(run.bits)))
    assert teacher.unexplained == 0, teacher.unexplained
    print(f"bf16 roundings taken from the official run at near-ties: {teacher.near_ties}")
    errors, unexplained = [], []
    for s, (logits, bits, margin) in enumerate(zip(run.guided_logits, run.bits, official_margins(fixture))):
        ref = fixture.expected[f"logits_{s}"].reshape(-1, 2)
        errors.append(float(np.abs(logits.reshape(-1, 2) - ref).max() / np.abs(ref).max()))
        differ = bits.reshape(-1) != fixture.expected[f"sampled_{s}"].reshape(-1)
        tolerance = LOGIT_TOL * np.abs(ref).max()
        unexplained += [(s, int(i), float(margin[i])) for i in np.flatnonzero(differ) if margin[i] >= tolerance]
    assert max(errors) <= LOGIT_TOL, errors
    assert not unexplained, unexplained
    if scales is None:
        report = compare(fixture, run, "torch-fast")
        assert all(t.ok for t in report.tensors), report.table()


@pytest.mark.skipif(HAS_GPU, reason="fp32 in the interpreter; GPU hosts run bf16: tests/test_gpu.py")
def test_fast_path_edit_equals_the_eager_reference(tiny_model, photos):
    """A whole edit through the torch backend in fp32 (T5 on the real tokens, the VAE, fused kernels,
    the shared scale loop) samples the reference's bits and decodes its image."""
    from varedit_deploy.model.edit import edit
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    ref = edit(tiny_model, photos["chelsea"], "make it red", noise=NumpyNoise(5))
    pipe = EditPipeline.from_model(tiny_model, device="cpu", dtype=torch.float32)  # fp32: no casts
    ours = pipe.edit(photos["chelsea"], "make it red", noise=NumpyNoise(5), record=True)
    for a, rec in zip(ours.loop.bits, ref.generation.scales, strict=True):
        assert np.array_equal(a, rec.bits.numpy())
    assert np.abs(np.asarray(ours.image, np.int32) - np.asarray(ref.image, np.int32)).max() <= 2
    assert {"text_encoder", "vae_encoder", "transformer", "vae_decoder", "step", "scale_6", "total"} <= set(ours.timings_ms)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(HAS_GPU, reason="interpreter only where there is no GPU")),
    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_autocast_branch_agrees_with_the_fp32_reference(tiny_text_dir, photos, device):
    """The branch GPUs run (bf16 blocks under autocast, bf16 caches and text K/V; on the CPU with CPU
    autocast and the interpreter), teacher-forced on the fp32 reference's bits: the head runs in fp32
    with autocast off, and logits and bits agree with fp32 as closely as bf16 blocks allow."""
    from varedit_deploy.imaging import as_rgb, preprocess
    from varedit_deploy.model.edit import edit
    from varedit_deploy.runtime.pipeline import EditPipeline
    from varedit_deploy.sampling import NumpyNoise

    def fresh():
        model = VAREditModel.random(from_name("tiny-2b"), seed=1)
        model.attach_text_encoder(tiny_text_dir, "fp32")
        return model

    photo, instruction = photos["coffee"], "make it red"
    ref = edit(fresh(), photo, instruction, noise=NumpyNoise(7)).generation  # fp32, CPU
    model = fresh()
    pipe = EditPipeline.from_model(model, device=device, dtype=torch.bfloat16)
    head = []
    hook = model.transformer.head.register_forward_hook(
        lambda m, i, o: head.append((i[0].dtype, o.dtype, torch.is_autocast_enabled(device))))
    features = pipe.encode_text(instruction)
    prefix = pipe.encode_image(preprocess(as_rgb(photo), model.config.image_size))
    loop = pipe.loop.run(features, prefix, SamplerInputs.from_params(model.config.sampling), NumpyNoise(7),
                         [r.bits.numpy() for r in ref.scales])
    pipe.loop.collect(loop, record=True)
    hook.remove()
    text_k = pipe.loop.text_buffers(features.shape[1])[1]
    assert pipe.loop.cache.k[1].dtype == text_k.dtype == torch.bfloat16 and pipe.loop.cache.k[1].device.type == device
    assert head and all(h == (torch.float32, torch.float32, False) for h in head), head
    errors = [np.abs(ours - r.guided_logits.numpy()).max() / np.abs(r.guided_logits.numpy()).max()
              for ours, r in zip(loop.guided_logits, ref.scales, strict=True)]
    agree = np.mean(np.concatenate([(ours == r.bits.numpy()).ravel() for ours, r in zip(loop.bits, ref.scales)]))
    print(f"bf16 vs fp32, teacher-forced: logit error per scale {np.round(errors, 4).tolist()}, bits agree {agree:.4f}")
    # A few bf16 roundings of the block weights and activations per layer move a logit by a few
    # percent of the largest one at most; bits whose margin is smaller than that may flip.
    bf16 = torch.finfo(torch.bfloat16).eps
    assert max(errors) <= 8 * bf16, errors
    assert agree >= 0.99, agree
    pipe.close()


def test_pytest_m_gpu_selects_the_fast_path_tests_without_tensorrt():
    """`pytest -m gpu` on a GPU host without TensorRT (the GPU machines we are lent): the fast-path tests
    carry `gpu` alone, so the conftest skips none of them there; only TensorRT tests also carry `trt`."""
    import subprocess
    import sys
    from pathlib import Path

    def collected(marks: str) -> set[str]:
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-m", marks, "tests/test_gpu.py", "tests/test_fast_path.py"],
                             cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, check=True).stdout
        return {line.split("::")[1] for line in out.splitlines() if "::" in line}

    fast_path = {"test_torch_fast_path_bf16_with_cuda_graphs_replays_identically",
                 "test_torch_fast_path_edit_synchronises_the_host_at_most_twice",
                 "test_bf16_autocast_branch_agrees_with_the_fp32_reference[cuda]"}
    assert collected("gpu and not trt") == fast_path
    assert fast_path < collected("gpu") and not fast_path & collected("trt")
