"""The scheduler on a real pipeline, without HTTP: batches, cancellation and deadlines between scales, drain."""

import time

import numpy as np
import pytest
from PIL import Image

from varedit_deploy.runtime.pipeline import EditPipeline
from varedit_deploy.serve.scheduler import DeadlineExceeded, EditCancelled, Job, NotAccepting, QueueFull, Scheduler


class Recorder:
    def __init__(self):
        self.batches, self.outcomes = [], []

    def batch(self, size): self.batches.append(size)
    def queue_wait(self, seconds): pass
    def preview(self, seconds): pass
    def finished(self, job, outcome, result): self.outcomes.append(outcome)


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return EditPipeline.from_artifacts(tiny_artifact)


@pytest.fixture(scope="module")
def image(photos):
    return Image.fromarray(photos["coffee"][::3, ::3])


def _job(pipe, image, seed, deadline_s=60.0, **kw):
    from dataclasses import replace

    return Job(image, "make the cup red", replace(pipe.config.sampling, seed=seed), time.monotonic() + deadline_s, **kw)


def test_requests_that_arrive_together_run_as_one_batch_with_identical_results(pipe, image):
    stats = Recorder()
    scheduler = Scheduler([pipe], max_batch=4, max_queue=8, batch_window_s=0.05, stats=stats)
    jobs = [_job(pipe, image, seed) for seed in (1, 2, 3)]
    scheduler.submit(jobs)
    results = [j.future.result(60) for j in jobs]
    scheduler.close()
    assert stats.batches == [3] and stats.outcomes == ["ok"] * 3
    for seed, r in zip((1, 2, 3), results):
        alone = pipe.edit(image, "make the cup red", seed=seed)
        assert np.array_equal(np.asarray(r.image), np.asarray(alone.image))


def test_cancel_and_deadline_stop_between_scales_and_the_worker_goes_on(pipe, image):
    stats = Recorder()
    scheduler = Scheduler([pipe], max_batch=1, max_queue=8, batch_window_s=0.0, stats=stats)
    seen = []
    cancelled = _job(pipe, image, 1, preview_scales=(2, 4))
    cancelled.on_preview = lambda index, picture: (seen.append((index, picture.size)), cancelled.cancel())

    def broken_preview(index, picture):
        raise RuntimeError("a bug in a preview consumer")

    broken = _job(pipe, image, 3, preview_scales=(2,), on_preview=broken_preview)
    fine = _job(pipe, image, 4)
    scheduler.submit([cancelled])
    with pytest.raises(EditCancelled):
        cancelled.future.result(60)
    assert seen == [(0, image.size)]  # cancelled after the first preview: the second never came
    late = _job(pipe, image, 2, deadline_s=0.02)  # starts in time, then passes its deadline mid-edit
    scheduler.submit([late])
    with pytest.raises(DeadlineExceeded):
        late.future.result(60)
    assert late.started is not None  # it ran, and stopped at a scale boundary
    scheduler.submit([broken, fine])
    with pytest.raises(RuntimeError, match="preview consumer"):
        broken.future.result(60)
    assert fine.future.result(60).image.size == image.size
    scheduler.close()
    assert stats.outcomes == ["cancelled", "deadline", "error", "ok"]


def test_queue_bound_and_drain(pipe, image):
    stats = Recorder()
    scheduler = Scheduler([pipe], max_batch=1, max_queue=2, batch_window_s=0.0, stats=stats)
    with pytest.raises(QueueFull) as full:
        scheduler.submit([_job(pipe, image, s) for s in range(3)])  # all or nothing
    assert full.value.retry_after_s >= 1
    jobs = [_job(pipe, image, s) for s in range(2)]
    scheduler.submit(jobs)
    scheduler.close()  # stops accepting, finishes what was queued
    assert all(j.future.done() and j.future.exception() is None for j in jobs)
    with pytest.raises(NotAccepting):
        scheduler.submit([_job(pipe, image, 5)])
    expired = _job(pipe, image, 6, deadline_s=-1.0)
    late = Scheduler([pipe], max_batch=1, max_queue=2, batch_window_s=0.0, stats=stats)
    late.submit([expired])
    with pytest.raises(DeadlineExceeded):
        expired.future.result(60)
    assert expired.started is None  # dropped in the queue, never ran
    late.close()


def test_a_forced_close_answers_the_queued_edits_cancelled(pipe, image):
    """A second SIGINT: queued edits are answered cancelled instead of run, the running one stops at its next scale."""
    stats = Recorder()
    scheduler = Scheduler([pipe], max_batch=1, max_queue=8, batch_window_s=0.0, stats=stats)
    first = _job(pipe, image, 1)
    queued = [_job(pipe, image, seed) for seed in (2, 3, 4)]
    scheduler.submit([first, *queued])
    scheduler.close(cancel=True)
    assert all(j.future.done() for j in [first, *queued])
    for job in queued:
        with pytest.raises(EditCancelled):
            job.future.result(0)
    assert stats.outcomes.count("cancelled") >= len(queued)  # `first` ran to its end, or was still queued too
