"""ONNX Runtime execution providers by short name, with options, set up the way ONNX Runtime expects.

A provider is written `NAME[:KEY=VALUE[,KEY=VALUE...]]` (the CLI's `--providers`, the API's
`providers=[...]`; the API also takes `(NAME, {KEY: VALUE})`); several are tried in order, and
ONNX Runtime puts every node the listed ones do not take on its CPU provider. NAME is a short
name of `PROVIDERS` or ONNX Runtime's own provider name. Keys of `FRIENDLY_OPTIONS` are ours
(they set the provider's own options); any other key goes to the provider as it is. Every
provider but cpu also takes `graphs=NAME+NAME...`: it runs those graphs only, and the others run
on the providers after it (e.g. `openvino:mode=fast,graphs=vae_encoder+vae_decoder cpu`).

Two ways of registering exist, and a session uses one: providers built into the installed
onnxruntime (CPU; CUDA and TensorRT in onnxruntime-gpu; OpenVINO in the older all-in-one
onnxruntime-openvino) are passed by name; plugin providers (OpenVINO's onnxruntime-ep-openvino,
TensorRT-RTX's onnxruntime-ep-nv-tensorrt-rtx, ONNX Runtime >= 1.23) are shared libraries that
are registered once per process and then chosen by device (`get_ep_devices`,
`add_provider_for_devices`). Naming a plugin provider the first way makes ONNX Runtime warn and
run on the CPU instead, so this module never does that: a provider that is missing, or offers no
device here, is a clear error naming what to install.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifact import Manifest
from ..engine_set import graph_profiles
from ..errors import ConfigError, VareditError, require


@dataclass(frozen=True)
class ProviderKind:
    ep_name: str  # ONNX Runtime's name of the provider
    install: str  # what makes it available
    plugin_module: str | None = None  # the Python package of its plugin library, for plugin providers
    on_cuda: bool = False  # its buffers live on a CUDA device: device-resident caches, CUDA graphs
    cuda_graph_option: str | None = None  # the provider option that turns CUDA graphs on
    profile_prefix: str | None = None  # `<prefix>_min_shapes` etc.: explicit TensorRT profiles


PROVIDERS: dict[str, ProviderKind] = {
    "cpu": ProviderKind("CPUExecutionProvider", "onnxruntime"),
    "openvino": ProviderKind("OpenVINOExecutionProvider", "pip install onnxruntime-ep-openvino (Intel CPUs, GPUs and "
                             "NPUs; ONNX Runtime >= 1.23)", plugin_module="onnxruntime_ep_openvino"),
    "cuda": ProviderKind("CUDAExecutionProvider", "onnxruntime-gpu in place of onnxruntime (pip uninstall "
                         "onnxruntime && pip install onnxruntime-gpu), and a CUDA GPU", on_cuda=True,
                         cuda_graph_option="enable_cuda_graph"),
    "tensorrt": ProviderKind("TensorrtExecutionProvider", "onnxruntime-gpu in place of onnxruntime, TensorRT's libraries "
                             "on the library path, and a CUDA GPU", on_cuda=True,
                             cuda_graph_option="trt_cuda_graph_enable", profile_prefix="trt_profile"),
    "nv_tensorrt_rtx": ProviderKind("NvTensorRTRTXExecutionProvider", "pip install onnxruntime-ep-nv-tensorrt-rtx "
                                    "(an RTX GPU and its driver)", plugin_module="onnxruntime_ep_nv_tensorrt_rtx",
                                    on_cuda=True, cuda_graph_option="enable_cuda_graph", profile_prefix="nv_profile"),
}
# Our option keys, per provider, and what they mean; any other key goes to ONNX Runtime as it is.
FRIENDLY_OPTIONS: dict[str, dict[str, str]] = {
    "openvino": {"mode": "exact (fp32 inference, the default) or fast (bf16 on CPUs, fp16 on GPUs and NPUs)",
                 "device": "CPU (default), GPU, NPU: which OpenVINO device",
                 "threads": "inference threads on the CPU device"},
    "cuda": {"cuda_graph": "1 (default): capture each call once and replay it; 0: never", "device_id": "GPU index"},
    "tensorrt": {"cuda_graph": "1 (default) or 0, as for cuda", "device_id": "GPU index",
                 "cache_dir": "where engines and the timing cache are kept (default: the user's cache folder)",
                 "fp16": "1: let TensorRT run fp32 graphs in fp16"},
    "nv_tensorrt_rtx": {"cuda_graph": "1 (default) or 0, as for cuda", "device_id": "GPU index",
                        "cache_dir": "where compiled kernels are kept (default: the user's cache folder)"},
}
GRAPHS_OPTION = "graphs"  # which graphs a provider runs, '+'-separated (any provider but cpu)
OPENVINO_MODES = {"exact": {"CPU": "f32", "GPU": "f32", "NPU": "f32"}, "fast": {"CPU": "bf16", "GPU": "f16", "NPU": "f16"}}
_PLUGINS_REGISTERED: set[str] = set()  # plugin providers registered in this process (once each)


@dataclass(frozen=True)
class ProviderSpec:
    """One provider as asked for: its short name and its options (ours and ONNX Runtime's)."""

    name: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> ProviderKind:
        return PROVIDERS[self.name]

    def runs(self, graph: str) -> bool:
        """Whether this provider is asked to run `graph` (all graphs unless `graphs=` names some)."""
        return GRAPHS_OPTION not in self.options or graph in self.options[GRAPHS_OPTION].split("+")

    def __str__(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.options.items()) if self.options else "")


def _short_name(name: str) -> str:
    lowered = name.strip().lower().replace("-", "_")
    for short, kind in PROVIDERS.items():
        if lowered in (short, kind.ep_name.lower()):
            return short
    aliases = {"trt": "tensorrt", "tensorrt_rtx": "nv_tensorrt_rtx", "trt_rtx": "nv_tensorrt_rtx", "ov": "openvino"}
    if lowered in aliases:
        return aliases[lowered]
    raise ConfigError(f"unknown execution provider {name!r}; choose from {', '.join(PROVIDERS)} "
                      "(or ONNX Runtime's own names, e.g. CUDAExecutionProvider)")


def parse_provider(text: str | ProviderSpec | tuple[str, Mapping[str, Any]]) -> ProviderSpec:
    """`NAME`, `NAME:KEY=VALUE,KEY=VALUE`, `(NAME, {KEY: VALUE})` or a ProviderSpec -> a ProviderSpec."""
    if isinstance(text, ProviderSpec):
        return text
    if isinstance(text, tuple):
        name, options = text
        return _checked(ProviderSpec(_short_name(name), {str(k): _option_text(v) for k, v in options.items()}))
    name, _, rest = str(text).partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"provider {text!r}: options are KEY=VALUE separated by commas, got {item!r}")
        options[key.strip()] = value.strip()
    return _checked(ProviderSpec(_short_name(name), options))


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _checked(spec: ProviderSpec) -> ProviderSpec:
    options = spec.options
    if GRAPHS_OPTION in options and (spec.name == "cpu" or not all(options[GRAPHS_OPTION].split("+"))):
        raise ConfigError(f"{spec.name}: graphs= names graphs as NAME+NAME..., and the cpu provider takes every graph "
                          "the others leave")
    if spec.name == "openvino":
        if options.get("mode", "exact") not in OPENVINO_MODES:
            raise ConfigError(f"openvino: mode {options['mode']!r} is not one of {', '.join(OPENVINO_MODES)}")
        if "load_config" in options and ({"mode", "threads"} & set(options)):
            raise ConfigError("openvino: give either mode/threads or your own load_config, not both")
    for key in ("cuda_graph", "fp16"):
        if key in FRIENDLY_OPTIONS.get(spec.name, {}) and options.get(key, "1") not in ("0", "1"):
            raise ConfigError(f"{spec.name}: {key} is 0 or 1, got {options[key]!r}")
    return spec


def parse_providers(items: Sequence[str | ProviderSpec | tuple] | None) -> list[ProviderSpec]:
    """The providers of a backend, in order; none given: the CPU provider."""
    specs = [parse_provider(item) for item in (items or ["cpu"])]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"a provider is named twice in {[str(s) for s in specs]}")
    if "tensorrt" in names and "nv_tensorrt_rtx" in names:
        raise ConfigError("tensorrt and nv_tensorrt_rtx cannot run in one session: choose one")
    if len({s.kind.on_cuda for s in specs if s.name != "cpu"}) > 1:
        raise ConfigError("a CUDA provider and a non-CUDA provider (e.g. openvino) do not share buffers: choose one kind")
    return specs


def check_graphs(specs: list[ProviderSpec], manifest: Manifest) -> None:
    """Refuse `graphs=` names the artifact does not have."""
    for spec in specs:
        unknown = [g for g in spec.options.get(GRAPHS_OPTION, "").split("+") if g and g not in manifest.graphs]
        if unknown:
            raise ConfigError(f"{spec.name}: graphs= names {', '.join(unknown)}, which artifact {manifest.folder} "
                              f"does not have (it has {', '.join(manifest.graphs)})")


def default_cache_dir() -> Path:
    """Where provider caches (TensorRT engines, compiled kernels) go unless `cache_dir=` says otherwise:
    never inside the artifact, whose folder holds only what its manifest lists."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "varedit-deploy" / "onnxruntime"


def openvino_options(spec: ProviderSpec, plugin: bool) -> dict[str, str]:
    """OpenVINO's own options from ours: the precision always explicit (OpenVINO's default is bf16 on
    CPUs with AMX, fp32 elsewhere), through `load_config` (the documented way; `precision` is
    deprecated); the device chosen by device (plugin) or by `device_type` (built-in provider)."""
    options = {k: v for k, v in spec.options.items() if k not in FRIENDLY_OPTIONS["openvino"] and k != GRAPHS_OPTION}
    device = spec.options.get("device", "CPU").upper()
    if "load_config" not in options:
        config = {"INFERENCE_PRECISION_HINT": OPENVINO_MODES[spec.options.get("mode", "exact")].get(device, "f32")}
        if "threads" in spec.options:
            config["INFERENCE_NUM_THREADS"] = spec.options["threads"]
        options["load_config"] = json.dumps({device: config})
    if not plugin:
        options.setdefault("device_type", device)
    return options


def _profile_options(prefix: str, manifest: Manifest, graph: str) -> dict[str, str]:
    """Explicit TensorRT profiles of `graph` (one per scale for `step` and `sample`, as `build` makes
    them): `<prefix>_min_shapes` etc., where one input named several times means several profiles.
    Without them the provider builds an engine for the first shapes it sees and rebuilds on others."""
    profiles = graph_profiles(manifest, graph)
    if not profiles:
        return {}
    out = {}
    for which, key in enumerate(("min", "opt", "max")):
        out[f"{prefix}_{key}_shapes"] = ",".join(f"{tensor}:{'x'.join(str(d) for d in shapes[which])}"
                                                for profile in profiles for tensor, shapes in profile.shapes.items())
    return out


def provider_options(spec: ProviderSpec, manifest: Manifest, graph: str, plugin: bool,
                     cuda_graph: bool) -> dict[str, str]:
    """The options the provider gets for a session of `graph`, all strings, ours translated.
    `cuda_graph`: whether this session may capture CUDA graphs (off after a provider refused)."""
    name, options = spec.name, {k: v for k, v in spec.options.items() if k != GRAPHS_OPTION}
    if name == "openvino":
        return openvino_options(spec, plugin)
    kind = spec.kind
    out = {k: v for k, v in options.items() if k not in FRIENDLY_OPTIONS.get(name, {}) or k == "device_id"}
    if kind.cuda_graph_option is not None:
        out[kind.cuda_graph_option] = "1" if cuda_graph and options.get("cuda_graph", "1") == "1" else "0"
    if kind.profile_prefix is not None:
        out.update(_profile_options(kind.profile_prefix, manifest, graph))
        cache = Path(options.get("cache_dir") or default_cache_dir() / name / _graph_key(manifest, graph))
        if name == "tensorrt":
            out.update({"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(cache)})
            if options.get("fp16") == "1":
                out["trt_fp16_enable"] = "1"
        else:
            out["nv_runtime_cache_path"] = str(cache)
    return out


def _graph_key(manifest: Manifest, graph: str) -> str:
    """A cache folder name per graph file: a re-export with other weights or shapes gets another."""
    return f"{graph}-{manifest.graphs[graph]['files'][0]['sha256'][:16]}"


@dataclass
class Resolved:
    """The providers of a backend as this process can run them."""

    specs: list[ProviderSpec]
    plugin: bool  # chosen by device (plugin providers); else by name
    devices: dict[str, list]  # short name -> OrtEpDevice list (plugin way only)

    @property
    def on_cuda(self) -> bool:
        return any(s.kind.on_cuda for s in self.specs)

    @property
    def device_id(self) -> int:
        return next((int(s.options.get("device_id", 0)) for s in self.specs if s.kind.on_cuda), 0)

    @property
    def cuda_graphs(self) -> bool:
        return any(s.kind.cuda_graph_option and s.options.get("cuda_graph", "1") == "1" for s in self.specs)

    def for_graph(self, graph: str) -> list[ProviderSpec]:
        """The providers that run `graph`, in order (the CPU provider where none other does)."""
        return [s for s in self.specs if s.runs(graph)] or [ProviderSpec("cpu")]

    def configure(self, session_options, manifest: Manifest, graph: str, cuda_graph: bool = True) -> list | None:
        """Put the providers of `graph` on `session_options` for a session of it: the plugin way (returns
        None), or the list to pass to InferenceSession by name."""
        specs = self.for_graph(graph)
        options = [provider_options(s, manifest, graph, self.plugin, cuda_graph) for s in specs]
        if self.plugin:
            for spec, opts in zip(specs, options):
                if spec.name != "cpu":  # ONNX Runtime appends its CPU provider itself
                    session_options.add_provider_for_devices(self.devices[spec.name], opts)
            return None
        return [(s.kind.ep_name, o) for s, o in zip(specs, options)] + (
            [] if any(s.name == "cpu" for s in specs) else ["CPUExecutionProvider"])


def resolve(specs: list[ProviderSpec]) -> Resolved:
    """Check that every provider is available here, registering plugin libraries on the way; an error
    says what is missing and how to get it."""
    ort = require("onnxruntime", "ort")
    available = set(ort.get_available_providers())
    if all(s.kind.ep_name in available for s in specs):
        return Resolved(specs, False, {})
    devices = {}
    for spec in specs:
        if spec.name == "cpu":
            continue
        if spec.kind.ep_name not in _ep_names(ort) and spec.kind.plugin_module is not None:
            _register_plugin(ort, spec)
        found = [d for d in _ep_devices(ort) if d.ep_name == spec.kind.ep_name]
        if spec.name == "openvino":
            found = [d for d in found if d.ep_metadata.get("ov_device", "").upper() == spec.options.get("device", "CPU").upper()]
        if not found:
            raise VareditError(_no_device(ort, spec, available))
        index = int(spec.options.get("device_id", 0))
        devices[spec.name] = found[index:index + 1] if index < len(found) else []
        if not devices[spec.name]:
            raise VareditError(f"{spec.name}: device_id {index}, but ONNX Runtime lists {len(found)} device(s) for it")
    return Resolved(specs, True, devices)


def _ep_devices(ort) -> list:
    return list(ort.get_ep_devices()) if hasattr(ort, "get_ep_devices") else []


def _ep_names(ort) -> set[str]:
    return {d.ep_name for d in _ep_devices(ort)}


def _register_plugin(ort, spec: ProviderSpec) -> None:
    """Register the provider's plugin library once per process (ONNX Runtime refuses a second time)."""
    kind = spec.kind
    if not hasattr(ort, "register_execution_provider_library"):
        raise VareditError(f"{spec.name} is a plugin provider, which needs onnxruntime >= 1.23 (installed: "
                           f"{ort.__version__}); upgrade onnxruntime, or {kind.install}")
    try:
        plugin = __import__(kind.plugin_module)
    except ImportError:
        raise VareditError(f"execution provider {spec.name} ({kind.ep_name}) is not installed: {kind.install}") from None
    if kind.ep_name in _PLUGINS_REGISTERED:
        return
    try:
        ort.register_execution_provider_library(kind.ep_name, plugin.get_library_path())
    except Exception as e:  # a library that cannot load (a missing CUDA driver, say) fails here
        raise VareditError(f"{spec.name}: ONNX Runtime could not load the plugin library of {kind.plugin_module} "
                           f"({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})") from None
    _PLUGINS_REGISTERED.add(kind.ep_name)


def _no_device(ort, spec: ProviderSpec, available: set[str]) -> str:
    """Why a provider has no device here, in one sentence that says what to do."""
    kind = spec.kind
    if kind.plugin_module is None:
        if spec.name == "openvino" or kind.ep_name not in available:
            return f"execution provider {spec.name} ({kind.ep_name}) is not in this onnxruntime: {kind.install}"
        return (f"{spec.name} ({kind.ep_name}) is built into this onnxruntime and cannot be combined with plugin "
                "providers in one session; choose one of them")
    cpu = next((d.device for d in _ep_devices(ort) if d.ep_name == "CPUExecutionProvider"), None)
    vendor = f"{cpu.vendor} (PCI vendor id {cpu.vendor_id:#06x})" if cpu is not None else "unknown"
    offered = sorted({d.ep_metadata.get("ov_device", "?") for d in _ep_devices(ort) if d.ep_name == kind.ep_name})
    if spec.name == "openvino":
        return (f"openvino: the OpenVINO plugin offers no {spec.options.get('device', 'CPU').upper()} device here "
                f"(it offers {', '.join(offered) or 'none'}); it supports Intel CPUs, GPUs and NPUs only, and this "
                f"machine's CPU vendor is {vendor}; use --providers cpu here")
    return (f"{spec.name}: the {kind.plugin_module} plugin is registered but offers no device here (it needs an "
            "NVIDIA RTX GPU and its driver)")
