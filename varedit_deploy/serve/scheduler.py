"""The queue between HTTP and the pipelines: bounded, batching, cancellable, with deadlines.

One worker thread per pipeline (one per device) takes the oldest edit, waits up to the batch
window for more (at most `max_batch`), drops those cancelled or past their deadline, and hands
the rest to ONE `EditPipeline.edit_batch` call. Between scales a hook checks cancellation and
the deadline and makes previews. A worker survives anything an edit raises: each failure goes
back to its own request. Results travel in `concurrent.futures.Future`s, so this module knows
nothing about asyncio or HTTP.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from PIL import Image

from ..config import SamplingConfig
from ..runtime.pipeline import EditPipeline, EditRequest, EditResult

log = logging.getLogger("varedit_deploy.serve")


class EditCancelled(Exception):
    """The client went away; the edit stopped at the next scale boundary."""


class DeadlineExceeded(Exception):
    """The request's deadline passed (in the queue or at a scale boundary)."""


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class NotAccepting(Exception):
    """The scheduler is draining for shutdown."""


@dataclass
class Job:
    """One edit of one request (a request with n images is n jobs with consecutive seeds)."""

    image: Image.Image
    instruction: str
    sampling: SamplingConfig
    deadline: float  # time.monotonic()
    preview_scales: tuple[int, ...] = ()
    on_preview: Callable[[int, Image.Image], None] | None = None  # (partial index, picture); worker thread
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # when a worker took it
    finished: float | None = None  # when its answer was set (a batch's items finish together)

    def cancel(self) -> None:
        self.cancelled.set()


class SchedulerStats:
    """What the metrics need to see; the scheduler calls these from its worker threads."""

    def batch(self, size: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def preview(self, seconds: float) -> None: ...
    def finished(self, job: Job, outcome: str, result: EditResult | None) -> None: ...


class Scheduler:
    def __init__(self, pipelines: Sequence[EditPipeline], max_batch: int, max_queue: int, batch_window_s: float,
                 stats: SchedulerStats | None = None, worker_init: Callable[[int], None] | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.pipelines, self.max_batch, self.max_queue = list(pipelines), max_batch, max_queue
        self.batch_window_s = batch_window_s
        self.stats = stats or SchedulerStats()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._busy = 0
        self._edit_seconds = 1.0  # running mean, for Retry-After
        self._worker_init = worker_init
        self._threads = [threading.Thread(target=self._work, args=(i, p), name=f"varedit-worker-{i}", daemon=True)
                         for i, p in enumerate(self.pipelines)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ producers
    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return self._busy

    def has_room(self, edits: int) -> bool:
        """Whether `edits` more fit in the queue now (`submit` asks again, under its lock)."""
        return len(self._queue) + edits <= self.max_queue

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all of `jobs` or none: QueueFull past `max_queue`, NotAccepting while draining."""
        with self._cond:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            if not self.has_room(len(jobs)):
                raise QueueFull(self.retry_after_s())
            self._queue.extend(jobs)
            self._cond.notify_all()

    def retry_after_s(self) -> int:
        """A fair wait before retrying: the queue ahead, shared by the workers, at the recent edit time."""
        ahead = (len(self._queue) + self._busy) / max(len(self.pipelines), 1)
        return max(1, int(ahead * self._edit_seconds + 0.999))

    def close(self, timeout: float | None = None, cancel: bool = False) -> None:
        """Stop accepting, let the workers finish every queued edit (or, with `cancel`, answer the
        queued ones cancelled and stop the running ones at their next scale), and wait for them."""
        with self._cond:
            self._accepting = False
            if cancel:
                for job in self._queue:
                    job.cancel()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    # -------------------------------------------------------------- workers
    def _take_batch(self) -> list[Job]:
        with self._cond:
            while not self._queue:
                if not self._accepting:
                    return []
                self._cond.wait()
            batch = [self._queue.popleft()]
            until = time.monotonic() + self.batch_window_s
            while len(batch) < self.max_batch:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                left = until - time.monotonic()
                if left <= 0 or not self._accepting:
                    break
                self._cond.wait(left)
            self._busy += len(batch)
            return batch

    def _work(self, index: int, pipe: EditPipeline) -> None:
        if self._worker_init is not None:
            self._worker_init(index)
        while True:
            batch = self._take_batch()
            if not batch:
                return
            try:
                self._run(pipe, batch)
            except BaseException as e:  # noqa: BLE001 - a worker outlives any edit; each job still gets an answer
                log.exception("worker: a batch failed outside the pipeline")
                for job in batch:
                    if not job.future.done():
                        self._finish(job, "error", error=e)
            finally:
                with self._cond:
                    self._busy -= len(batch)

    def _run(self, pipe: EditPipeline, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            self.stats.queue_wait(now - job.enqueued)
            if job.cancelled.is_set():
                self._finish(job, "cancelled", error=EditCancelled())
            elif now > job.deadline:
                self._finish(job, "deadline", error=DeadlineExceeded())
            else:
                job.started = now
                live.append(job)
        if not live:
            return
        self.stats.batch(len(live))
        t0 = time.monotonic()
        results = pipe.edit_batch([EditRequest(j.image, j.instruction, j.sampling, "numpy", self._hook(pipe, j))
                                   for j in live])
        self._edit_seconds = 0.8 * self._edit_seconds + 0.2 * (time.monotonic() - t0) / len(live)
        for job, result in zip(live, results):
            if isinstance(result, EditResult):
                self._finish(job, "ok", result=result)
            else:
                outcome = {EditCancelled: "cancelled", DeadlineExceeded: "deadline"}.get(type(result), "error")
                self._finish(job, outcome, error=result)

    def _hook(self, pipe: EditPipeline, job: Job):
        previews = {s: i for i, s in enumerate(job.preview_scales)}

        def on_scale(scale: int, summed) -> None:
            if job.cancelled.is_set():
                raise EditCancelled()
            if time.monotonic() > job.deadline:
                raise DeadlineExceeded()
            if scale in previews and job.on_preview is not None:
                t0 = time.perf_counter()
                picture = pipe.preview_image(summed, job.image.size)
                self.stats.preview(time.perf_counter() - t0)
                job.on_preview(previews[scale], picture)

        return on_scale

    def _finish(self, job: Job, outcome: str, result: EditResult | None = None,
                error: BaseException | None = None) -> None:
        job.finished = time.monotonic()
        self.stats.finished(job, outcome, result)
        try:
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        except InvalidStateError:  # the waiting side cancelled its future; nobody reads the answer
            pass
