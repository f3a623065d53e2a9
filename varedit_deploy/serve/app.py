"""The Starlette app: routes, authentication, limits, streaming and the mapping of failures to statuses.

Routes: POST /v1/images/edits, GET /v1/models (both behind the optional bearer key), GET /health
(the process is alive), /ready (warmed and not draining), /metrics (Prometheus), and unless turned
off the playground page at GET / (`page.py`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import InputError, VareditError
from ..runtime.preview import preview_scales
from .page import page_routes
from .protocol import ApiError, EditForm, images_response, parse_edit_form, sse, stream_event, usage
from .scheduler import DeadlineExceeded, EditCancelled, Job, NotAccepting, QueueFull
from .state import ServerState
from .uploads import decode_upload, encode_image

log = logging.getLogger("varedit_deploy.serve")
MAX_FORM_FIELDS = 32
MAX_FORM_FILES = 4
MAX_TEXT_FIELD_BYTES = 256 * 1024


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a request body over `max_bytes`: by its Content-Length before reading, else while it streams."""

    def __init__(self, app, max_bytes: int, on_refused: Callable[[ApiError], None] = lambda error: None):
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = _too_large(self.max_bytes) if length.isdigit() else ApiError(
                400, "the Content-Length header is not a number", code="invalid_request")
            self.on_refused(error)  # answered here, before the app's error handler: counted all the same
            return await JSONResponse(error.body(), error.status, headers={"Connection": "close"})(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server takes ({limit} bytes)", code="request_too_large")


def create_app(state: ServerState) -> Starlette:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready", "model": state.model_id})
        return JSONResponse({"status": "draining" if state.draining else "loading"}, 503)

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render() if state.metrics else b"", media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        _authorize(state, request)
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "varedit-deploy"}]})

    async def edits(request: Request) -> Response:
        arrived = time.monotonic()
        _authorize(state, request)
        _check_open(state)
        form, upload = await _read_request(state, request)
        prompt_tokens = _prompt_tokens(state, form.prompt)
        if not state.scheduler.has_room(form.n):  # before paying for the decode (submit decides)
            raise _queue_full(state.scheduler.retry_after_s())
        image = await asyncio.to_thread(decode_upload, upload, state.options.max_pixels)
        seed = form.seed if form.seed is not None else state.default_sampling.seed
        previews = preview_scales(state.num_scales, form.partial_images) if form.stream else ()
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        jobs = [Job(image, form.prompt, state.sampling(form.cfg, form.tau, seed + i), arrived + state.options.timeout_s,
                    previews, (lambda index, picture: loop.call_soon_threadsafe(events.put_nowait, (index, picture)))
                    if form.stream else None) for i in range(form.n)]
        try:
            state.scheduler.submit(jobs)
        except QueueFull as e:
            raise _queue_full(e.retry_after_s) from None
        except NotAccepting:
            raise _shutting_down() from None
        size = form.size or image.size
        use = usage(prompt_tokens, state.image_tokens, state.output_tokens * form.n)
        if form.stream:
            jobs[0].future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, (None, f)))
            return StreamingResponse(_stream(state, form, jobs[0], events, size, use, arrived),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _results(request, jobs)
        if results is None:  # the client went away; the edits stop at their next scale boundary
            return Response(status_code=499)
        encoded = await asyncio.gather(*(asyncio.to_thread(_b64, r.image, form, size) for r in results))
        state.metrics.request.labels("false").observe(time.monotonic() - arrived)
        return JSONResponse(images_response(form, list(encoded), size, use),
                            headers={"Server-Timing": _server_timing(jobs, results)})

    async def api_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
            exc = ApiError(exc.status_code, exc.detail or "", code=code, headers=exc.headers)  # 405 keeps its Allow
        assert isinstance(exc, ApiError)
        if state.metrics:
            state.metrics.error(exc.status, exc.code)
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unexpected error", exc_info=exc)
        return await api_error(request, ApiError(500, "internal server error", "server_error", code="internal_error"))

    middleware = []
    if state.options.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(state.options.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    routes = [Route("/health", health), Route("/ready", ready), Route("/metrics", metrics),
              Route("/v1/models", models), Route("/v1/images/edits", edits, methods=["POST"])]
    app = Starlette(
        routes=routes + (page_routes() if state.options.ui else []),
        middleware=middleware,
        exception_handlers={ApiError: api_error, HTTPException: api_error, Exception: server_error},
    )
    app.add_middleware(BodyLimit, max_bytes=state.options.max_upload_bytes,  # outermost: before any parsing
                       on_refused=lambda error: state.metrics and state.metrics.error(error.status, error.code))
    return app


# ------------------------------------------------------------------ pieces of the edit route
def _authorize(state: ServerState, request: Request) -> None:
    key = state.options.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _check_open(state: ServerState) -> None:
    if state.draining:
        raise _shutting_down()
    if not state.ready:
        raise ApiError(503, "the model is still loading; poll /ready", "server_error", code="not_ready",
                       headers={"Retry-After": "5"})


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry on another replica", "server_error",
                    code="shutting_down", headers={"Retry-After": "1"})


def _queue_full(retry_after_s: int) -> ApiError:
    return ApiError(429, f"the server is busy: the queue is full; retry in {retry_after_s} s", "rate_limit_error",
                    code="queue_full", headers={"Retry-After": str(retry_after_s)})


async def _read_request(state: ServerState, request: Request) -> tuple[EditForm, bytes]:
    """Parse the multipart form: the checked fields and the image's bytes (not decoded yet), or raise ApiError."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, f"send multipart/form-data (got {content_type or 'no content type'!r})",
                       code="unsupported_content_type")
    try:
        multipart = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS,
                                       max_part_size=MAX_TEXT_FIELD_BYTES)
    except BodyTooLarge:
        raise _too_large(state.options.max_upload_bytes) from None
    except (MultiPartException, HTTPException, ValueError, KeyError, AssertionError) as e:
        # (Starlette answers its parser's errors as HTTPException 400 before they reach us as MultiPartException)
        reason = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise ApiError(400, f"malformed multipart body ({reason})", code="invalid_multipart") from None
    except OSError as e:  # a large upload spools to a temporary file (Starlette: over 1 MiB) and the disk is full
        log.warning("no room for an upload's temporary file: %s", e)
        raise ApiError(507, f"the server has no room to receive the image ({e.strerror or e}); retry later or on "
                            "another replica", "server_error", code="insufficient_storage",
                       headers={"Retry-After": "10"}) from None
    try:
        fields: dict[str, list[Any]] = {}
        for name, value in multipart.multi_items():
            fields.setdefault(name, []).append(value)
        form, upload = parse_edit_form(fields, state.options.max_output_side)
        if form.model is not None and form.model != state.model_id:
            raise ApiError(404, f"the model {form.model!r} does not exist; this server serves {state.model_id!r}",
                           param="model", code="model_not_found")
        data = await upload.read()
    finally:
        await multipart.close()  # spooled upload files
    return form, data


def _prompt_tokens(state: ServerState, prompt: str) -> int:
    try:
        return int(state.tokenizer.encode(prompt).shape[1])
    except InputError as e:
        raise ApiError(400, str(e), param="prompt", code="invalid_value") from None


def _b64(picture: Image.Image, form: EditForm, size: tuple[int, int]) -> str:
    return base64.b64encode(encode_image(picture, form.output_format, form.output_compression, size)).decode()


def _server_timing(jobs: list[Job], results: list) -> str:
    """A Server-Timing value (W3C), so a client can see what HTTP added: time queued, time in a worker
    (its batch included), and this request's own pipeline time."""
    queued = (max(j.started for j in jobs) - min(j.enqueued for j in jobs)) * 1e3
    worker = (max(j.finished for j in jobs) - max(j.started for j in jobs)) * 1e3
    own = sum(r.timings_ms["total"] for r in results)
    return f"queue;dur={queued:.1f}, worker;dur={worker:.1f}, edit;dur={own:.1f}"


def _job_error(error: BaseException) -> ApiError | None:
    """What to answer for a failed edit; None when nobody is listening any more."""
    if isinstance(error, EditCancelled):
        return None
    if isinstance(error, DeadlineExceeded):
        return ApiError(504, "the edit did not finish before this server's deadline", "server_error",
                        code="deadline_exceeded")
    if isinstance(error, InputError):
        return ApiError(400, str(error), code="invalid_value")
    if isinstance(error, VareditError):
        return ApiError(500, str(error), "server_error", code="pipeline_error")
    log.error("edit failed", exc_info=error)
    return ApiError(500, "the edit failed inside the server", "server_error", code="internal_error")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _results(request: Request, jobs: list[Job]) -> list | None:
    """The jobs' results; None if the client disconnects first (the jobs are then cancelled)."""
    gathered = asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs), return_exceptions=True)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server forces its exit: the edits stop at their next scale
        for job in jobs:
            job.cancel()
        raise
    finally:
        watcher.cancel()
    if not gathered.done():
        for job in jobs:
            job.cancel()
        return None
    results = gathered.result()
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for job in jobs:
            job.cancel()
        error = _job_error(failures[0])
        if error is None:
            return None
        raise error
    return results


async def _stream(state: ServerState, form: EditForm, job: Job, events: asyncio.Queue, size: tuple[int, int],
                  use: dict[str, Any], arrived: float) -> AsyncIterator[bytes]:
    """partial_image events as previews arrive, then completed (or an error event)."""
    try:
        while True:
            index, payload = await events.get()
            if index is not None:
                yield stream_event(form, await asyncio.to_thread(_b64, payload, form, size), size, index)
                continue
            error = payload.exception()
            if error is not None:
                api = _job_error(error)
                if api is not None:
                    state.metrics.error(api.status, api.code)
                    yield sse("error", api.body())
                return
            result = payload.result()
            yield stream_event(form, await asyncio.to_thread(_b64, result.image, form, size), size, use=use,
                               server_timing=_server_timing([job], [result]))
            state.metrics.request.labels("true").observe(time.monotonic() - arrived)
            return
    finally:
        job.cancel()  # a no-op once finished; on a disconnect, the edit stops at the next scale
