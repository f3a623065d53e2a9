import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from varedit_deploy import artifact
from varedit_deploy.artifact import HASH_ON_LOAD_LIMIT, read_manifest
from varedit_deploy.cli import main
from varedit_deploy.config import from_name
from varedit_deploy.errors import ArtifactError, ConfigError, InputError, VareditError
from varedit_deploy.model.edit import edit as reference_edit
from varedit_deploy.parity import check_fixture
from varedit_deploy.runtime.kv_cache import SOURCE, KVCache
from varedit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from varedit_deploy.runtime.pipeline import EditPipeline
from varedit_deploy.runtime.tokenizer import Tokenizer
from varedit_deploy.sampling import NumpyNoise


def test_onnxruntime_reproduces_the_official_fixtures(parity_golden):
    report = check_fixture(parity_golden, "onnxruntime")
    assert report.ok, report.table()
    assert all(r.bits_differ == r.bits_explained for r in report.scales)  # only official near-ties may differ


def test_kv_cache_views_are_contiguous_prefixes_and_slots():
    cache = KVCache.allocate(depth=3, heads=2, head_dim=8, source_tokens=16, starts=(0, 1, 5), tokens=(1, 4, 16))
    assert all(k.shape == (37, 2, 2, 8) for k in cache.k)  # every layer: source rows, then the targets
    for layer, first in ((0, 16), (1, 0)):  # layer 0 attends over its targets only (the SAR replaces its source)
        past, _ = cache.past(layer, 2)
        slot, _ = cache.slot(layer, 2)
        assert past.shape[0] == 21 - first and slot.shape[0] == 16
        assert past.flags.c_contiguous and slot.flags.c_contiguous
        assert past.ctypes.data == cache.k[layer].ctypes.data + first * 2 * 2 * 8 * 4
        assert slot.ctypes.data == past.ctypes.data + past.nbytes  # the slot starts where the past ends
    for layer in range(3):  # the source pass: empty past, no SAR, its slot is the source rows
        assert cache.past(layer, SOURCE)[0].shape[0] == 0 and cache.sar(SOURCE)[0].shape[0] == 0
        slot = cache.slot(layer, SOURCE)[0]
        assert slot.ctypes.data == cache.k[layer].ctypes.data and slot.shape[0] == 16
        assert np.shares_memory(cache.source(layer)[0], slot)
    assert cache.sar(1)[0].shape[0] == 4


@pytest.fixture(scope="module")
def pipeline(tiny_artifact):
    return EditPipeline.from_artifacts(tiny_artifact)


def test_onnxruntime_edit_equals_the_eager_reference(pipeline, tiny_model, photos):
    photo = photos["coffee"]
    ours = pipeline.edit(photo, "make the cup red", seed=3, cfg=2.0, noise=NumpyNoise(3), record=True)
    ref = reference_edit(tiny_model, photo, "make the cup red",
                         sampling=pipeline.config.sampling.__class__(cfg=2.0, tau=1.0, seed=3), noise=NumpyNoise(3))
    assert len(ours.loop.bits) == len(ref.generation.scales) == 7
    for ours_bits, rec in zip(ours.loop.bits, ref.generation.scales):
        assert np.array_equal(ours_bits, rec.bits.numpy())
    diff = np.abs(np.asarray(ours.image, np.int32) - np.asarray(ref.image, np.int32))
    assert ours.image.size == (600, 400) and diff.max() <= 2
    keys = {"text_encoder", "vae_encoder", "transformer", "vae_decoder", "step", "scale_6", "total"}
    assert keys <= set(ours.timings_ms)


def test_teacher_bits_drive_the_loop(pipeline, photos):
    """Teacher forcing (what parity relies on): every scale's input and the summed codes follow
    the given bits, whatever was sampled. Two runs with the same teacher and different noise
    sample different bits but must see identical logits at every scale; the summed codes are the
    teacher's codes accumulated by the reference's next-scale step."""
    import torch

    from varedit_deploy.imaging import preprocess
    from varedit_deploy.model.codes import NextScaleInput
    from varedit_deploy.sampling import SamplerInputs

    cfg = pipeline.config
    rng = np.random.default_rng(0)
    teacher = [rng.integers(0, 2, (1, n, cfg.transformer.d_tok)).astype(np.int64) for n in cfg.schedule.tokens]
    prefix = pipeline.encode_image(preprocess(Image.fromarray(photos["astronaut"]), cfg.image_size))
    features = pipeline.backend.read(pipeline.encode_text("make it red"))
    sampler = SamplerInputs.from_params(cfg.sampling)
    first = pipeline.loop.run(features, prefix, sampler, NumpyNoise(4), teacher)
    (summed,) = pipeline.loop.collect(first, [first.summed], record=True)
    second = pipeline.loop.run(features, prefix, sampler, NumpyNoise(5), teacher)
    (summed_again,) = pipeline.loop.collect(second, [second.summed], record=True)
    assert not all(np.array_equal(a, b) for a, b in zip(first.bits, second.bits))  # the noise mattered
    for a, b in zip(first.guided_logits, second.guided_logits):
        assert np.array_equal(a, b)  # ... but not to what the scales saw
    assert np.array_equal(summed_again, summed)
    ref = torch.zeros(1, cfg.vae.codebook_dim, cfg.schedule.latent_side, cfg.schedule.latent_side)
    for s, bits in enumerate(teacher):
        ref, _ = NextScaleInput(cfg, s)(torch.from_numpy(bits), ref)
    assert np.abs(summed - ref.numpy()).max() < 1e-6
    # A check of the first scales only needs their bits; fewer bits than scales run is refused.
    partial = pipeline.loop.run(features, prefix, sampler, NumpyNoise(4), teacher[:3], scales=3)
    pipeline.loop.collect(partial, record=True)
    assert all(np.array_equal(a, b) for a, b in zip(partial.guided_logits, first.guided_logits[:3]))
    with pytest.raises(InputError, match="teacher bits for 2 scales; this run has 3"):
        pipeline.loop.run(features, prefix, sampler, NumpyNoise(4), teacher[:2], scales=3)


def test_runtime_tokenizer_matches_transformers(tiny_artifact, tiny_model):
    tok = Tokenizer(read_manifest(tiny_artifact).tokenizer_file)
    for text in ["make the sky purple", "  Add a hat   to the cat ", "Ünïcode café", "end </s> token", "x <pad>"]:
        assert tok.encode(text)[0].tolist() == tiny_model.text_encoder.tokenize(text)
    with pytest.raises(InputError, match="at most 512"):
        tok.encode("sky " * 600)
    with pytest.raises(InputError, match="empty"):
        tok.encode(" ")


def test_runtime_tokenizer_errors(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match="tokenizer .*tokenizer.json: cannot be loaded"):
        Tokenizer(tmp_path / "tokenizer.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the package were not installed
    with pytest.raises(VareditError, match=r'pip install "varedit-deploy\[ort\]"'):
        Tokenizer(tmp_path / "tokenizer.json")


def test_runtime_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, varedit_deploy.runtime.pipeline; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _edit_manifest(folder, change) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def _broken(src, tmp_path, how):
    dst = tmp_path / "art"
    shutil.copytree(src, dst)
    how(dst)
    return dst


@pytest.mark.parametrize("how, message", [
    (lambda d: (d / "graphs" / "sample.onnx").unlink(), "missing file graphs/sample.onnx"),
    (lambda d: (d / "graphs" / "next_input_3.onnx").write_bytes(
        (d / "graphs" / "next_input_3.onnx").read_bytes()[:-1] + b"\0"), "next_input_3.onnx was altered"),
    (lambda d: (d / "tokenizer" / "tokenizer.json").write_text("{}"), "tokenizer/tokenizer.json has"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({**json.loads((d / "manifest.json").read_text()),
                                                             "schema_version": 99})), "schema version 99"),
    (lambda d: (d / "manifest.json").write_text("{oops"), "not valid JSON"),
    (lambda d: _edit_manifest(d, lambda m: m.pop("schedule")), "incomplete: its schedule does not match"),
    (lambda d: _edit_manifest(d, lambda m: m["schedule"]["tokens"].append(400)), "schedule does not match"),
    (lambda d: _edit_manifest(d, lambda m: m.pop("graphs")), "incomplete: it has no table of graphs"),
    (lambda d: _edit_manifest(d, lambda m: m.update(graphs=["step"])), "no table of graphs"),
    (lambda d: _edit_manifest(d, lambda m: m["graphs"].pop("sample")), "graphs missing: sample"),
    (lambda d: _edit_manifest(d, lambda m: m["graphs"]["step"].pop("ops")), "graph 'step' has no valid record"),
    (lambda d: _edit_manifest(d, lambda m: m.pop("precision")), "does not say the graphs' precision"),
    (lambda d: (d / "manifest.json").unlink(), "not an exported artifact"),
])
def test_damaged_artifacts_are_refused_with_the_fix(tiny_artifact, tmp_path, how, message):
    art = _broken(tiny_artifact, tmp_path, how)
    with pytest.raises(ArtifactError, match=message):
        EditPipeline.from_artifacts(art)


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["last byte", "middle byte"])
def test_damage_anywhere_in_a_multi_mib_file_is_detected_on_load(tiny_artifact, tmp_path, where):
    """Every file up to HASH_ON_LOAD_LIMIT is hashed in full on load: a flip past the first MiB counts."""
    rec = max(read_manifest(tiny_artifact).all_files(), key=lambda r: r["bytes"])
    assert 4 * 2**20 < rec["bytes"] <= HASH_ON_LOAD_LIMIT, rec
    offset = rec["bytes"] - 1 if where == "last byte" else rec["bytes"] // 2 + 2**20
    art = _broken(tiny_artifact, tmp_path, lambda d: _flip_byte(d / rec["path"], offset))
    with pytest.raises(ArtifactError, match=f"{rec['path']} was altered"):
        EditPipeline.from_artifacts(art)


def test_files_above_the_load_limit_are_trusted_while_stamped_and_hashed_by_inspect(tiny_artifact, tmp_path,
                                                                                     monkeypatch, capsys):
    """A large file is hashed once and then trusted on load while its size and mtime are those of
    its verified.json stamp; any write (new mtime) makes the next load hash it again; inspect hashes all."""
    import os

    monkeypatch.setattr(artifact, "HASH_ON_LOAD_LIMIT", 2**20)  # as if the weights were release-sized
    rec = max(read_manifest(tiny_artifact).all_files(), key=lambda r: r["bytes"])

    def flip_keeping_mtime(d):
        path = d / rec["path"]
        st = path.stat()
        _flip_byte(path, rec["bytes"] - 1)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    art = _broken(tiny_artifact, tmp_path, flip_keeping_mtime)
    read_manifest(art)  # same size and mtime as stamped: accepted on load without reading the weights
    assert main(["inspect", str(art)]) == 1
    assert f"PROBLEM damaged: {rec['path']} was altered" in capsys.readouterr().out
    touched = _broken(tiny_artifact, tmp_path / "w", lambda d: _flip_byte(d / rec["path"], rec["bytes"] - 1))
    with pytest.raises(ArtifactError, match=f"{rec['path']} was altered"):
        read_manifest(touched)
    truncated = _broken(tiny_artifact, tmp_path / "t", lambda d: (d / rec["path"]).write_bytes(b"x"))
    with pytest.raises(ArtifactError, match=f"{rec['path']} has 1 bytes"):
        read_manifest(truncated)


def test_backend_choice_and_unloadable_graphs_are_clear_errors(tiny_artifact, tmp_path):
    from varedit_deploy.artifact import file_record
    from varedit_deploy.errors import ConfigError
    from varedit_deploy.runtime.registry import make_backend

    with pytest.raises(ConfigError, match="unknown backend 'vulkan'; available: onnxruntime"):
        EditPipeline.from_artifacts(tiny_artifact, backend="vulkan")
    with make_backend("onnxruntime", read_manifest(tiny_artifact)) as backend:
        backend.graph("sample")
        assert set(backend._graphs) == {"sample"}
    assert backend._graphs == {}  # leaving the context closes the sessions

    def corrupt_and_record(d):  # a damaged graph whose manifest entry was rewritten to match it: well-formed
        # protobuf without a graph (bytes that are not protobuf at all are refused earlier: test_containment.py)
        (d / "graphs" / "sample.onnx").write_bytes(b"\x08\x0a")
        data = json.loads((d / "manifest.json").read_text())
        data["graphs"]["sample"]["files"] = [file_record(d, d / "graphs" / "sample.onnx")]
        (d / "manifest.json").write_text(json.dumps(data))

    with pytest.raises(ArtifactError, match="sample.onnx cannot be loaded by ONNX Runtime"):
        EditPipeline.from_artifacts(_broken(tiny_artifact, tmp_path, corrupt_and_record))


def test_cli_edit_inspect_and_bad_inputs(tiny_artifact, tmp_path, photos, capsys):
    gray = tmp_path / "gray.png"
    Image.fromarray(photos["chelsea"][..., 1]).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([photos["chelsea"], np.full(photos["chelsea"].shape[:2], 200, np.uint8)])).save(rgba)
    pipe = EditPipeline.from_artifacts(tiny_artifact)
    for src in (gray, rgba):  # grayscale and RGBA photos are converted, any size is fine
        out = tmp_path / f"out-{src.stem}.png"
        assert main(["edit", "--artifacts", str(tiny_artifact), "--backend", "onnxruntime", "--image", str(src),
                     "--instruction", "make it blue", "--out", str(out), "--seed", "1", "--cfg", "2.5"]) == 0
        assert Image.open(out).size == (451, 300)
        # The file holds exactly what the library edit gives for the same options (numpy noise, seed 1).
        expected = pipe.edit(Image.open(src), "make it blue", cfg=2.5, seed=1, noise="numpy").image
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
        printed = capsys.readouterr().out
        assert f"wrote {out}" in printed and "transformer" in printed
    other = tmp_path / "out-seed2.png"
    assert main(["edit", "--artifacts", str(tiny_artifact), "--image", str(gray), "--instruction", "make it blue",
                 "--out", str(other), "--seed", "2", "--cfg", "2.5"]) == 0
    assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(tmp_path / "out-gray.png")))
    assert main(["inspect", str(tiny_artifact)]) == 0
    assert "complete and intact" in capsys.readouterr().out

    (tmp_path / "fake.png").write_bytes(b"\x89PNG not really")
    cases = [(["--image", str(tmp_path / "fake.png")], "not a readable image"),
             (["--instruction", "word " * 700], "at most 512"),
             (["--artifacts", str(tmp_path)], "not an exported artifact")]
    for extra, message in cases:
        args = {"--artifacts": str(tiny_artifact), "--backend": "onnxruntime", "--image": str(gray),
                "--instruction": "make it blue", "--out": str(tmp_path / "bad.png")}
        args.update(dict(zip(extra[::2], extra[1::2])))
        assert main(["edit", *[x for kv in args.items() for x in kv]]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad.png").exists()


def test_inspect_reports_damage(tiny_artifact, tmp_path, capsys):
    art = _broken(tiny_artifact, tmp_path, lambda d: (d / "graphs" / "step.onnx").write_bytes(b"x"))
    assert main(["inspect", str(art)]) == 1
    out, err = capsys.readouterr()
    assert "PROBLEM damaged: graphs/step.onnx has 1 bytes" in out and "complete and intact" not in out
    assert err.startswith(f"error: artifact {art} has problems")


def test_fixture_artifact_has_no_text_path(golden, tmp_path, capsys):
    art = tmp_path / "fx"
    assert main(["export", "--fixture", str(golden), "--out", str(art)]) == 0
    pipe = EditPipeline.from_artifacts(art)
    assert not pipe.manifest.has_graph("text_encoder") and pipe.tokenizer is None
    with pytest.raises(ArtifactError, match="no text encoder"):
        pipe.edit(np.zeros((64, 64, 3), np.uint8), "make it red")
    broken = _broken(art, tmp_path / "b", lambda d: (d / "graphs" / "sample.onnx").unlink())
    with pytest.raises(ArtifactError) as err:  # the hint names the folder being read, not where it was made
        EditPipeline.from_artifacts(broken)
    assert f"re-export it: varedit-deploy export --fixture {golden} --out {broken} --overwrite" in str(err.value)


def test_the_api_enforces_the_sampling_rules_of_the_cli(pipeline, photos):
    for kwargs, message in (({"seed": -5}, "seed must be"), ({"cfg": float("nan")}, "cfg must be"),
                            ({"tau": 0.0}, "tau must be")):
        with pytest.raises(ConfigError, match=message):
            pipeline.edit(photos["coffee"], "make it red", **kwargs)
    with pytest.raises(ConfigError, match="seed must be"):
        pipeline.edit(photos["coffee"], "make it red", noise=NumpyNoise(-5))


def test_whole_edit_noise_is_the_per_scale_draws():
    """The loop uploads an edit's noise once; the values are still those of one draw per scale."""
    from varedit_deploy.sampling import NOISE_SOURCES, draw_edit

    rows = [n * 56 for n in from_name("8b-1024").schedule.tokens]
    for source in NOISE_SOURCES.values():
        per_scale = source(11)
        whole = draw_edit(source(11), rows)
        assert whole.shape == (sum(rows), 2) and whole.dtype == np.float32
        assert np.array_equal(whole, np.concatenate([per_scale.draw(r) for r in rows]))


class CountingBackend(OnnxRuntimeBackend):
    """ONNX Runtime, counting the calls that are host synchronisations (`read_all`) and uploads
    (`write`) on a device backend."""

    def __init__(self, manifest):
        super().__init__(manifest)
        self.syncs = self.uploads = 0

    def write(self, dst, src):
        self.uploads += 1
        super().write(dst, src)

    def read_all(self, buffers):
        self.syncs += 1
        return super().read_all(buffers)


@pytest.mark.parametrize("record", [False, True])
def test_an_edit_synchronises_once_and_uploads_a_fixed_few_times(tiny_artifact, photos, pipeline, record):
    """At most 2 host synchronisations per edit on a device backend (here: 1, the final read of the image
    with the bits and logits when asked), and uploads that do not grow with the number of scales:
    the ids, the pixels, the sampler constants, the whole edit's noise and the zeroed codes."""
    manifest = read_manifest(tiny_artifact)
    backend = CountingBackend(manifest)
    pipe = EditPipeline(manifest, backend)
    pipe.edit(photos["astronaut"], "make it red", noise=NumpyNoise(4))  # warm-up
    backend.syncs = backend.uploads = 0
    ours = pipe.edit(photos["astronaut"], "make it red", noise=NumpyNoise(4), record=record)
    assert backend.syncs == 1 and backend.uploads == 5
    assert (ours.loop.bits is not None) == record
    plain = pipeline.edit(photos["astronaut"], "make it red", noise=NumpyNoise(4), record=True)
    assert np.array_equal(np.asarray(ours.image), np.asarray(plain.image))
    if record:
        assert all(np.array_equal(a, b) for a, b in zip(ours.loop.bits, plain.loop.bits, strict=True))


def test_plan_reports_what_the_loop_allocates(tiny_artifact):
    """`plan`'s fast-path figures are the loop's own allocations, summed (no second formula)."""
    from varedit_deploy.memory_plan import loop_buffer_bytes
    from varedit_deploy.runtime.loop import ITEMSIZE, ScaleLoop

    manifest = read_manifest(tiny_artifact)

    class Recording(OnnxRuntimeBackend):
        """Stands in for a bf16 engine set: its graphs take the caches and the text K/V in bf16."""

        compute_dtype = "bfloat16"

        def __init__(self):
            super().__init__(manifest)
            self.allocated = []

        def tensor_dtype(self, graph, tensor):
            return "bfloat16"

        def empty(self, shape, dtype):
            self.allocated.append((tuple(shape), dtype))
            return np.empty(shape, np.float16 if dtype == "bfloat16" else dtype)  # stands in for 2 bytes

    backend = Recording()
    loop = ScaleLoop(manifest, backend)
    loop.text_buffers(9)
    cache = [(s, d) for s, d in backend.allocated if d == "bfloat16" and len(s) == 4]
    kv, rest = loop_buffer_bytes(manifest.config, "bfloat16", "bfloat16", 9)
    assert kv == sum(np.prod(s) * 2 for s, _ in cache) and len(cache) == 2 * manifest.config.transformer.depth + 2
    assert kv + rest == sum(int(np.prod(s)) * ITEMSIZE[d] for s, d in backend.allocated)
    sched, t = manifest.config.schedule, manifest.config.transformer
    # spec 3.7: every layer's source and target K/V (layer 0's source rows feed sar_pool), plus the SAR
    rows = t.depth * (sched.source_tokens + sched.total_tokens) + sched.total_tokens
    assert kv == rows * 2 * 2 * t.dim * 2  # K and V, CFG batch 2, bf16


def test_device_array_views_are_offsets_into_one_allocation():
    """The loop's slices and reshapes on TensorRT's device buffers: pointer arithmetic only (no GPU here,
    so no allocation: the base is a made-up address and is given back as 0, which frees nothing)."""
    from varedit_deploy.runtime.gpu import DeviceArray

    base = DeviceArray(1 << 20, (6, 4), np.dtype("float32"))
    rows = base[2:5]
    assert rows.ptr == base.ptr + 2 * 16 and rows.shape == (3, 4) and rows.owner is base
    view = rows.reshape(1, 3, 4)
    assert view.ptr == rows.ptr and view.shape == (1, 3, 4) and view.owner is base
    assert rows.reshape((12,)).shape == (12,)
    with pytest.raises(ValueError, match="cannot view"):
        rows.reshape(5, 2)
    base.ptr = 0
