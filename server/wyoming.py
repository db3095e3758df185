"""The speech server's engine behind the Wyoming protocol (Home Assistant's local voice pipeline), beside HTTP.

    describe                                      -> info: one TTS program, its voices (every name GET
                                                     /v1/audio/voices lists) and languages
    synthesize {text, voice?}                     -> audio-start, audio-chunk..., audio-stop
    synthesize-start {voice?}, synthesize-chunk {text}..., synthesize-stop
                                                  -> audio-start at the first audio, audio-chunk... (each finished
                                                     sentence is spoken as soon as its text has arrived), audio-stop,
                                                     synthesize-stopped
    a failure                                     -> error {text, code} (the connection stays usable; a
                                                     streaming session ends with it)
Limits: each spoken piece is checked like an HTTP `input` (--max-input-chars), and so is the text a streaming session
holds while it waits for a sentence end.

A client that streams also sends a plain `synthesize` with the whole text inside the session, before synthesize-stop
(for servers that do not stream); inside a session it is ignored, as the protocol intends. Audio is 16-bit PCM at
WYOMING_RATE mono (speech needs no more; the client converts what it plays). The voice is the Wyoming voice's `name`
(voice_library/catalog.py resolves it; none: the default voice).

One engine: every request goes through the HTTP server's SpeechService (prepare, submit) and the same
server/streams.py machinery, so Wyoming and HTTP clients share the slots, the queue limit and the metrics. `serve.py
--wyoming-port PORT` runs this beside uvicorn on the same event loop (`serve_both`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Optional

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler, AsyncTcpServer
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from .schema import APIError, SpeechBody
from .app import ServerState, in_fresh_thread
from .streams import RequestEvents, ResponseAudio, StreamFailed, close_request, encoded_chunks
from ..voice_library.presets import LANGUAGES, PRESET_LICENSE, PRESET_REPOSITORY, PRESETS

logger = logging.getLogger(__name__)

WYOMING_RATE, WYOMING_CHANNELS, WYOMING_WIDTH = 24000, 1, 2
# A streamed sentence ends at . ! ? followed by white space, or right after 。！？ (which need no white space).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")
ATTRIBUTION = Attribution(name="OpenMOSS", url="https://github.com/OpenMOSS/MOSS-TTS-Nano")


class WyomingSpeech:
    """What every Wyoming connection shares: the HTTP server's state and the request settings.

    Args:
        state: server/app.py's ServerState (its service once loaded).
        overrides: extension fields of SpeechBody applied to every request (e.g. {"max_new_frames": 40}).
    """

    def __init__(self, state: ServerState, overrides: Optional[dict] = None) -> None:
        self.state, self.overrides = state, dict(overrides or {})

    def info(self) -> Info:
        service = self.state.ready()
        voices = [TtsVoice(name=entry.name, attribution=ATTRIBUTION, installed=True, version=None,
                           description=f"{entry.kind} voice, spoken by {entry.uses}",
                           languages=[PRESETS[entry.uses].language] if entry.uses in PRESETS else list(LANGUAGES))
                  for entry in service.catalog.entries()]
        program = TtsProgram(name=service.options.model_name, attribution=ATTRIBUTION, installed=True,
                             description=f"MOSS-TTS-Nano (preset voices from {PRESET_REPOSITORY}, {PRESET_LICENSE})",
                             version=None, voices=voices, supports_synthesize_streaming=True)
        return Info(tts=[program])

    async def speak(self, text: str, voice: Optional[str], send, started: bool) -> bool:
        """Speak `text` in `voice`, sending audio-start (unless `started`) and the audio chunks; returns True once
        audio-start has been sent. Raises APIError (bad request, busy) or StreamFailed (the engine failed)."""
        service = self.state.ready()
        body = SpeechBody(model=service.options.model_name, input=text, voice=voice, response_format="pcm",
                          sample_rate=WYOMING_RATE, channels=WYOMING_CHANNELS, **self.overrides)
        prepared = await in_fresh_thread(service.prepare, body)
        stream = RequestEvents(lambda listener: service.submit(prepared, listener), asyncio.get_running_loop(),
                              self.state.metrics.tracker())
        audio = ResponseAudio("pcm", 1.0, WYOMING_RATE, WYOMING_CHANNELS, whole_file=False,
                              source_rate=service.sample_rate, source_channels=service.channels)
        try:
            first = await stream.next()
            async for data in encoded_chunks(stream, audio, first):
                if not started:
                    await send(AudioStart(rate=WYOMING_RATE, width=WYOMING_WIDTH, channels=WYOMING_CHANNELS).event())
                    started = True
                await send(AudioChunk(rate=WYOMING_RATE, width=WYOMING_WIDTH, channels=WYOMING_CHANNELS,
                                      audio=data).event())
        finally:
            close_request(stream, audio)
        return started


class WyomingHandler(AsyncEventHandler):
    """One Wyoming connection (module docstring)."""

    def __init__(self, speech: WyomingSpeech, reader, writer) -> None:
        super().__init__(reader, writer)
        self.speech = speech
        self._session: Optional[dict] = None  # a streaming session: voice, pending text, audio started

    async def handle_event(self, event: Event) -> bool:
        try:
            await self._dispatch(event)
        except APIError as error:
            await self._fail(error.message, error.code or error.error_type)
        except StreamFailed as error:
            await self._fail(str(error), "synthesis_failed")
        except ValueError as error:
            await self._fail(str(error), "invalid_request")
        return True

    async def _dispatch(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self.write_event(self.speech.info().event())
        elif Synthesize.is_type(event.type):
            await self._synthesize(Synthesize.from_event(event))
        elif SynthesizeStart.is_type(event.type):
            start = SynthesizeStart.from_event(event)
            self._session = {"voice": _voice_name(start.voice), "text": "", "started": False}
        elif SynthesizeChunk.is_type(event.type):
            await self._chunk(SynthesizeChunk.from_event(event).text)
        elif SynthesizeStop.is_type(event.type):
            await self._stop()

    async def _synthesize(self, request: Synthesize) -> None:
        if self._session is not None:  # the whole text again, for servers that do not stream: spoken by chunks
            return
        started = await self.speech.speak(request.text, _voice_name(request.voice), self.write_event, False)
        if not started:
            await self.write_event(AudioStart(rate=WYOMING_RATE, width=WYOMING_WIDTH,
                                              channels=WYOMING_CHANNELS).event())
        await self.write_event(AudioStop().event())

    async def _chunk(self, text: str) -> None:
        session = self._require_session("synthesize-chunk")
        session["text"] += text
        limit = self.speech.state.ready().options.max_input_chars
        if len(session["text"]) > limit:
            raise ValueError(f"the streamed text has {len(session['text'])} characters without a sentence end; "
                             f"expected at most {limit} (the server's --max-input-chars) before one")
        *sentences, rest = SENTENCE_END.split(session["text"])
        session["text"] = rest
        for sentence in sentences:
            if sentence.strip():
                session["started"] = await self.speech.speak(sentence, session["voice"], self.write_event,
                                                             session["started"])

    async def _stop(self) -> None:
        session = self._require_session("synthesize-stop")
        self._session = None
        try:
            if session["text"].strip():
                session["started"] = await self.speech.speak(session["text"], session["voice"], self.write_event,
                                                             session["started"])
            if not session["started"]:
                await self.write_event(AudioStart(rate=WYOMING_RATE, width=WYOMING_WIDTH,
                                                  channels=WYOMING_CHANNELS).event())
            await self.write_event(AudioStop().event())
        finally:
            await self.write_event(SynthesizeStopped().event())

    def _require_session(self, name: str) -> dict:
        if self._session is None:
            raise ValueError(f"{name} without synthesize-start; expected synthesize-start first")
        return self._session

    async def _fail(self, text: str, code: str) -> None:
        logger.info("wyoming request failed: %s", text)
        self._session = None
        await self.write_event(Error(text=text, code=code).event())


def _voice_name(voice) -> Optional[str]:
    return voice.name if voice is not None and voice.name else None


async def start_server(speech: WyomingSpeech, host: str, port: int) -> AsyncTcpServer:
    """A started Wyoming TCP server on host:port (stop it with `await server.stop()`)."""
    server = AsyncTcpServer(host, port)
    await server.start(lambda reader, writer: WyomingHandler(speech, reader, writer))
    logger.info("wyoming: listening on tcp://%s:%d", host, port)
    return server


async def serve_both(http_server, speech: WyomingSpeech, host: str, port: int) -> None:
    """Run uvicorn's `http_server` and the Wyoming server on this event loop until uvicorn stops."""
    wyoming = await start_server(speech, host, port)
    try:
        await http_server.serve()
    finally:
        await wyoming.stop()


__all__ = ["WYOMING_CHANNELS", "WYOMING_RATE", "WyomingHandler", "WyomingSpeech", "serve_both", "start_server"]
