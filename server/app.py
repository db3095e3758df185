"""The speech server's FastAPI app: OpenAI's speech API over the engine, plus voices, models, health and metrics.

    POST   /v1/audio/speech              speech (server/schema.py: OpenAI's fields and our extensions)
    GET    /v1/audio/voices              the voices ({"object": "list", "data": [Voice]}): presets, OpenAI's names
                                         and uploads, each saying which voice speaks for it (voice_library/catalog.py)
    POST   /v1/audio/voices              add a voice: multipart `name` + `audio_sample` (OpenAI's fields; `consent`
                                         is accepted and ignored); 409 if the name exists
    DELETE /v1/audio/voices/{voice_id}   delete a voice; 404 if there is none
    GET    /v1/models                    the served model
    GET    /health                       readiness: 200 {"status": "ok", ...} once the model is loaded and warmed
                                         up and its engine runs, else 503 {"status": "loading" | "failed" |
                                         "unhealthy", "error": ...}; "unhealthy" when the engine's thread has
                                         ended or has not finished a tick for --engine-stall-seconds while it has
                                         work (health_problem, also Ray's check_health)
    GET    /health/live                  liveness: 200 while loading and serving, 503 once the load failed or the
                                         engine is unhealthy (restart the process)
    GET    /metrics                      Prometheus text (server/metrics.py)
    GET    /                             the web page to try it in a browser (server/page.py, files in server/web/)

With an API key, every /v1 route needs `Authorization: Bearer <key>` (401 otherwise); /health and /metrics are open
(for load balancers and scrapers). Every error is OpenAI's error JSON with `param` naming the request field.

Bounded work: speech requests are refused with 429 when the engine's queue is full before any work is done for them;
their `prepare` (tokenize, chunk, encode a clip) runs on at most `prepare_workers` threads at a time; a request that
waits longer than the service's queue_timeout for a slot (or for a prepare thread) is cancelled and gets 503 with
Retry-After.

Lifecycle: the lifespan starts the engine thread, which loads the service in the background (so /health answers 503
meanwhile) and then runs the engine (on the thread that loaded it: SpeechEngine.serve says why); then one warm-up
request runs; speech requests before that get 503 with Retry-After. With
`load_before_serving` (Ray Serve replicas, serve_ray.py) the lifespan's startup itself loads and warms up, so the app
serves nothing before it is ready. When the server stops (uvicorn, or Serve, drains running requests first), the
engine is stopped and anything left is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import threading
import time
from typing import Callable, Optional

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import ErrorEvent
from .metrics import ServerMetrics, counting_errors, engine_error_code, route_label
from .schema import APIError, ModelList, ModelObject, SpeechBody, VoiceDeleted, VoiceList, bad_field, error_body
from .page import page_router
from .service import SpeechService
from .streams import ClientGone, RequestEvents, ResponseAudio, audio_body, close_request, sse_body, whole_file
from .streams import SpokenText, spoken_text_header

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER_SECONDS = 5
# nginx's status for a client that left before its response (never read by anyone).
CLIENT_CLOSED_REQUEST = 499
ENGINE_STOP_SECONDS = 10.0
# Requests whose `prepare` (tokenize, chunk, encode a clip) may run at once (serve.py --prepare-workers).
DEFAULT_PREPARE_WORKERS = 2
# The engine is unhealthy when it has work and has not finished a tick for this long (serve.py
# --engine-stall-seconds). A tick is one frame for every stream (milliseconds to a second); the first tick of a
# compiled step mode compiles, which can take a minute.
DEFAULT_STALL_SECONDS = 120.0


class ServerState:
    """What the routes share: the service once it is ready, the load error if it failed, the metrics."""

    def __init__(self, prepare_workers: int = DEFAULT_PREPARE_WORKERS,
                 stall_seconds: float = DEFAULT_STALL_SECONDS) -> None:
        self.service: Optional[SpeechService] = None
        self.error: Optional[str] = None
        self.metrics = ServerMetrics()
        self.engine_thread: Optional[threading.Thread] = None  # loads the service, then runs its engine
        self.work = BoundedWork(prepare_workers)
        self.watch = EngineWatch(stall_seconds)

    def ready(self) -> SpeechService:
        """The service, or APIError 503 while loading (or after a failed load)."""
        if self.service is None:
            message = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise APIError(503, message, error_type="server_error", code="model_not_ready",
                           headers={"Retry-After": str(LOADING_RETRY_AFTER_SECONDS)})
        return self.service


def health_problem(state: ServerState) -> Optional[str]:
    """Why the app cannot serve (None when it can): not loaded, the engine's thread gone, or the engine stalled. The
    one test behind /health, /health/live and Ray's check_health (serve_ray.py)."""
    if state.service is None:
        return f"the speech service is not loaded: {state.error or 'still loading'}"
    engine = state.service.engine
    if not engine.running:
        return "the speech engine's thread has stopped"
    return state.watch.stall(engine)


class EngineWatch:
    """Whether the engine makes progress: stalled when, over two health checks at least `seconds` apart that both
    saw work (active or waiting requests), its tick count did not move."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._ticks, self._busy, self._since = -1, False, time.monotonic()

    def stall(self, engine) -> Optional[str]:
        now, ticks, busy = time.monotonic(), engine.ticks, bool(engine.active or engine.waiting)
        if ticks != self._ticks or not busy or not self._busy:
            self._ticks, self._since = ticks, now
        self._busy = busy
        if now - self._since <= self.seconds:
            return None
        return (f"the speech engine has not finished a tick for {now - self._since:.0f} s while {engine.active} "
                f"requests are active and {engine.waiting} waiting (bound {self.seconds:g} s)")


class NoWorker(Exception):
    """No BoundedWork thread became free before the request's deadline."""


class BoundedWork:
    """Blocking request work (prepare, voice encoding) on at most `workers` threads at a time.

    Each job runs on a thread of its own that ends with it (in_fresh_thread: a reused thread that ran parallel torch
    work slows the engine's thread on CPU), and at most `workers` such threads exist at once; callers beyond that
    wait their turn (bounded by the caller's deadline)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"prepare_workers={workers}; expected at least 1")
        self.workers = workers
        self._slots: Optional[asyncio.Semaphore] = None  # made on the event loop that uses it

    async def run(self, deadline: Optional[float], function, *args):
        """`function(*args)` once a worker is free; raises NoWorker when none is by `deadline` (monotonic)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise NoWorker() from None
        try:
            return await in_fresh_thread(function, *args)
        finally:
            self._slots.release()


def create_app(load: Callable[[], SpeechService], api_key: Optional[str] = None,
               on_load_failure: Optional[Callable[[BaseException], None]] = None,
               load_before_serving: bool = False, prepare_workers: int = DEFAULT_PREPARE_WORKERS,
               stall_seconds: float = DEFAULT_STALL_SECONDS) -> FastAPI:
    """The app.

    Args:
        load: builds the SpeechService (model, codec, engine not yet started, voices); called on the engine thread,
            which then runs the engine (_load_then_serve).
        api_key: the key every /v1 route requires (None: no authentication).
        on_load_failure: called with the exception when loading or warm-up fails (serve.py stops the server).
        load_before_serving: load and warm up inside the lifespan's startup, so that the app serves nothing before
            it is ready and a failed load fails the startup (a Ray Serve replica gets traffic once its startup is
            done: serve_ray.py). False (serve.py): load in the background while /health answers 503.
        prepare_workers: requests prepared at once (BoundedWork).
        stall_seconds: the engine is unhealthy after this long without a tick while it has work (EngineWatch).
    """
    state = ServerState(prepare_workers, stall_seconds)
    lifespan = _lifespan(state, load, on_load_failure, load_before_serving)
    app = FastAPI(title="MOSS-TTS-Nano speech server", lifespan=lifespan)
    app.state.speech = state
    _add_error_handlers(app)
    app.add_middleware(_CountResponses, metrics=state.metrics)
    app.include_router(_api_router(state, api_key))
    app.include_router(_open_router(state))
    app.include_router(page_router(api_key))  # the web page at / (server/page.py)
    return app


def _lifespan(state: ServerState, load, on_load_failure, load_before_serving: bool):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_before_serving:
            await _load(state, load, on_load_failure)
            if state.service is None:
                raise RuntimeError(f"loading the speech service failed: {state.error}")
        task = None if load_before_serving else asyncio.create_task(_load(state, load, on_load_failure))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            if state.service is not None:
                stopped = await to_thread.run_sync(lambda: _stop_engine(state))
                logger.info("engine stopped%s", "" if stopped else " (timed out)")
    return lifespan


def _stop_engine(state: ServerState) -> bool:
    """Cancel what is left and wait (bounded) for the engine thread to end; returns whether it did."""
    if not state.service.engine.stop(False, ENGINE_STOP_SECONDS):
        return False
    state.engine_thread.join(ENGINE_STOP_SECONDS)
    return not state.engine_thread.is_alive()


async def _load(state: ServerState, load, on_load_failure) -> None:
    try:
        loaded = concurrent.futures.Future()
        state.engine_thread = threading.Thread(target=_load_then_serve, args=(load, loaded), name="speech-engine",
                                               daemon=True)
        state.engine_thread.start()
        service = await asyncio.wrap_future(loaded)
        seconds = await to_thread.run_sync(service.warm_up)
    except Exception as error:  # any failure: report it on /health and let the caller stop the server
        logger.exception("loading the speech service failed")
        state.error = f"{type(error).__name__}: {error}"
        if on_load_failure is not None:
            on_load_failure(error)
        return
    state.metrics.bind_engine(service.engine)
    state.service = service
    logger.info("ready: %d slots, warm-up %.2f s", service.engine.num_slots, seconds)


async def in_fresh_thread(function, *args):
    """`function(*args)` on a thread of its own that ends with it, for work that may run torch in parallel (encoding
    a clip): a pooled worker thread that ran parallel torch work slows the engine's thread for as long as it lives
    (SpeechEngine.serve), a thread that has ended does not."""
    done = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(function(*args))
        except BaseException as error:  # handed to the awaiting route
            done.set_exception(error)

    threading.Thread(target=run, name="speech-work", daemon=True).start()
    return await asyncio.wrap_future(done)


def _load_then_serve(load, loaded: concurrent.futures.Future) -> None:
    """The engine thread: load the service, hand it over through `loaded`, then run its engine on this same thread
    (SpeechEngine.serve: on CPU, torch runs the engine much faster on the thread that loaded the model)."""
    try:
        service = load()
    except BaseException as error:  # reported by _load
        if not loaded.cancelled():
            loaded.set_exception(error)
        return
    try:
        loaded.set_result(service)
    except concurrent.futures.InvalidStateError:  # the server stopped while loading: nothing to serve
        return
    service.engine.serve()


# ----------------------------------------------------------------------------------------------------------------
# Routes


def _api_router(state: ServerState, api_key: Optional[str]) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(api_key_dependency(api_key))])

    @router.post("/audio/speech")
    async def create_speech(body: SpeechBody, request: Request) -> Response:
        return await _speech(state, body, request)

    @router.get("/audio/voices", response_model=VoiceList)
    async def list_voices() -> VoiceList:
        service = state.ready()
        return VoiceList(data=await to_thread.run_sync(service.list_voices))

    @router.post("/audio/voices")
    async def create_voice(name: str = Form(), audio_sample: UploadFile = File(),
                           consent: Optional[str] = Form(None), type: str = Form("audio_sample")):
        service = state.ready()
        if type != "audio_sample":
            raise bad_field("type", f"type={type!r}; expected 'audio_sample' (voices are made from recordings)")
        data = await audio_sample.read(service.voices.max_upload_bytes + 1)
        return await _bounded(state, _deadline(service), service.add_voice, name, data)

    @router.delete("/audio/voices/{voice_id}", response_model=VoiceDeleted)
    async def delete_voice(voice_id: str) -> VoiceDeleted:
        service = state.ready()
        await to_thread.run_sync(service.delete_voice, voice_id)
        return VoiceDeleted(id=voice_id)

    @router.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        service = state.ready()
        return ModelList(data=[ModelObject(id=service.options.model_name, created=service.created)])

    return router


def _open_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        problem = health_problem(state)
        if problem is None:
            return JSONResponse({"status": "ok", **state.service.status()})
        if state.error is not None:
            return JSONResponse({"status": "failed", "error": state.error}, status_code=503)
        if state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "unhealthy", "error": problem, **state.service.status()}, status_code=503)

    @router.get("/health/live")
    async def live() -> JSONResponse:
        problem = health_problem(state)
        if problem is not None and (state.error is not None or state.service is not None):
            return JSONResponse({"status": "failed" if state.service is None else "unhealthy", "error": problem},
                                status_code=503)
        return JSONResponse({"status": "ok" if problem is None else "loading"})

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return router


async def _speech(state: ServerState, body: SpeechBody, request: Request) -> Response:
    """Check the queue, prepare (bounded), submit, wait for the first event (so that an early failure still gets a
    status; a request still waiting for a slot at its deadline gets 503), then answer in the asked form. Until a
    streamed body takes them over, the request and its encoder are closed here on every exit."""
    service = state.ready()
    if not body.stream and body.stream_format == "sse":
        raise bad_field("stream", "stream=false returns one whole file; stream_format 'sse' is always streamed")
    rate, channels = body.audio_layout(service.sample_rate, service.channels)
    service.check_queue()
    deadline = _deadline(service)
    prepared = await _bounded(state, deadline, service.prepare, body)
    stream = RequestEvents(lambda listener: service.submit(prepared, counting_errors(listener, state.metrics)),
                          asyncio.get_running_loop(), state.metrics.tracker())
    audio, handed_over = None, False
    headers = {"x-moss-seed": str(prepared.seed), "x-sample-rate": str(rate), "x-channels": str(channels),
               **spoken_text_header(prepared.spoken_text)}
    if prepared.voice is not None:
        headers["x-moss-voice"] = prepared.voice
    try:
        audio = ResponseAudio(body.response_format, body.speed, rate, channels, whole_file=not body.stream,
                              source_rate=service.sample_rate, source_channels=service.channels)
        first = await _first_event(stream, request, deadline, service)
        if isinstance(first, ErrorEvent):
            raise _failed(first, service)
        if not body.stream:
            content = await whole_file(stream, audio, first, request.is_disconnected)
            return Response(content, media_type=audio.content_type, headers=headers)
        handed_over = True
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it
    finally:
        if not handed_over:
            close_request(stream, audio)
    if body.stream_format == "sse":
        spoken = SpokenText(prepared.spoken_text, [chunk.text for chunk in prepared.request.chunks],
                            service.sample_rate, body.speed)
        content, media_type = sse_body(stream, audio, first, prepared.input_tokens, spoken), "text/event-stream"
    else:
        content, media_type = audio_body(stream, audio, first), audio.content_type
    return _StreamedSpeech(content, stream, audio, media_type=media_type, headers=headers)


def _deadline(service: SpeechService) -> Optional[float]:
    """The monotonic time by which a request arriving now must have a slot (None: no queue timeout)."""
    timeout = service.options.queue_timeout
    return None if timeout is None else time.monotonic() + timeout


async def _bounded(state: ServerState, deadline: Optional[float], function, *args):
    """`function(*args)` on the bounded work threads; 503 when none is free by the deadline."""
    try:
        return await state.work.run(deadline, function, *args)
    except NoWorker:
        raise _queue_timeout(state.ready(), "for a worker to prepare it") from None


async def _first_event(stream: RequestEvents, request: Request, deadline: Optional[float], service: SpeechService):
    """The request's first event; past `deadline` a request not yet admitted to a slot is cancelled (503)."""
    while True:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            return await asyncio.wait_for(stream.next(request.is_disconnected), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            if stream.handle.admitted.is_set():
                deadline = None  # it has a slot: its first audio is on the way
                continue
            stream.close("queue_timeout")
            raise _queue_timeout(service, "for a free slot") from None


def _queue_timeout(service: SpeechService, waited_for: str) -> APIError:
    timeout = service.options.queue_timeout
    return APIError(503, f"the server is busy: the request waited {timeout:g} s (--queue-timeout) {waited_for}; "
                         "retry later", error_type="server_error", code="queue_timeout",
                    headers={"Retry-After": str(service.options.retry_after_seconds)})


def _failed(event: ErrorEvent, service: SpeechService) -> APIError:
    """The error answered for a request the engine ended before its first audio."""
    if event.cancelled:  # nobody cancels a request that is still waiting for its first event but a stopping server
        return APIError(503, "the server is shutting down; retry on another instance", error_type="server_error",
                        code="shutting_down", headers={"Retry-After": str(service.options.retry_after_seconds)})
    return APIError(500, f"synthesis failed: {event.message}", error_type="server_error",
                    code=engine_error_code(event))


class _StreamedSpeech(StreamingResponse):
    """A streamed speech body whose request is cancelled however the response ends, even before the body's
    generator has started (a generator that never ran has no `finally` to run)."""

    def __init__(self, content, stream: RequestEvents, audio: ResponseAudio, **keywords) -> None:
        super().__init__(content, **keywords)
        self._stream, self._audio = stream, audio

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close_request(self._stream, self._audio)


# ----------------------------------------------------------------------------------------------------------------
# Authentication, errors, response counting


def api_key_dependency(api_key: Optional[str]):
    """A dependency that requires `Authorization: Bearer <api_key>` (none when api_key is None)."""
    expected = api_key.encode() if api_key else None

    async def require_api_key(authorization: Optional[str] = Header(None)) -> None:
        if expected is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            given = "no API key was given" if not authorization else "the API key is not valid"
            raise APIError(401, f"{given}; expected the header 'Authorization: Bearer <key>' with the server's key",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return require_api_key


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        param, message = validation_message(error.errors())
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(error).__name__}: {error}", "server_error"),
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(error_body(f"{error.detail} ({request.method} {request.url.path})", kind),
                            status_code=error.status_code, headers=getattr(error, "headers", None))


def validation_message(errors) -> tuple[Optional[str], str]:
    """(param, message) of the first pydantic error: the field's name and what was expected."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ())]
    param = location[1] if len(location) > 1 and location[0] in ("body", "query", "path") else None
    kind, text = first.get("type", ""), str(first.get("msg", "invalid"))
    if kind == "json_invalid":
        return None, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', text)})"
    if param is None:
        return None, f"the request body is invalid: {text}"
    if kind == "missing":
        return param, f"{param} is required"
    if kind == "extra_forbidden":
        return param, (f"unknown field {param!r}; expected OpenAI's speech fields or our extensions "
                       "(see server/schema.py)")
    text = text.removeprefix("Value error, ")
    if text.startswith(f"{param}="):
        return param, text
    return param, f"{param}={first.get('input')!r}: {text}"


class _CountResponses:
    """ASGI middleware: moss_tts_requests_total{route, status} at the start of every HTTP response."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


__all__ = ["BoundedWork", "EngineWatch", "ServerState", "api_key_dependency", "create_app", "health_problem",
           "validation_message"]
