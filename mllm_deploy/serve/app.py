"""The Starlette app of `serve`: the OpenAI endpoints, /health and /metrics over one engine worker.

    state = ServeState(deployment, settings)      # the engine loads later (`state.load()`, a thread)
    app = build_app(state)                        # an ASGI app (uvicorn runs it: see `server`)

Every error is an OpenAI-style error object with a 4xx/5xx status; the next request is served
normally. No endpoint reads or writes a file a request names: requests carry text only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mllm_deploy.errors import UserError
from mllm_deploy.events import TokenEmitted
from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.interface.session import LoadedModel
from mllm_deploy.runtime.sampling import SamplingSettings
from mllm_deploy.serve.metrics import CONTENT_TYPE, ServeMetrics
from mllm_deploy.serve.queue import FairQueue, QueueClosed, QueueFull
from mllm_deploy.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    decode_body,
    parse_request,
)
from mllm_deploy.serve.sse import DONE, ResponseBuilder, sse
from mllm_deploy.serve.worker import EngineWorker, Job, JobFailed, JobFinished

DISCONNECT_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class ServeSettings:
    max_queue: int = 16  # requests waiting beyond the running one; more get 503 + Retry-After
    max_body_bytes: int = 1 << 20
    kv_slots: int = 2  # KV caches kept for prefix reuse
    api_key: str | None = None  # when set, every endpoint but /health wants `Authorization: Bearer KEY`


def served_model_id(source: str, name: str) -> str:
    """The id `/v1/models` lists and requests name: a built-in model's registry id
    (`builtin:smollm2-135m-instruct` -> `smollm2-135m-instruct`), else the model's own name."""
    return source.split(":", 1)[1] if source.startswith("builtin:") else name


class LoadProgress:
    """The progress reporter installed while the engine loads: remembers the stage for /health and
    passes everything on to the command's own reporter (its bars or JSON events)."""

    def __init__(self, outer) -> None:
        self.outer = outer
        self.stage: str | None = None
        self.done = 0
        self.total = 0

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage, self.done, self.total = stage, done, total
        if self.outer is not None:
            self.outer.progress(stage, done, total)

    def note(self, message: str) -> None:
        if self.outer is not None:
            self.outer.note(message)


class ServeState:
    """What the endpoints share: the deployment, the engine (once loaded), the queue, the metrics."""

    def __init__(self, deployment: Deployment, settings: ServeSettings):
        self.deployment = deployment
        self.settings = settings
        self.model_id = served_model_id(deployment.resolved.spec.source, deployment.resolved.spec.name)
        self.backend = deployment.backend
        self.max_context = deployment.profile.prefill.max_context
        self.queue: FairQueue[Job] = FairQueue(settings.max_queue)
        self.metrics = ServeMetrics()
        self.model: LoadedModel | None = None
        self.worker: EngineWorker | None = None
        self.engine_info: dict[str, str] = {}
        self.load_error: UserError | BaseException | None = None
        self.load_started = time.perf_counter()
        self.ready_at: float | None = None
        self.progress = LoadProgress(None)
        self.shutting_down = False
        self.on_load_failed: Callable[[], None] = lambda: None

    def load(self, loader: Callable[[Deployment], LoadedModel], outer_reporter=None) -> None:
        """Load the engine (call on a thread of its own), then start the worker."""
        # deferred: the hook lives with the events, installed for this thread's work only
        from mllm_deploy.events import reporting  # noqa: PLC0415

        self.progress = LoadProgress(outer_reporter)
        try:
            with reporting(self.progress):
                model = loader(self.deployment)
        except BaseException as exc:  # reported by the command; the server stops
            self.load_error = exc
            self.on_load_failed()
            return
        self.engine_info = model.engine.describe()
        worker = EngineWorker(model, self.deployment.loaded, self.queue, kv_slots=self.settings.kv_slots,
                              on_finished=self.metrics.record_finished)  # fmt: skip
        worker.start()
        self.model, self.worker = model, worker
        self.ready_at = time.perf_counter()

    def begin_shutdown(self) -> None:
        """Stop taking requests: the waiting ones are answered 503 (the running one may finish).
        Safe to call again, and from a signal handler (the queue's lock is reentrant)."""
        self.shutting_down = True
        for job in self.queue.close():
            job.post(JobFailed(ApiError(503, "the server is shutting down", type="server_error")))

    def cancel_running(self) -> None:
        """Stop the running generation between tokens (shutdown: its bound has passed)."""
        worker = self.worker
        running = worker.running if worker is not None else None
        if running is not None:
            running.cancel.set()

    def retry_after(self) -> int:
        """Seconds until the queue has room: the running request ends and the next one leaves the
        queue, which takes about the measured mean time of the last requests (at least 1)."""
        mean = self.worker.mean_request_seconds() if self.worker is not None else 1.0
        return max(1, math.ceil(mean))


def build_app(state: ServeState) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.begin_shutdown()

    app = Starlette(
        routes=[
            Route("/health", _endpoint(state, "health", _health), methods=["GET"]),
            Route("/metrics", _endpoint(state, "metrics", _metrics), methods=["GET"]),
            Route("/v1/models", _endpoint(state, "models", _models), methods=["GET"]),
            Route("/v1/chat/completions", _endpoint(state, "chat", _chat), methods=["POST"]),
            Route("/v1/completions", _endpoint(state, "completions", _completions), methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_allowed},
    )
    app.state.serve = state
    return app


def _endpoint(state: ServeState, endpoint: str, handler) -> Callable[[Request], Awaitable[Response]]:
    async def answer(request: Request) -> Response:
        return await _answer(state, request, endpoint, handler)

    return answer


async def _answer(state: ServeState, request: Request, endpoint: str, handler) -> Response:
    """Authorize, run the endpoint, turn an ApiError into its error object; count the answer."""
    try:
        if endpoint != "health":
            _authorize(state, request)
        response = await handler(state, request)
    except ApiError as err:
        response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
    except ClientDisconnect:
        response = Response(status_code=499)
    state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    return response


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse(ApiError(404, f"no such endpoint: {request.url.path}", code="not_found").body(), 404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(err.body(), 405)


def _authorize(state: ServeState, request: Request) -> None:
    key = state.settings.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                       type="authentication_error", code="invalid_api_key")  # fmt: skip


async def _health(state: ServeState, request: Request) -> Response:
    if state.ready_at is not None:
        return JSONResponse({"status": "ok", "model": state.model_id, "backend": state.backend,
                             "queue_depth": len(state.queue), "shutting_down": state.shutting_down})  # fmt: skip
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": str(state.load_error)}, status_code=503)
    p = state.progress
    progress = {"stage": p.stage, "done": p.done, "total": p.total}
    body = {"status": "loading", "model": state.model_id, "seconds": round(time.perf_counter() - state.load_started, 1),
            "progress": progress}  # fmt: skip
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


async def _metrics(state: ServeState, request: Request) -> Response:
    worker = state.worker
    slots = state.model.engine.executor_slots() if state.model is not None else {}
    text = state.metrics.render(
        queue_depth=len(state.queue),
        running=int(worker is not None and worker.running is not None),
        kv_tokens=worker.kv_positions()[0] if worker is not None else 0,
        busy=dict(worker.busy_seconds) if worker is not None else {"npu": 0.0, "cpu": 0.0},
        slots=slots,
        since=state.ready_at,
    )
    return Response(text, media_type=CONTENT_TYPE)


async def _models(state: ServeState, request: Request) -> Response:
    model = {"id": state.model_id, "object": "model", "created": 0, "owned_by": "mllm-deploy",
             "x_mllm_deploy": {"backend": state.backend, "max_context": state.max_context}}  # fmt: skip
    return JSONResponse({"object": "list", "data": [model]})


async def _read_body(state: ServeState, request: Request) -> dict[str, Any]:
    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return decode_body(b"".join(chunks))


async def _chat(state: ServeState, request: Request) -> Response:
    req = parse_request(ChatCompletionRequest, await _read_body(state, request))
    messages = [m.as_template_message() for m in req.messages]
    return await _generate(state, request, req, req.token_limit(), messages=messages, text=None)


async def _completions(state: ServeState, request: Request) -> Response:
    req = parse_request(CompletionRequest, await _read_body(state, request))
    text = req.prompt_text()
    if not text:
        raise ApiError(400, "'prompt' is empty: give some text to continue", param="prompt")
    return await _generate(state, request, req, req.token_limit(), messages=None, text=text)


def _sampling(state: ServeState, req: ChatCompletionRequest | CompletionRequest) -> SamplingSettings:
    """The request's sampling fields over the profile's `[decode]` values."""
    base = SamplingSettings.from_decode_section(state.deployment.profile.decode)
    return SamplingSettings(
        temperature=req.temperature if req.temperature is not None else base.temperature,
        top_k=base.top_k,
        top_p=req.top_p if req.top_p is not None else base.top_p,
        repetition_penalty=base.repetition_penalty,
        seed=req.seed if req.seed is not None else base.seed,
    )


async def _generate(
    state: ServeState,
    request: Request,
    req: ChatCompletionRequest | CompletionRequest,
    limit: int | None,
    *,
    messages: list[dict] | None,
    text: str | None,
) -> Response:
    if req.model != state.model_id:
        raise ApiError(404, f"the model '{req.model}' does not exist here; this server runs '{state.model_id}'",
                       param="model", code="model_not_found")  # fmt: skip
    if state.shutting_down:
        raise ApiError(503, "the server is shutting down", type="server_error")
    if state.ready_at is None:
        raise ApiError(503, "the model is loading; GET /health says when it is ready", type="server_error",
                       code="model_loading", headers={"Retry-After": "2"})  # fmt: skip
    max_new = limit if limit is not None else state.deployment.profile.decode.max_new_tokens
    if max_new > state.max_context:
        param = (
            "max_completion_tokens"
            if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens
            else "max_tokens"
        )
        raise ApiError(400, f"'{param}' is {max_new}; the context holds {state.max_context} tokens "
                       "(prefill.max_context)", param=param)  # fmt: skip
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[object] = asyncio.Queue()

    def post(event: object) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (the server stopped)
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(messages, text, max_new, _sampling(state, req), req.stop_strings(),
              user=req.user or (request.client.host if request.client else "?"), post=post)  # fmt: skip
    try:
        state.queue.put(job.user, job)
    except QueueFull:
        state.metrics.rejected.inc()
        raise ApiError(503, f"the queue is full ({state.settings.max_queue} requests waiting); retry later",
                       type="server_error", code="queue_full",
                       headers={"Retry-After": str(state.retry_after())}) from None  # fmt: skip
    except QueueClosed:
        raise ApiError(503, "the server is shutting down", type="server_error") from None
    builder = ResponseBuilder(f"{'chatcmpl' if messages is not None else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                              state.model_id, int(time.time()), chat=messages is not None,
                              backend=state.backend, engine=state.engine_info)  # fmt: skip
    try:
        first = await _next_event(request, events, job, state)
        if isinstance(first, JobFailed):
            raise first.error
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(request, events, job, state, builder, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        while True:
            event = await _next_event(request, events, job, state)
            if isinstance(event, JobFailed):
                raise event.error
            if isinstance(event, JobFinished):
                return JSONResponse(builder.complete(event))
    except BaseException:
        _cancel(job, state)
        raise


def _cancel(job: Job, state: ServeState) -> None:
    job.cancel.set()
    state.queue.remove_if(lambda waiting: waiting is job)


async def _next_event(request: Request, events: asyncio.Queue[object], job: Job, state: ServeState) -> object:
    """The job's next event; a client that went away meanwhile cancels it (ClientDisconnect)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
        except TimeoutError:
            if await request.is_disconnected():
                _cancel(job, state)
                raise ClientDisconnect() from None


async def _stream(
    request: Request,
    events: asyncio.Queue[object],
    job: Job,
    state: ServeState,
    builder: ResponseBuilder,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE body: the role chunk, a chunk per piece of text, the finish chunk, usage, [DONE].
    Starlette cancels this when the client disconnects: `finally` then stops the generation."""
    finished = False
    try:
        if builder.chat:
            yield sse(builder.chunk(role=True))
        while True:
            event = await events.get()
            if isinstance(event, TokenEmitted) and event.text:
                yield sse(builder.chunk(event.text))
            elif isinstance(event, JobFailed):
                yield sse(event.error.body())
                finished = True
                break
            elif isinstance(event, JobFinished):
                yield sse(builder.chunk(finish=event))
                if include_usage:
                    yield sse(builder.usage_chunk(event))
                break
        finished = True
        yield DONE
    finally:
        if not finished:
            _cancel(job, state)  # the stream ended early (client gone, shutdown): stop generating
