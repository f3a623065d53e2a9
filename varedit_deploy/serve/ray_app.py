"""The same server as a Ray Serve deployment: N replicas, one device each, autoscaled on load.

Each replica loads and warms its own pipeline and serves the unchanged Starlette app (routes,
limits, errors, previews, metrics); Ray's proxy spreads requests over replicas and scales their
number on ongoing requests per replica, which is this server's queue depth plus what it runs.
With `gpus_per_replica=1` Ray gives each replica its own GPU (as device 0). Needs `[cluster]`.

    serve run varedit_deploy.serve.ray_app:app_builder artifacts=ART replicas=2

The playground page comes with the app (GET / on Ray's proxy); `ui=false` turns it off.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import require
from .options import ServeOptions

serve = require("ray.serve", "cluster", package="ray[serve]")


@serve.ingress()
class VareditReplica:
    """One replica: a loaded, warmed ServerState behind the app of `app.py`."""

    def __init__(self, options: ServeOptions):
        from .state import ServerState

        self.state = ServerState(options)
        self.state.load()

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.state)

    def __del__(self):
        self.state.drain()
        self.state.close()  # queued edits finish before the replica goes


# How fast autoscaling reacts (Ray's defaults: 30 s, 600 s and 30 s): how long load must last before a
# replica is added or removed, and the window ongoing requests are averaged over. (How often they are
# reported is Ray's environment: RAY_SERVE_{HANDLE,REPLICA}_AUTOSCALING_METRIC_PUSH_INTERVAL_S, 10 s.)
AUTOSCALING_TIMES = ("upscale_delay_s", "downscale_delay_s", "look_back_period_s")


def deployment(options: ServeOptions, replicas: int = 2, gpus_per_replica: float = 0.0,
               max_replicas: int | None = None, target_ongoing_requests: float | None = None,
               times: dict[str, float] | None = None):
    """A bound Ray Serve application: fixed `replicas`, or autoscaling from `replicas` between 1 and
    `max_replicas`; `times` (AUTOSCALING_TIMES) sets how fast it reacts (Ray's defaults suit production;
    the tests shorten them to see a replica come and go within seconds)."""
    unknown = sorted(set(times or {}) - set(AUTOSCALING_TIMES))
    if unknown or (times and max_replicas is None):
        raise ValueError(f"unknown autoscaling times {unknown}; use {', '.join(AUTOSCALING_TIMES)}" if unknown
                         else f"{', '.join(times or {})} apply to autoscaling: give max_replicas too")
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if max_replicas is not None:
        scaling = {"autoscaling_config": {
            "min_replicas": 1, "initial_replicas": replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests or options.max_batch + 1, **(times or {})}}
    return serve.deployment(
        VareditReplica, name="varedit",
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica},
        max_ongoing_requests=options.max_queue + options.max_batch,  # past it, Ray queues at the proxy
        **scaling,
    ).bind(dataclasses.replace(options, workers=1))


def app_builder(args: dict[str, str]):
    """`serve run varedit_deploy.serve.ray_app:app_builder artifacts=ART replicas=2 [gpus_per_replica=1]
    [max_replicas=8 [upscale_delay_s=30 ...]] [backend=tensorrt] [max_batch=4] ...`
    (any ServeOptions field as key=value)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    gpus = float(args.pop("gpus_per_replica", 0))
    max_replicas = int(args.pop("max_replicas")) if "max_replicas" in args else None
    times = {key: float(args.pop(key)) for key in AUTOSCALING_TIMES if key in args}
    fields = {f.name: f.type for f in dataclasses.fields(ServeOptions)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; use ServeOptions fields: {sorted(fields)}")
    options = ServeOptions(**{k: _cast(str(fields[k]), v) for k, v in args.items()})
    return deployment(options, replicas, gpus, max_replicas, times=times)


def _cast(kind: str, value: str):
    """A command-line string as the ServeOptions field type names it (annotations are strings)."""
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        if value.lower() not in ("true", "false"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() == "true"
    if kind.startswith("tuple"):
        return tuple(v for v in value.split(",") if v)
    return value
