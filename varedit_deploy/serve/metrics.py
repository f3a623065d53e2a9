"""Prometheus metrics of one server: queue, batches, per-stage latency, outcomes, errors, caches.

Each server has its own registry (several can run in one process, as in the tests). Cache
counters are read from the pipelines at scrape time rather than mirrored.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..runtime.pipeline import EditPipeline, EditResult
from .scheduler import Job, Scheduler, SchedulerStats

STAGES = ("text_encoder", "vae_encoder", "transformer", "vae_decoder")
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics(SchedulerStats):
    def __init__(self, pipelines: Sequence[EditPipeline]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram("varedit_batch_size", "Edits handed to one edit_batch call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32))
        self.stage = Histogram("varedit_stage_seconds", "Time per stage of an edit", ["stage"], registry=r,
                               buckets=SECONDS)
        self.request = Histogram("varedit_request_seconds", "Request time, arrival to last byte", ["stream"],
                                 registry=r, buckets=SECONDS)
        self.edits = Counter("varedit_edits", "Edits by outcome (ok, cancelled, deadline, error)", ["outcome"],
                             registry=r)
        self.errors = Counter("varedit_errors", "Error responses by status and code", ["status", "code"], registry=r)
        self.queue_depth = Gauge("varedit_queue_depth", "Edits waiting for a worker", registry=r)
        self.in_flight = Gauge("varedit_edits_in_flight", "Edits a worker is running", registry=r)
        r.register(_CacheCollector(pipelines))

    def bind(self, scheduler: Scheduler) -> None:
        self.queue_depth.set_function(lambda: scheduler.depth)
        self.in_flight.set_function(lambda: scheduler.busy)

    # SchedulerStats
    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def queue_wait(self, seconds: float) -> None:
        self.stage.labels("queue").observe(seconds)

    def preview(self, seconds: float) -> None:
        self.stage.labels("preview").observe(seconds)

    def finished(self, job: Job, outcome: str, result: EditResult | None) -> None:
        self.edits.labels(outcome).inc()
        if result is not None:
            for name in STAGES:
                self.stage.labels(name).observe(result.timings_ms[name] / 1e3)  # histograms in seconds

    def error(self, status: int, code: str | None) -> None:
        self.errors.labels(str(status), code or "none").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """Hits, misses and bytes of the pipelines' text and image caches, summed over workers."""

    def __init__(self, pipelines: Sequence[EditPipeline]):
        self.pipelines = pipelines

    def collect(self):
        hits = CounterMetricFamily("varedit_cache_hits", "Cache hits (the encoder was skipped)", labels=["cache"])
        misses = CounterMetricFamily("varedit_cache_misses", "Cache misses", labels=["cache"])
        size = GaugeMetricFamily("varedit_cache_bytes", "Bytes held by the cache", labels=["cache"])
        for name, attr in (("text", "text_cache"), ("image", "image_cache")):
            caches = [getattr(p, attr) for p in self.pipelines]
            hits.add_metric([name], sum(c.hits for c in caches))
            misses.add_metric([name], sum(c.misses for c in caches))
            size.add_metric([name], sum(c.bytes for c in caches))
        yield from (hits, misses, size)
