"""The speech server's FastAPI app: OpenAI's speech API over the engine, plus voices, models, health and metrics.

    POST   /v1/audio/speech              speech (speech_api.py: OpenAI's fields and our extensions)
    GET    /v1/audio/voices              the voices ({"object": "list", "data": [Voice]})
    POST   /v1/audio/voices              add a voice: multipart `name` + `audio_sample` (OpenAI's fields; `consent`
                                         is accepted and ignored); 409 if the name exists
    DELETE /v1/audio/voices/{voice_id}   delete a voice; 404 if there is none
    GET    /v1/models                    the served model
    GET    /health                       200 {"status": "ok", ...} once the model is loaded and warmed up, else 503
                                         {"status": "loading"} or {"status": "failed", "error": ...}
    GET    /metrics                      Prometheus text (server_metrics.py)

With an API key, every /v1 route needs `Authorization: Bearer <key>` (401 otherwise); /health and /metrics are open
(for load balancers and scrapers). Every error is OpenAI's error JSON with `param` naming the request field.

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
from typing import Callable, Optional

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import ErrorEvent
from .server_metrics import ServerMetrics, route_label
from .speech_api import APIError, ModelList, ModelObject, SpeechBody, VoiceDeleted, VoiceList, bad_field, error_body
from .speech_service import SpeechService
from .speech_streams import ClientGone, EngineStream, ResponseAudio, audio_body, sse_body, whole_file
from .speech_streams import SpokenText, spoken_text_header

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER_SECONDS = 5
# nginx's status for a client that left before its response (never read by anyone).
CLIENT_CLOSED_REQUEST = 499
ENGINE_STOP_SECONDS = 10.0


class ServerState:
    """What the routes share: the service once it is ready, the load error if it failed, the metrics."""

    def __init__(self) -> None:
        self.service: Optional[SpeechService] = None
        self.error: Optional[str] = None
        self.metrics = ServerMetrics()
        self.engine_thread: Optional[threading.Thread] = None  # loads the service, then runs its engine

    def ready(self) -> SpeechService:
        """The service, or APIError 503 while loading (or after a failed load)."""
        if self.service is None:
            message = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise APIError(503, message, error_type="server_error", code="model_not_ready",
                           headers={"Retry-After": str(LOADING_RETRY_AFTER_SECONDS)})
        return self.service


def create_app(load: Callable[[], SpeechService], api_key: Optional[str] = None,
               on_load_failure: Optional[Callable[[BaseException], None]] = None,
               load_before_serving: bool = False) -> FastAPI:
    """The app.

    Args:
        load: builds the SpeechService (model, codec, engine not yet started, voices); called on a worker thread.
        api_key: the key every /v1 route requires (None: no authentication).
        on_load_failure: called with the exception when loading or warm-up fails (serve.py stops the server).
        load_before_serving: load and warm up inside the lifespan's startup, so that the app serves nothing before
            it is ready and a failed load fails the startup (a Ray Serve replica gets traffic once its startup is
            done: serve_ray.py). False (serve.py): load in the background while /health answers 503.
    """
    state = ServerState()
    lifespan = _lifespan(state, load, on_load_failure, load_before_serving)
    app = FastAPI(title="MOSS-TTS-Nano speech server", lifespan=lifespan)
    app.state.speech = state
    _add_error_handlers(app)
    app.add_middleware(_CountResponses, metrics=state.metrics)
    app.include_router(_api_router(state, api_key))
    app.include_router(_open_router(state))
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
        return await in_fresh_thread(service.add_voice, name, data)

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
        if state.service is not None:
            return JSONResponse({"status": "ok", **state.service.status()})
        if state.error is not None:
            return JSONResponse({"status": "failed", "error": state.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return router


async def _speech(state: ServerState, body: SpeechBody, request: Request) -> Response:
    """Prepare, submit, wait for the first event (so that an early failure still gets a status), then answer in the
    asked form. Until a streamed body takes them over, the request and its encoder are closed here on every exit."""
    service = state.ready()
    if not body.stream and body.stream_format == "sse":
        raise bad_field("stream", "stream=false returns one whole file; stream_format 'sse' is always streamed")
    prepared = await in_fresh_thread(service.prepare, body)
    stream = EngineStream(lambda listener: service.submit(prepared, listener), asyncio.get_running_loop(),
                          state.metrics.tracker())
    audio, handed_over = None, False
    headers = {"x-moss-seed": str(prepared.seed), "x-sample-rate": str(service.sample_rate),
               "x-channels": str(service.channels), **spoken_text_header(prepared.spoken_text)}
    try:
        audio = ResponseAudio(body.response_format, body.speed, service.sample_rate, service.channels,
                              whole_file=not body.stream)
        first = await stream.next(request.is_disconnected)
        if isinstance(first, ErrorEvent):
            raise APIError(500, f"synthesis failed: {first.message}", error_type="server_error")
        if not body.stream:
            content = await whole_file(stream, audio, first, request.is_disconnected)
            return Response(content, media_type=audio.content_type, headers=headers)
        handed_over = True
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it
    finally:
        if not handed_over:
            _close(stream, audio)
    if body.stream_format == "sse":
        spoken = SpokenText(prepared.spoken_text, [chunk.text for chunk in prepared.request.chunks],
                            service.sample_rate, body.speed)
        content, media_type = sse_body(stream, audio, first, prepared.input_tokens, spoken), "text/event-stream"
    else:
        content, media_type = audio_body(stream, audio, first), audio.content_type
    return _StreamedSpeech(content, stream, audio, media_type=media_type, headers=headers)


def _close(stream: EngineStream, audio: Optional[ResponseAudio]) -> None:
    stream.close()
    if audio is not None:
        audio.close()


class _StreamedSpeech(StreamingResponse):
    """A streamed speech body whose request is cancelled however the response ends, even before the body's
    generator has started (a generator that never ran has no `finally` to run)."""

    def __init__(self, content, stream: EngineStream, audio: ResponseAudio, **keywords) -> None:
        super().__init__(content, **keywords)
        self._stream, self._audio = stream, audio

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _close(self._stream, self._audio)


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
                       "(see speech_api.py)")
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


__all__ = ["ServerState", "api_key_dependency", "create_app", "validation_message"]
