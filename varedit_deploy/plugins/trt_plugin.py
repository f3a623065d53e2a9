"""The step's self-attention as a TensorRT plugin (IPluginV3), for TensorRT and TensorRT-RTX.

It replaces exactly the ONNX `Attention` node the default export writes for each self-attention
(export/attention_nodes.py): q [1, n, heads*c] over keys and values
[1, L, heads*c] in the cache layout, softmax(q k^T * scale) v per head with fp32 softmax and
sums, out [1, n, heads*c] in the inputs' dtype. The export names it `varedit::VareditScaleAttention`
with `plugin_version` and `plugin_namespace` attributes, by which TensorRT's ONNX parser finds the
creator registered here.

Build half: shapes, dtypes, formats, and the kernels, compiled with Triton for the build target
(`plugin_kernels`) when TensorRT serialises the plugin, so the engine carries its cubins. Runtime
half: loads the cubins for this GPU and launches them on TensorRT's stream (`cuda_launch`);
neither Triton nor torch is needed where engines run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

from ..graph_io import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, plugin_record

DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}  # trt.DataType name -> torch name


@dataclass(frozen=True)
class PluginState:
    """Everything a plugin instance knows; its serialised fields are `heads`, `scale` and `kernels`."""

    heads: int
    scale: float
    arch: int | None = None  # build target (sm number); None at run time
    dtype: str | None = None  # set by configure_plugin
    head_dim: int | None = None
    kernels: tuple[dict[str, Any], ...] | None = None  # `cuda_launch.binary_to_json` records

    @classmethod
    def from_fields(cls, fields: dict[str, Any], arch: int | None = None) -> "PluginState":
        """From a PluginFieldCollection's data (ONNX attributes at build, serialised fields at run time)."""
        missing = {"heads", "scale"} - set(fields)
        if missing:
            raise ValueError(f"{PLUGIN_NAME} needs the fields heads and scale; missing {', '.join(sorted(missing))}")
        kernels = None
        if "kernels" in fields:
            kernels = tuple(json.loads(bytes(fields["kernels"]).decode()))
        return cls(int(fields["heads"][0]), float(fields["scale"][0]), arch, kernels=kernels)

    def configured(self, dtype_name: str, width: int) -> "PluginState":
        """The state once TensorRT fixed the inputs' type (a trt.DataType name) and row width."""
        if dtype_name not in DTYPE_NAMES:
            raise ValueError(f"{PLUGIN_NAME} computes in {', '.join(DTYPE_NAMES)}, not {dtype_name}")
        head_dim, rest = divmod(width, self.heads)
        if rest or head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"{PLUGIN_NAME}: rows of {width} in {self.heads} heads; each head must be a power of "
                             "two of at least 16 channels")
        return replace(self, dtype=DTYPE_NAMES[dtype_name], head_dim=head_dim)

    def compiled(self) -> "PluginState":
        """With kernels for the build target (compiled once per process and configuration)."""
        if self.kernels is not None:
            return self
        if self.arch is None or self.dtype is None:
            raise RuntimeError(f"{PLUGIN_NAME} has no kernels and no build target or dtype to compile them for")
        from .plugin_kernels import flat_attention_binaries

        return replace(self, kernels=flat_attention_binaries(self.arch, self.dtype, self.heads, self.head_dim))

    def field_values(self) -> list[tuple[str, Any, str]]:
        """(name, numpy data, PluginFieldType name) of the serialised fields."""
        import numpy as np

        assert self.kernels is not None, "compile before serialising"
        blob = json.dumps(list(self.kernels)).encode()
        return [("heads", np.array([self.heads], np.int32), "INT32"),
                ("scale", np.array([self.scale], np.float32), "FLOAT32"),
                ("kernels", np.frombuffer(blob, np.int8).copy(), "INT8")]


_CLASSES: dict[str, tuple[type, type]] = {}
_CREATORS: dict[str, Any] = {}  # module name -> the registered creator (kept alive here)


def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """(plugin, creator) classes on `trt`'s plugin interfaces (tensorrt or tensorrt_rtx)."""
    if trt.__name__ in _CLASSES:
        return _CLASSES[trt.__name__]

    class ScaleAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, state: PluginState, phase):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.num_outputs = 1
            self.state, self.phase = state, phase
            # {block_m: KernelBinary} for this GPU, and their modules, shared by every clone in the CUDA
            # context (cuda_launch.shared_kernels); both set at the first enqueue
            self.binaries = self.loaded = None
            self.sm_count = 0

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            twin = ScaleAttentionPlugin(self.state, self.phase)
            twin.binaries, twin.loaded, twin.sm_count = self.binaries, self.loaded, self.sm_count  # same context
            return twin

        # ---- build
        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            return (num_inputs == 3 and desc.format == trt.TensorFormat.LINEAR and desc.type.name in DTYPE_NAMES
                    and desc.type == in_out[0].desc.type)

        def configure_plugin(self, inputs, outputs):
            self.state = self.state.configured(inputs[0].desc.type.name, int(inputs[0].desc.dims[-1]))

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        # ---- runtime
        def on_shape_change(self, inputs, outputs):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            self.state = self.state.compiled()
            fields = [trt.PluginField(name, data, getattr(trt.PluginFieldType, kind))
                      for name, data, kind in self.state.field_values()]
            return trt.PluginFieldCollection(fields)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from . import cuda_launch

            if self.loaded is None:
                self.state = self.state.compiled()
                sm, self.sm_count = cuda_launch.current_device()
                binaries = dict(cuda_launch.binary_from_json(d) for d in self.state.kernels)
                by_arch = {(b.arch, m): b for m, b in binaries.items()}
                self.binaries = cuda_launch.select_binaries(by_arch, sm)
                self.loaded = cuda_launch.shared_kernels(self.binaries)  # once per context, not per clone
            launch = cuda_launch.flat_attention_launch(
                self.binaries, inputs[0], inputs[1], inputs[2], outputs[0], int(input_desc[0].dims[1]),
                int(input_desc[1].dims[1]), self.state.heads, self.state.scale, self.sm_count)
            self.loaded.launch(launch, stream)

    class ScaleAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            import numpy as np

            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField("heads", np.array([], np.int32), trt.PluginFieldType.INT32),
                trt.PluginField("scale", np.array([], np.float32), trt.PluginFieldType.FLOAT32)])
            self.arch: int | None = None  # the SM that builds compile kernels for

        def create_plugin(self, name, fc, phase):
            fields = {f.name: f.data for f in fc}
            build = phase == trt.TensorRTPhase.BUILD
            return ScaleAttentionPlugin(PluginState.from_fields(fields, self.arch if build else None), phase)

    _CLASSES[trt.__name__] = (ScaleAttentionPlugin, ScaleAttentionCreator)
    return _CLASSES[trt.__name__]


def register_plugin(trt: ModuleType, arch: int | None = None) -> dict[str, str]:
    """Register the creator with `trt`'s plugin registry (once per process); builds from now on
    compile its kernels for sm_`arch`. Returns `plugin_record()`."""
    creator = _CREATORS.get(trt.__name__)
    if creator is None:
        creator = plugin_classes(trt)[1]()
        if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
            raise RuntimeError(f"{trt.__name__} refused to register the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} plugin "
                               f"version {PLUGIN_VERSION} (another creator of that name and version?)")
        _CREATORS[trt.__name__] = creator
    creator.arch = arch
    return plugin_record()
