"""What a caller gives the speech engine and what it gets back: requests, events, error codes and the handle.

engine.py schedules them; its module docstring says when each ErrorEvent code is used.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .generation import NON_FINITE_LOGITS, GenerationSettings

# ErrorEvent codes (engine.py's module docstring, "Failures", says when each is used).
CANCELLED = "cancelled"
PREFILL_FAILED = "prefill_failed"
DECODE_STEP_FAILED = "decode_step_failed"
CODEC_FAILED = "codec_failed"
LISTENER_FAILED = "listener_failed"
INTERNAL_ERROR = "internal_error"
ERROR_CODES = (CANCELLED, NON_FINITE_LOGITS, PREFILL_FAILED, DECODE_STEP_FAILED, CODEC_FAILED, LISTENER_FAILED,
               INTERNAL_ERROR)


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full: retry later."""


class RequestError(RuntimeError):
    """A request ended with an ErrorEvent, for callers that raise (inference_stream): `code` is the event's code (one
    of ERROR_CODES)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code



@dataclass
class ChunkPrompt:
    """One chunk of a request: its prompt rows and the silence that follows it.

    Attributes:
        rows: long [T, n_vq + 1] prompt rows (no padding), e.g. from prompting.build_voice_clone_rows.
        pause_seconds: silence emitted after the chunk's audio (0 for the last chunk).
        text: the chunk's text (for messages).
        shared_rows: leading rows that do not depend on the text (the voice, `prompting.shared_prefix_rows`); an
            engine with a prefix store prefills them once per voice (prefix_store.py). 0: none.
    """

    rows: torch.Tensor
    pause_seconds: float = 0.0
    text: str = ""
    shared_rows: int = 0


@dataclass
class EngineRequest:
    """What a caller asks the engine for.

    Attributes:
        chunks: spoken one after another, in one slot.
        settings: generation settings (unchecked values are checked at submit).
        seed: seeds a private generator; None (and no generator): a private generator with a random seed, reported
            in the FinishedEvent.
        generator: an explicit generator; wins over seed.
        global_random: draw from the device's global generator instead, as upstream's generate does (a run seeded
            with torch.manual_seed then matches upstream's draws; not isolated from other such requests).
        codec_prime: codes [T, n_vq] streamed through the codec before the first chunk and not emitted
            (continuation mode: the prompt audio's codes, as upstream primes its stream).
        decode_audio: False emits codes only (no codec work).
        emit_codes: also emit a CodesEvent per frame.
        runaway_guards: end a chunk that runs away (runaway_guards.py); FinishedEvent.stops says which.
        realtime: a listener plays the audio as it arrives, so the request joins only while the engine can keep its
            real-time streams ahead of playback (engine_schedule.admission_refusal). False (a whole file, read when
            complete): it takes any free slot while no real-time stream plays, so batch work keeps its throughput.
    """

    chunks: list[ChunkPrompt]
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = None
    global_random: bool = False
    codec_prime: Optional[torch.Tensor] = None
    decode_audio: bool = True
    emit_codes: bool = False
    runaway_guards: bool = False
    realtime: bool = True


@dataclass
class AudioEvent:
    """float32 audio [C, n] on the CPU, in playback order; pauses between chunks are their own events."""

    waveform: torch.Tensor
    sample_rate: int
    chunk_index: int
    is_pause: bool = False


@dataclass
class CodesEvent:
    """One generated frame: codes long [n_vq] on the CPU (audio pad in channels >= nq)."""

    codes: torch.Tensor
    chunk_index: int
    frame_index: int


@dataclass
class FinishedEvent:
    """The request is complete.

    Attributes:
        codes: per chunk, long [F_i, n_vq] on the CPU.
        truncated: per chunk, whether it reached max_new_frames before the model ended it.
        seed: the seed of its private generator (None when the caller passed a generator).
        audio_seconds: seconds of audio emitted (pauses included).
        stops: per chunk, the runaway_guards.GuardStop that ended it early, or None.
    """

    codes: list
    truncated: list
    seed: Optional[int]
    audio_seconds: float
    stops: list = field(default_factory=list)


@dataclass
class ErrorEvent:
    """The request ended early: `cancelled` (by the caller) or an error of this request only.

    Attributes:
        message: what happened, for people.
        cancelled: the caller (or `stop(drain=False)`) cancelled it.
        code: a stable name of the cause, one of ERROR_CODES (engine.py's docstring); left empty, "cancelled" or
            "internal_error" by `cancelled`.
    """

    message: str
    cancelled: bool = False
    code: str = ""

    def __post_init__(self) -> None:
        if not self.code:
            self.code = CANCELLED if self.cancelled else INTERNAL_ERROR


FINAL_EVENTS = (FinishedEvent, ErrorEvent)


class RequestHandle:
    """The caller's side of one request: its events, and cancel()."""

    def __init__(self, request_id: int, listener: Optional[Callable[[object], None]] = None) -> None:
        self.id = request_id
        self.submitted = time.perf_counter()
        self._queue: queue.Queue = queue.Queue()
        self._listener = listener or self._queue.put
        self._cancel = threading.Event()
        self.admitted = threading.Event()  # set when the request gets a slot (the server's queue deadline reads it)
        self.done = threading.Event()

    def deliver(self, event) -> None:
        """Called by the engine thread (a final event sets `done` even when the listener raises)."""
        try:
            self._listener(event)
        finally:
            if isinstance(event, FINAL_EVENTS):
                self.done.set()

    def cancel(self) -> None:
        """Ask the engine to end this request; it frees the slot at the next tick and emits a cancelled ErrorEvent."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def events(self, timeout: Optional[float] = None) -> Iterator[object]:
        """The request's events until the final one (for handles without a listener).

        Raises:
            TimeoutError: when no event arrives within `timeout` seconds.
        """
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event from the engine for request {self.id} within {timeout} s") from None
            yield event
            if isinstance(event, FINAL_EVENTS):
                return

    def pending(self) -> list:
        """Events delivered so far and not yet read (non-blocking)."""
        events = []
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events


__all__ = ["AudioEvent", "CANCELLED", "CODEC_FAILED", "ChunkPrompt", "CodesEvent", "DECODE_STEP_FAILED", "ERROR_CODES",
           "ErrorEvent", "FINAL_EVENTS", "FinishedEvent", "INTERNAL_ERROR", "LISTENER_FAILED", "NON_FINITE_LOGITS",
           "PREFILL_FAILED", "QueueFullError", "RequestError", "RequestHandle", "EngineRequest"]
