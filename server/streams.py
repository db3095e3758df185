"""One speech request's audio on the event loop: the engine's events in, the HTTP body's bytes out.

    engine thread --listener--> RequestEvents (asyncio queue) --> ResponseAudio (speed, encoder; on worker threads)
        --> audio_body (bytes as produced) | sse_body (speech.audio.delta / .done events) | whole_file (one body)

The HTTP layer never generates anything itself: it waits on the request's own event queue. Encoding (mp3 and opus
cost about 5% of a core per stream) and time stretching run on worker threads, so the event loop only moves bytes.
Whatever ends a request (the last event, an error, the client leaving, the server's grace period running out),
`close_request` cancels the engine request and closes its encoder, so the slot is free at the engine's next tick. It
is called by whoever holds the request at that moment: the route until a streamed body takes it over, then the
streamed response (server/app.py), or the Wyoming handler.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional
from urllib.parse import quote

import torch
from anyio import to_thread

from .formats import LayoutConverter, StreamingEncoder
from ..captions import CaptionTimeline
from ..engine import AudioEvent, ErrorEvent, FinishedEvent
from .metrics import RequestTracker
from .schema import APIError, SpeechAudioDelta, SpeechAudioDone, SpeechCaption, Usage, error_body
from .time_stretch import TimeStretcher

logger = logging.getLogger(__name__)

# How often a request whose response has not started checks whether its client is still there (seconds).
DISCONNECT_POLL_SECONDS = 0.05
# The longest x-moss-spoken-text header sent (bytes, URL-encoded); HTTP clients refuse header blocks of a few 10 KiB.
SPOKEN_TEXT_HEADER_BYTES = 4096


class ClientGone(Exception):
    """The client disconnected before its response started."""


class StreamFailed(RuntimeError):
    """The engine ended a request with an error after its response had started (the body is cut short).

    Attributes:
        code: the engine's stable code of the cause (engine.ERROR_CODES), sent as OpenAI's error `code`.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class RequestEvents:
    """A submitted request's events, delivered from the engine thread into an asyncio queue.

    Args:
        submit: submit(listener) -> RequestHandle (SpeechService.submit with the prepared request).
        loop: the event loop that reads the events.
        tracker: the request's metrics.
    """

    def __init__(self, submit: Callable, loop: asyncio.AbstractEventLoop, tracker: RequestTracker) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._getter: Optional[asyncio.Future] = None
        self.tracker = tracker
        self.final: Optional[FinishedEvent] = None
        self.handle = submit(self._deliver)

    def _deliver(self, event) -> None:
        """Engine thread: hand the event to the loop (a closed loop means nobody listens: the request ends)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            self.handle.cancel()

    async def next(self, disconnected: Optional[Callable[[], Awaitable[bool]]] = None):
        """The next event; with `disconnected`, raises ClientGone as soon as it returns True (polled)."""
        if self._getter is None:
            self._getter = asyncio.ensure_future(self._queue.get())
        while disconnected is not None and not self._getter.done():
            await asyncio.wait({self._getter}, timeout=DISCONNECT_POLL_SECONDS)
            if not self._getter.done() and await disconnected():
                raise ClientGone()
        event, self._getter = await self._getter, None
        if isinstance(event, AudioEvent):
            self.tracker.audio(event.is_pause)
        elif isinstance(event, FinishedEvent):
            self.final = event
            self.tracker.finished(event.audio_seconds, event.stops)
        elif isinstance(event, ErrorEvent):
            self.tracker.end("disconnected" if event.cancelled else "error")
        return event

    def close(self, outcome: str = "disconnected") -> None:
        """Cancel the request unless it has ended (the engine frees its slot at its next tick)."""
        if self._getter is not None:
            self._getter.cancel()
        if not self.handle.done.is_set():
            self.handle.cancel()
            self.tracker.end(outcome)


class ResponseAudio:
    """One response's audio processing: rate and channels (formats.LayoutConverter, from the engine's
    source_rate / source_channels, default the same), `speed` (pitch-preserving) then the response_format encoder.

    Not thread-safe; call it from one worker thread at a time (the body generators await each call).
    """

    def __init__(self, response_format: str, speed: float, sample_rate: int, channels: int, whole_file: bool,
                 source_rate: Optional[int] = None, source_channels: Optional[int] = None):
        source_rate, source_channels = source_rate or sample_rate, source_channels or channels
        self.layout = (LayoutConverter(source_rate, source_channels, sample_rate, channels)
                       if (source_rate, source_channels) != (sample_rate, channels) else None)
        self.stretcher = TimeStretcher(speed, sample_rate, channels) if speed != 1.0 else None
        self.encoder = StreamingEncoder(response_format, sample_rate, channels, whole_file=whole_file)

    @property
    def content_type(self) -> str:
        return self.encoder.content_type

    def feed(self, waveform: torch.Tensor) -> bytes:
        samples = waveform.numpy()
        if self.layout is not None:
            samples = self.layout.process(samples)
        return self._stretch_and_encode(samples)

    def finish(self) -> bytes:
        tail = self._stretch_and_encode(self.layout.flush()) if self.layout is not None else b""
        if self.stretcher is not None:
            tail += self.encoder.encode(self.stretcher.flush())
        return tail + self.encoder.finish()

    def _stretch_and_encode(self, samples) -> bytes:
        if self.stretcher is not None:
            samples = self.stretcher.process(samples)
        return self.encoder.encode(samples)

    def close(self) -> None:
        self.encoder.close()


@dataclass(frozen=True)
class SpokenText:
    """What a request says (for the SSE stream): the normalized input, its chunks' texts, the engine's sample rate
    and the response's speed (captions are in seconds of the response's audio)."""

    text: str
    chunks: list
    sample_rate: int
    speed: float = 1.0


def spoken_text_header(text: str) -> dict:
    """{"x-moss-spoken-text": URL-encoded text} when that fits SPOKEN_TEXT_HEADER_BYTES, else {} (header limits)."""
    encoded = quote(text, safe="")
    return {"x-moss-spoken-text": encoded} if text and len(encoded) <= SPOKEN_TEXT_HEADER_BYTES else {}


async def encoded_chunks(stream: RequestEvents, audio: ResponseAudio, first,
                         disconnected: Optional[Callable[[], Awaitable[bool]]] = None,
                         on_audio: Optional[Callable[[AudioEvent], None]] = None) -> AsyncIterator[bytes]:
    """The encoded bytes of the request's audio as they become ready, starting from its already-read `first` event
    (`on_audio` sees each audio event first).

    Raises:
        StreamFailed: the engine ended the request with an error.
        ClientGone: `disconnected` said the client left.
    """
    event = first
    while True:
        if isinstance(event, AudioEvent):
            if on_audio is not None:
                on_audio(event)
            data = await to_thread.run_sync(audio.feed, event.waveform)
            if data:
                yield data
        elif isinstance(event, FinishedEvent):
            data = await to_thread.run_sync(audio.finish)
            if data:
                yield data
            return
        elif isinstance(event, ErrorEvent):
            raise StreamFailed(f"synthesis failed: {event.message}", event.code)
        event = await stream.next(disconnected)


def close_request(stream: RequestEvents, audio: Optional[ResponseAudio]) -> None:
    """The one way a request ends on the server side: its engine request cancelled unless it has ended, its encoder
    closed. Safe to call more than once."""
    stream.close()
    if audio is not None:
        audio.close()


async def audio_body(stream: RequestEvents, audio: ResponseAudio, first) -> AsyncIterator[bytes]:
    """stream_format 'audio': the bytes as produced. An error after the first byte cuts the body short (the client
    sees an incomplete chunked response), since the status line has already been sent."""
    try:
        async for data in encoded_chunks(stream, audio, first):
            yield data
    except StreamFailed as error:
        logger.warning("request %d: %s; ending its audio stream early", stream.handle.id, error)
        raise


async def sse_body(stream: RequestEvents, audio: ResponseAudio, first, input_tokens: int,
                   spoken: Optional[SpokenText] = None) -> AsyncIterator[str]:
    """stream_format 'sse': speech.audio.delta events (base64 of encoded bytes), a speech.caption event per chunk
    once its audio is sent (with `spoken`), then speech.audio.done with usage and the spoken text; an error after the
    start is sent as an `error` event."""
    timeline = CaptionTimeline(spoken.chunks, spoken.sample_rate, spoken.speed) if spoken else None
    feed = (lambda event: timeline.add(event.chunk_index, event.waveform.shape[-1], event.is_pause)) if spoken else None
    sent = 0
    try:
        async for data in encoded_chunks(stream, audio, first, on_audio=feed):
            yield _sse(SpeechAudioDelta(audio=base64.b64encode(data).decode("ascii"), **_layout(audio)).model_dump())
            for caption in timeline.done[sent:] if timeline else ():
                yield _sse(SpeechCaption(**caption.as_dict()).model_dump())
            sent = len(timeline.done) if timeline else 0
    except StreamFailed as error:
        logger.warning("request %d: %s", stream.handle.id, error)
        yield _sse({"type": "error", **error_body(str(error), "server_error", code=error.code)})
        return
    if timeline is not None and timeline.finish() is not None:
        yield _sse(SpeechCaption(**timeline.done[-1].as_dict()).model_dump())
    frames = sum(codes.shape[0] for codes in stream.final.codes)
    usage = Usage(input_tokens=input_tokens, output_tokens=frames, total_tokens=input_tokens + frames)
    stops = [{"chunk": index, "reason": stop.reason, "frames": stop.frames}
             for index, stop in enumerate(stream.final.stops) if stop is not None]
    yield _sse(SpeechAudioDone(usage=usage, spoken_text=spoken.text if spoken else None, runaway_stops=stops,
                               **_layout(audio)).model_dump())


async def whole_file(stream: RequestEvents, audio: ResponseAudio, first,
                     disconnected: Callable[[], Awaitable[bool]]) -> bytes:
    """stream=false: the complete file (the request is cancelled if the client leaves meanwhile).

    Raises:
        APIError: 500 when the engine ended the request with an error.
        ClientGone: the client left.
    """
    pieces = []
    try:
        async for data in encoded_chunks(stream, audio, first, disconnected):
            pieces.append(data)
    except StreamFailed as error:
        raise APIError(500, str(error), error_type="server_error", code=error.code) from None
    return b"".join(pieces)


def _layout(audio: ResponseAudio) -> dict:
    encoder = audio.encoder
    return {"response_format": encoder.format.name, "sample_rate": encoder.sample_rate, "channels": encoder.channels}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


__all__ = ["ClientGone", "RequestEvents", "ResponseAudio", "SpokenText", "StreamFailed", "audio_body",
           "close_request", "encoded_chunks", "spoken_text_header", "sse_body", "whole_file"]
