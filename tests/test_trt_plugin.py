"""The step's self-attention as a TensorRT plugin: what runs without a GPU (export, the plugin's build
half on TensorRT-RTX, an AOT build for sm89, launch arithmetic, compatibility checks)."""

import ctypes
import json

import numpy as np
import pytest

from varedit_deploy.artifact import read_manifest
from varedit_deploy.builder.engines import BuildOptions, build_engines
from varedit_deploy.engine_set import check_engines
from varedit_deploy.cli import main
from varedit_deploy.errors import ArtifactError, VareditError
from varedit_deploy.plugins.aot import KernelBinary
from varedit_deploy.plugins.cuda_launch import (binary_from_json, binary_to_json, flat_attention_launch, pack_params,
                                                select_binaries, usable_arch)
from varedit_deploy.plugins.plan import LARGE, SMALL
from varedit_deploy.plugins.trt_plugin import PLUGIN_NAME, PLUGIN_VERSION, PluginState, plugin_classes, plugin_record

trt = pytest.importorskip("tensorrt_rtx")
PARAMS = ("*fp16",) * 4 + ("i32", "i32", "fp32")


def _binary(arch: int, warps: int) -> KernelBinary:
    return KernelBinary(arch, "_flat_attention_kernel", PARAMS, warps, 6144, b"\x7fELF" + bytes([arch, warps]))


@pytest.fixture(scope="module")
def plugin_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugin") / "tiny-2b"
    assert main(["export", "--random-weights", "--model", "tiny-2b", "--out", str(out), "--attention", "plugin"]) == 0
    return out


def test_export_writes_plugin_nodes_for_the_self_attentions_only(plugin_artifact):
    import onnx

    manifest = read_manifest(plugin_artifact)
    step = manifest.graphs["step"]
    depth = manifest.config.transformer.depth
    assert manifest.data["attention"] == "plugin"
    assert step["plugin"] == {**plugin_record(), "nodes": depth} and step["ops"]["Attention"] == depth  # cross stays
    assert "ONNX Runtime cannot run" in step["validation"]
    model = onnx.load(str(manifest.graph_path("step")), load_external_data=False)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 23), ("varedit", 1)}
    nodes = [n for n in model.graph.node if n.domain == "varedit"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    heads = 2 * manifest.config.transformer.heads  # CFG rows x heads
    assert nodes[0].op_type == PLUGIN_NAME and len(nodes[0].input) == 3
    assert attrs == {"heads": heads, "scale": 1.0, "plugin_version": b"1", "plugin_namespace": b"varedit"}


def test_onnx_runtime_refuses_a_plugin_artifact_in_one_line(plugin_artifact, capsys):
    from varedit_deploy.runtime.pipeline import EditPipeline

    with pytest.raises(ArtifactError, match="export the artifact again without --attention plugin") as e:
        EditPipeline.from_artifacts(plugin_artifact, backend="onnxruntime")
    assert "\n" not in str(e.value)


def test_plugin_state_round_trips_through_plugin_fields():
    kernels = tuple(binary_to_json(m, _binary(89, w)) for m, w, _ in (SMALL, LARGE))
    state = PluginState(8, 0.5, kernels=kernels)
    fields = trt.PluginFieldCollection([trt.PluginField(n, d, getattr(trt.PluginFieldType, k))
                                        for n, d, k in state.field_values()])
    back = PluginState.from_fields({f.name: f.data for f in fields})
    assert back == state and dict(binary_from_json(d) for d in back.kernels)[LARGE[0]] == _binary(89, LARGE[1])
    with pytest.raises(ValueError, match="missing scale"):
        PluginState.from_fields({"heads": np.array([8], np.int32)})


def test_plugin_build_half_types_formats_and_configuration():
    plugin_cls, creator_cls = plugin_classes(trt)
    creator = creator_cls()
    creator.arch = 89
    fields = trt.PluginFieldCollection([trt.PluginField("heads", np.array([4], np.int32), trt.PluginFieldType.INT32),
                                        trt.PluginField("scale", np.array([1.0], np.float32),
                                                        trt.PluginFieldType.FLOAT32)])
    plugin = creator.create_plugin(PLUGIN_NAME, fields, trt.TensorRTPhase.BUILD)
    assert (plugin.plugin_name, plugin.plugin_version, plugin.state.arch) == (PLUGIN_NAME, PLUGIN_VERSION, 89)
    assert plugin.get_output_data_types([trt.DataType.BF16] * 3) == [trt.DataType.BF16]

    def desc(kind, fmt=trt.TensorFormat.LINEAR, width=128):
        d = trt.DynamicPluginTensorDesc()
        d.desc.type, d.desc.format, d.desc.dims = kind, fmt, trt.Dims([1, -1, width])
        return d

    half = [desc(trt.DataType.HALF) for _ in range(4)]
    assert all(plugin.supports_format_combination(i, half, 3) for i in range(4))
    assert not plugin.supports_format_combination(3, [*half[:3], desc(trt.DataType.FLOAT)], 3)
    assert not plugin.supports_format_combination(0, [desc(trt.DataType.INT8)] * 4, 3)
    assert not plugin.supports_format_combination(0, [desc(trt.DataType.HALF, trt.TensorFormat.HWC)] * 4, 3)
    plugin.configure_plugin(half[:3], half[3:])
    assert (plugin.state.dtype, plugin.state.head_dim) == ("float16", 32)
    with pytest.raises(ValueError, match="power of"):
        plugin.configure_plugin([desc(trt.DataType.HALF, width=4 * 24)] * 3, half[3:])
    twin = plugin.clone()
    assert twin.state == plugin.state and twin is not plugin


def test_launch_grid_parameters_and_cubin_selection_for_the_sm():
    binaries = {(arch, m): _binary(arch, w) for arch in (80, 89) for m, w, _ in (SMALL, LARGE)}
    assert usable_arch({80, 89}, 89) == 89 and usable_arch({80}, 86) == 80 and usable_arch({89}, 90) is None
    with pytest.raises(VareditError, match=r"kernels for sm80, sm89, not for this GPU \(sm90\); rebuild"):
        select_binaries(binaries, 90)
    chosen = select_binaries(binaries, 86)  # sm80 cubins run on sm86
    assert {b.arch for b in chosen.values()} == {80}
    # 1 query row over 70 keys, 8 heads: small tiles, one block per head; 4096 rows x 56 heads: large tiles.
    small = flat_attention_launch(chosen, 0x1000, 0x2000, 0x3000, 0x4000, 1, 70, 8, 1.0, 132)
    assert (small.block_m, small.grid, small.block) == (SMALL[0], (1, 8, 1), (32 * SMALL[1], 1, 1))
    values, types = small.params
    assert values == (0x1000, 0x2000, 0x3000, 0x4000, 1, 70, 1.0, 0, 0)
    assert types == (ctypes.c_void_p,) * 4 + (ctypes.c_int32, ctypes.c_int32, ctypes.c_float) + (ctypes.c_void_p,) * 2
    large = flat_attention_launch(chosen, 0x1000, 0x2000, 0x3000, 0x4000, 4096, 14617, 56, 1.0, 132)
    assert (large.block_m, large.grid, large.block[0]) == (LARGE[0], (32, 56, 1), 32 * LARGE[1])
    with pytest.raises(VareditError, match="not 16-byte aligned"):
        pack_params(chosen[SMALL[0]], (0x1008, 0x2000, 0x3000, 0x4000, 1, 70, 1.0))
    with pytest.raises(VareditError, match="takes 7 parameters"):
        pack_params(chosen[SMALL[0]], (0x1000,))


def test_tensorrt_rtx_builds_the_step_with_the_plugin_for_sm89(plugin_artifact):
    folder = build_engines(plugin_artifact, BuildOptions(target="sm89"), progress=lambda _: None, graphs=["step"])
    data = json.loads((folder / "engines.json").read_text())
    depth = read_manifest(plugin_artifact).config.transformer.depth
    assert data["plugins"] == [plugin_record()]
    layers = data["engines"]["step"]["network"]["layers"]
    assert layers["PLUGIN_V3"] == depth and layers["ATTENTION_INPUT"] == depth  # self: plugin; cross: IAttention
    engine = (folder / "step.engine").read_bytes()
    assert b"_flat_attention_kernel" in engine  # the cubins travel inside the engine (the plugin's fields)
    # The runtime refuses engines whose plugin version it does not have, naming both.
    doctored = {**data, "plugins": [{**plugin_record(), "version": "2"}]}
    (folder / "engines.json").write_text(json.dumps(doctored))
    problems = check_engines(folder, read_manifest(plugin_artifact), data["tensorrt_version"], "sm89")
    assert (f"the engines need plugin varedit::{PLUGIN_NAME} version 2, this varedit-deploy has version "
            f"{PLUGIN_VERSION}") in problems


def test_the_parser_library_link_is_this_installation_s(tmp_path, monkeypatch):
    """The unversioned name the parser dlopens must map this venv's library: another venv's copy (same
    TensorRT-RTX version, a link left by its build) loads beside ours, two registries, a corrupt heap."""
    from pathlib import Path

    import tensorrt_rtx_libs

    from varedit_deploy.builder.tensorrt_api import UNVERSIONED_RTX_LIBRARY, parser_plugin_library_dir

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    ours = sorted(Path(tensorrt_rtx_libs.__file__).parent.glob(UNVERSIONED_RTX_LIBRARY + ".*"))[0].resolve()
    folder = parser_plugin_library_dir(trt)
    link = folder / UNVERSIONED_RTX_LIBRARY
    assert link.resolve() == ours
    other = tmp_path / "other-venv" / (UNVERSIONED_RTX_LIBRARY + ".1")
    other.parent.mkdir()
    other.write_bytes(b"")
    link.unlink()
    link.symlink_to(other)  # what a same-version build from another venv could have left
    assert parser_plugin_library_dir(trt) == folder and link.resolve() == ours
    sdk = tmp_path / "sdk"  # another libtensorrt_rtx.so on the loader path is not trusted to be ours
    sdk.mkdir()
    (sdk / UNVERSIONED_RTX_LIBRARY).symlink_to(ours)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(sdk))
    assert parser_plugin_library_dir(trt) == folder
    monkeypatch.setenv("LD_LIBRARY_PATH", f"{folder}:{sdk}")  # the child build_engines starts
    assert parser_plugin_library_dir(trt) is None


def test_plugin_clones_share_one_loaded_copy_of_the_cubins_per_cuda_context(monkeypatch):
    """TensorRT clones the plugin for every execution context, and the backend makes one context per
    captured call: each clone loading its own modules would load the same cubins hundreds of times.
    They are loaded once per CUDA context and shared; another context loads its own."""
    from types import SimpleNamespace

    from fake_tensorrt import FakeDriver
    from varedit_deploy.plugins import cuda_launch

    fake = FakeDriver(compute_capability=(8, 9))
    monkeypatch.setattr(cuda_launch, "driver", lambda: fake)
    monkeypatch.setattr(cuda_launch, "_LOADED", {})
    kernels = tuple(binary_to_json(m, _binary(arch, w)) for arch in (80, 89) for m, w, _ in (SMALL, LARGE))
    plugin_cls, _ = plugin_classes(trt)
    plugin = plugin_cls(PluginState(8, 1.0, kernels=kernels), trt.TensorRTPhase.RUNTIME)
    q, kv = SimpleNamespace(dims=(1, 4, 8 * 32)), SimpleNamespace(dims=(1, 70, 8 * 32))
    clones = [plugin.attach_to_context(None) for _ in range(6)]
    for stream, clone in enumerate(clones):
        clone.enqueue([q, kv, kv], [q], [0x1000, 0x2000, 0x3000], [0x4000], 0, stream)
    assert fake.loads() == 2 and len(fake.launches) == 6  # the sm89 small- and large-tile cubins, once
    assert {cubin for _, cubin in fake.modules.values()} == {_binary(89, w).cubin for _, w, _ in (SMALL, LARGE)}
    fake.context = 0x8000  # another context (another device): its own modules
    plugin.attach_to_context(None).enqueue([q, kv, kv], [q], [0x1000, 0x2000, 0x3000], [0x4000], 0, 9)
    assert fake.loads(0x8000) == 2 and fake.loads() == 4 and len(fake.launches) == 7

