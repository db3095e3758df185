"""The speech engine: many independent streams decoded together, requests joining and leaving between frames.

One engine owns one model on one device and a `generation.SlotDecoder` with a fixed number of slots. A request is a
list of prompts (one per voice-clone text chunk, spoken one after another in the request's slot) with its own
generation settings and its own random generator; it receives its own stream of events (`AudioEvent`, `CodesEvent`,
then `FinishedEvent` or `ErrorEvent`). Isolation is the promise: a request's codes never depend on what runs beside
it (its random numbers come from its generator, its sampling settings and repetition history are its slot's, its
codec streaming state is its slot's), and an error in one request ends that request only.

The scheduler, one tick (`step`; the rules and their measured costs are in engine_schedule.py):

1. cancelled requests leave (their slots are free for the same tick's admissions);
2. prefill under a per-tick budget: a running request's next chunk first, then waiting requests, first come first
   served, while the machine can keep every admitted stream ahead of playback (`admission_refusal`); while streams
   are playing, a tick runs at most one prefill call: a prompt's part (its voice, then its text), or with
   `prefill_chunk_rows` (the server's) a chunk of at most that many rows, so that a joining prompt stalls the
   playing streams by one chunk per tick. A prompt's chunks fall where its rows alone put them (SlotDecoder.begin),
   so a request's codes do not depend on how its chunks were spread over ticks; a request's codec prime
   (continuation) goes through the codec a pass per tick the same way. A request that may not join waits
   in the queue, and `waiting_by_reason` says why (engine_schedule.WAIT_REASONS). With a prefix store
   (`prefix_store_bytes`, the server's), a voice's shared rows are prefilled once and copied into the slot after
   that (prefix_store.py);
3. one frame for every running request (one fixed-shape step, one host sync);
4. the codec, by playback deadline: when some stream's policy asks for a decode (its first audio, a full call of
   frames, or a stream that would run out of slack if it waited one more tick), one batched call of the codec's slot
   session decodes it and every other request's pending frames with it (up to the longest asked); a chunk's last
   frames are decoded at once, then its pause (silence, spec §7.2) is emitted and its next chunk is prefilled into
   the same slot on the next tick.

The engine runs inline (`step` / `run_until_idle`, what `inference_stream` does) or on its own thread (`start` /
`stop`, what the server does). Submitting and cancelling are thread-safe; events go to each request's own queue (or a
listener callable of the caller's).

Failures. A slot forgets its previous occupant at admission (`SlotDecoder._forget`: both KV caches cleared, values
included, and every per-slot table reset), so a request's codes never depend on what ran in its slot before, even a
request whose logits went non-finite. A request that fails ends with an `ErrorEvent` whose `code` is one of
ERROR_CODES, stable names for the server's HTTP/SSE errors and metrics:

    cancelled            the caller cancelled it (or `stop(drain=False)` did)
    non_finite_logits    a text or audio logit of this request was inf or NaN
    prefill_failed       its prompt could not be prefilled (e.g. a device error)
    decode_step_failed   the shared decode step raised: every running request ends with this code
    codec_failed         the codec call that held its frames raised (the requests in that call end)
    listener_failed      its own event listener raised (that request ends; the others' events are delivered)
    internal_error       an ErrorEvent made without a code (the engine always names one)

A non-finite request is refused, not retried: in float16 (the NPU default) non-finite logits are what upstream's
float32 retry exists for, but the engine's model is shared by every running stream, and casting it (or keeping a
float32 copy on a side path) would stall the others or double the memory, while the request's first audio may already
be out. The request therefore ends with `non_finite_logits` (and never with a FinishedEvent: a group that reaches its
frame limit is checked once more first), so no waveform is ever returned as a success; the caller may resubmit it to
a float32 engine or use offline `inference`, which retries once in float32 (synthesis_offline.py).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .codec_streaming import CODEC_FRAMES_PER_PASS, codec_slots
from .devices import free_memory_bytes, new_generator
from .engine_schedule import (DEADLINE_POLICY, EVERY_FRAME_STREAM_POLICY, NO_FREE_SLOT,  # noqa: F401
                              UPSTREAM_CUDA_STREAM_POLICY, UPSTREAM_STREAM_POLICY, WAIT_REASONS, DeadlinePolicy,
                              EngineCosts, StreamDecodePolicy, admission_refusal, stream_lead_seconds)
from .engine_requests import (CANCELLED, CODEC_FAILED, DECODE_STEP_FAILED, ERROR_CODES, FINAL_EVENTS,  # noqa: F401
                              INTERNAL_ERROR, LISTENER_FAILED, NON_FINITE_LOGITS, PREFILL_FAILED, AudioEvent,
                              ChunkPrompt, CodesEvent, ErrorEvent, FinishedEvent, QueueFullError, RequestError,
                              RequestHandle, EngineRequest)
from .generation import GenerationSettings, Group, SlotDecoder
from .prefix_store import PrefixStore
from .runaway_guards import RunawayGuard

logger = logging.getLogger(__name__)

# Default global cache positions per slot: a 30 s reference (375 rows) + template and a 75-token chunk (~150 rows)
# + 375 frames (30 s) fits in 1024.
DEFAULT_MAX_POSITIONS = 1024
# Slots from free memory: this share of the free memory goes to the KV caches, at most MAX_AUTO_SLOTS slots.
SLOT_MEMORY_FRACTION = 0.5
MAX_AUTO_SLOTS = 64
# ----------------------------------------------------------------------------------------------------------------
# Per-request state inside the engine


@dataclass(eq=False)
class _RequestState:
    """A running request: where it is, what is pending for the codec, what it emitted. Compared by identity (the
    waiting queue removes a cancelled stream by `==`, which field by field would compare prompt tensors)."""

    request: EngineRequest
    handle: RequestHandle
    settings: GenerationSettings
    generator: Optional[torch.Generator]
    seed: Optional[int]
    slot: int = -1
    chunk: int = 0
    group: Optional[Group] = None
    pending: list = field(default_factory=list)  # device codes [n_vq] not yet decoded
    chunk_codes: list = field(default_factory=list)  # device codes of the current chunk
    codes: list = field(default_factory=list)  # CPU [F, n_vq] per finished chunk
    truncated: list = field(default_factory=list)
    guard: Optional[RunawayGuard] = None  # the current chunk's
    stops: list = field(default_factory=list)
    emitted_samples: int = 0
    first_emit_time: Optional[float] = None
    needs_prefill: bool = True  # its current chunk still has to be prefilled
    fill: Optional[list] = None  # the current chunk's prompt while its prefill runs (generation.PromptFill list)
    prime: Optional[torch.Tensor] = None  # codec_prime frames [T, n_vq] not yet through the codec
    chunk_done: bool = False  # the current chunk's LM part is over (its audio may still be pending)

    def lead(self, rate: int, now: float) -> float:
        return stream_lead_seconds(self.emitted_samples / rate, self.first_emit_time, now)


# ----------------------------------------------------------------------------------------------------------------
# The engine


class SpeechEngine:
    """Continuous batching of speech requests over one model (see the module docstring).

    Args:
        model: a MossTTSNanoForCausalLM on its device, in eval mode.
        codec: the codec (MossAudioTokenizerModel) on the same device, or None (codes only).
        num_slots: streams decoded together; None sizes it from the device's free memory (at most MAX_AUTO_SLOTS).
        max_positions: global cache positions per slot (prompt rows + frames of one chunk).
        max_queue: requests that may wait for a slot; more are refused with QueueFullError.
        attn_implementation: attention request (default: the model config's, resolved for the device).
        step_mode: "eager", "compile" or "graph" (generation.PhaseRunner).
        policy: the codec streaming policy (engine_schedule: DEADLINE_POLICY, or upstream's lead-based ones).
        prefix_store_bytes: keep the keys and values of prompts' shared prefixes (a voice's rows, ChunkPrompt.
            shared_rows) within this many bytes, so that the next chunk or request in that voice prefills only the
            rest (prefix_store.py); None (default): prompts are prefilled whole, as upstream's generate does.
        prefill_chunk_rows: prefill prompts in chunks of at most this many rows, one chunk per tick while streams
            are playing, so that a joining stream's prompt never stalls a tick by more than one chunk; where the
            chunks fall depends on the prompt alone (`SlotDecoder.begin`), so a request's codes do not depend on the
            load. None (default): each part of a prompt in one call, as upstream's generate does.
    """

    def __init__(self, model, codec=None, num_slots: Optional[int] = None, max_positions: int = DEFAULT_MAX_POSITIONS,
                 max_queue: int = 64, attn_implementation: Optional[str] = None, step_mode: str = "eager",
                 policy: DeadlinePolicy | StreamDecodePolicy = DEADLINE_POLICY,
                 prefix_store_bytes: Optional[int] = None, prefill_chunk_rows: Optional[int] = None) -> None:
        if prefill_chunk_rows is not None and prefill_chunk_rows < 1:
            raise ValueError(f"prefill_chunk_rows {prefill_chunk_rows}; expected a number of rows >= 1, or None")
        self.model = model
        self.n_vq = int(model.config.n_vq)
        self.attention = model._attention_pair(attn_implementation)
        self.num_slots = num_slots or auto_slot_count(model, max_positions)
        self.prefixes = PrefixStore(prefix_store_bytes) if prefix_store_bytes is not None else None
        self.decoder = SlotDecoder(model, self.num_slots, max_positions, self.attention, step_mode, self.prefixes)
        self.codec = codec_slots(codec, self.num_slots, self.n_vq) if codec is not None else None
        self.max_queue = max_queue
        self.policy = policy
        self.prefill_chunk_rows = prefill_chunk_rows
        self.costs = EngineCosts()  # measured online; the scheduler's predictions
        self.wait_reason: Optional[str] = None  # why the queue's head waits (None: nothing waits, or it just joined)
        self._prefilled = False  # whether a prefill chunk ran in this tick (the per-tick prefill budget)
        self._waiting: deque = deque()
        self._running: dict[int, _RequestState] = {}  # slot -> stream
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._thread: Optional[threading.Thread] = None  # start()'s thread
        self._served = threading.Event()  # set while no thread is inside serve()
        self._served.set()
        self._stopping = False
        self._cancel_below = 0  # requests with a smaller id are cancelled (stop(drain=False)); later ones are not
        self.ticks = 0
        logger.info("speech engine: %d slots x %d positions, attention %s/%s, steps %s, voice store %s, prefill %s",
                    self.num_slots, max_positions, self.attention[0], self.attention[1], step_mode,
                    "off" if prefix_store_bytes is None else f"{prefix_store_bytes / 2**20:.0f} MiB",
                    "whole" if prefill_chunk_rows is None else f"in chunks of {prefill_chunk_rows} rows")

    # ------------------------------------------------------------------------------------------------------------
    # Caller side (any thread)

    def submit(self, request: EngineRequest, listener: Optional[Callable[[object], None]] = None) -> RequestHandle:
        """Queue a request; its events go to the returned handle (or to `listener`, called on the engine thread).

        Raises:
            ValueError: bad settings or prompts (nothing is queued).
            QueueFullError: max_queue requests are already waiting.
        """
        settings = request.settings.checked(self.n_vq)
        self._check_chunks(request, settings)
        seed, generator = self._random_source(request)
        handle = RequestHandle(next(self._ids), listener)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (max_queue="
                                     f"{self.max_queue}); retry later")
            self._waiting.append(_RequestState(request, handle, settings, generator, seed))
            self._wake.notify()
        return handle

    def _check_chunks(self, request: EngineRequest, settings: GenerationSettings) -> None:
        if not request.chunks:
            raise ValueError("chunks is empty; expected at least one ChunkPrompt")
        width = self.n_vq + 1
        for index, chunk in enumerate(request.chunks):
            rows = chunk.rows
            if rows.dim() != 2 or rows.shape[1] != width or rows.shape[0] < 1:
                raise ValueError(f"chunk {index} rows have shape {tuple(rows.shape)}; expected [T >= 1, {width}]")
            needed = rows.shape[0] + settings.max_new_frames
            if needed > self.decoder.capacity:
                raise ValueError(
                    f"chunk {index} needs {needed} positions ({rows.shape[0]} prompt rows + max_new_frames="
                    f"{settings.max_new_frames}); the engine holds {self.decoder.capacity} per stream: use a shorter "
                    "reference clip, a smaller max_new_frames, or a larger max_positions")

    def _random_source(self, request: EngineRequest) -> tuple[Optional[int], Optional[torch.Generator]]:
        """(seed to report, generator); generator None = the device's global one."""
        if request.global_random:
            return None, None
        if request.generator is not None:
            return None, request.generator
        seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**63)
        return seed, new_generator(self.decoder.device, seed)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def running(self) -> bool:
        """Whether a thread runs the engine (`start` or `serve` ran and `stop` has not ended it)."""
        return not self._served.is_set()

    # ------------------------------------------------------------------------------------------------------------
    # Engine side: one tick

    @torch.no_grad()
    def step(self) -> bool:
        """One scheduler tick (module docstring). Returns whether any request is still waiting or running."""
        self._drop_cancelled()
        self._admit()
        started = time.perf_counter()  # ticks are measured without prefill and priming (engine_schedule.EngineCosts)
        rows = max(self._running, default=0) + 1  # as _frame and _decode_audio count them
        if self.decoder.groups:
            self._frame()
        if self.codec is not None:
            self._decode_audio()
        self._close_finished()
        if self._running:
            self.costs.add_tick(time.perf_counter() - started, rows)
        self.ticks += 1
        return bool(self._running or self._waiting)

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def close(self) -> None:
        """Release the codec's streams (for an upstream-API codec object, its streaming state)."""
        if self.codec is not None:
            self.codec.close()

    def _drop_cancelled(self) -> None:
        with self._lock:
            for stream in list(self._waiting) + list(self._running.values()):
                if stream.handle.id < self._cancel_below:
                    stream.handle.cancel()
            dropped = [s for s in self._waiting if s.handle.cancelled]
            for stream in dropped:
                self._waiting.remove(stream)
        for stream in dropped:
            self._deliver(stream, ErrorEvent("cancelled", cancelled=True, code=CANCELLED))
        for stream in [s for s in self._running.values() if s.handle.cancelled]:
            self._end(stream, ErrorEvent("cancelled", cancelled=True, code=CANCELLED))

    def _admit(self) -> None:
        """Prefill running requests' prompts (a next chunk of text, or a prompt still being prefilled), then admit
        waiting requests while the scheduler lets them join."""
        self._prefilled = False
        for stream in list(self._running.values()):
            if stream.needs_prefill and stream.chunk_done is False:
                self._begin_prefill(stream)
            if stream.fill is not None:
                self._continue_prefill(stream)
            if stream.prime is not None:
                self._continue_prime(stream)
        while True:
            with self._lock:
                if not self._waiting:
                    self.wait_reason = None
                    return
                free = [slot for slot in self.decoder.free_slots() if slot not in self._running]
                self.wait_reason = self._refusal(self._waiting[0], free)
                if self.wait_reason is not None:
                    return
                stream = self._waiting.popleft()
            stream.slot = free[0]
            stream.handle.admitted.set()
            self.costs.joined()
            self._running[stream.slot] = stream
            self._start_codec(stream)
            self._begin_prefill(stream)
            if stream.fill is not None:
                self._continue_prefill(stream)

    def _refusal(self, stream: _RequestState, free: list[int]) -> Optional[str]:
        """Why `stream` may not join now (engine_schedule.WAIT_REASONS), or None. Only slots count without a codec
        (nothing plays), under a policy that does not admit by capacity (upstream's), and for a request that is not
        real-time while no real-time stream runs."""
        if not free:
            return NO_FREE_SLOT
        realtime = [s for s in self._running.values() if s.request.realtime]
        if self.codec is None or not self.policy.admits_by_capacity or not (stream.request.realtime or realtime):
            return None
        now = time.perf_counter()
        slacks = [s.lead(self.codec.rate, now) if s.first_emit_time is not None else None for s in realtime]
        rows_after = max([free[0], *self._running]) + 1
        chunk = stream.request.chunks[0]
        stall_rows = self.decoder.rows_to_prefill(chunk.rows, chunk.shared_rows)
        if self.prefill_chunk_rows is not None:
            stall_rows = min(stall_rows, self.prefill_chunk_rows)
        budget_spent = self._prefilled or any(other.fill is not None for other in self._running.values())
        self.costs.codec_share = self.codec.window_share(rows_after)
        return admission_refusal(self.costs, slacks, rows_after, stall_rows, budget_spent,
                                 self.codec.hop / self.codec.rate)

    def waiting_by_reason(self) -> dict[str, int]:
        """Waiting requests by why they wait (every reason of engine_schedule.WAIT_REASONS, 0 when none)."""
        with self._lock:
            waiting, reason = len(self._waiting), self.wait_reason
        return {name: (waiting if name == reason else 0) for name in WAIT_REASONS}

    def _begin_prefill(self, stream: _RequestState) -> None:
        """Start the stream's current chunk in its slot (`_continue_prefill` runs its prompt's chunks); a failure
        ends this request only."""
        chunk = stream.request.chunks[stream.chunk]
        if stream.request.runaway_guards:
            stream.guard = RunawayGuard.for_texts([chunk.text], stream.settings.max_new_frames)
        stream.group = Group([stream.slot], stream.settings, stream.generator, guard=stream.guard)
        stream.needs_prefill = False
        stream.chunk_codes = []
        try:
            stream.fill = self.decoder.begin(stream.group, [chunk.rows], self.attention[0], chunk.shared_rows,
                                             self.prefill_chunk_rows)
        except Exception as error:  # a bad prompt or a device error: this request only
            self._prefill_failed(stream, error)

    def _continue_prefill(self, stream: _RequestState) -> None:
        """Prefill the stream's prompt: one chunk while streams are playing and this tick's chunk is not spent yet
        (then the rest waits for the next ticks), else all of it; once it is all in, the stream's group joins."""
        playing = self._playing()
        if playing and self._prefilled:
            return
        started = time.perf_counter()
        try:
            rows = self.decoder.fill(stream.fill, 1 if playing else None)
            self.costs.prefill.add(rows, time.perf_counter() - started)
            self._prefilled = True
            if not any(prompt_fill.chunks for prompt_fill in stream.fill):
                self.decoder.join(stream.group, stream.fill)
                stream.fill = None
        except Exception as error:  # a device error while prefilling: this request only
            self._prefill_failed(stream, error)

    def _playing(self) -> bool:
        """Whether a streamed request's audio is playing (prefill and priming then go a piece per tick)."""
        return any(s.first_emit_time is not None and s.request.realtime for s in self._running.values())

    def _prefill_failed(self, stream: _RequestState, error: Exception) -> None:
        logger.warning("request %d failed while prefilling chunk %d: %s", stream.handle.id, stream.chunk, error)
        stream.group, stream.fill = None, None
        self._end(stream, ErrorEvent(f"{type(error).__name__}: {error}", code=PREFILL_FAILED))

    def _start_codec(self, stream: _RequestState) -> None:
        if self.codec is None or not stream.request.decode_audio:
            return
        self.codec.reset(stream.slot)
        prime = stream.request.codec_prime
        if prime is not None and prime.shape[0] > 0:
            stream.prime = prime
            self._continue_prime(stream)

    def _continue_prime(self, stream: _RequestState) -> None:
        """Stream the request's codec_prime through its codec row (output not emitted): one pass of
        CODEC_FRAMES_PER_PASS frames per tick while streams play, else all of it; the passes are those one call
        of the whole prime makes, so the stream's state does not depend on how they were spread. Its own audio waits
        until the prime is through."""
        while stream.prime is not None:
            piece, rest = stream.prime[:CODEC_FRAMES_PER_PASS], stream.prime[CODEC_FRAMES_PER_PASS:]
            try:
                self.codec.decode({stream.slot: (piece, stream.settings.nq)})
            except Exception as error:  # a codec failure while priming: this request only
                logger.exception("the codec failed while priming request %d", stream.handle.id)
                self._end(stream, ErrorEvent(f"{type(error).__name__}: {error}", code=CODEC_FAILED))
                return
            stream.prime = rest if rest.shape[0] > 0 else None
            if self._playing():
                return

    def _frame(self) -> None:
        rows, started = max(self._running, default=0) + 1, time.perf_counter()
        try:
            outputs = self.decoder.frame()
            self.costs.lm.add(rows, time.perf_counter() - started)
        except Exception as error:  # a device failure during the shared step: every running request is affected
            logger.exception("the decode step failed; ending the %d running requests", len(self._running))
            for stream in list(self._running.values()):
                if stream.group is not None and stream.group in self.decoder.groups:
                    self.decoder.finish(stream.group)
                self._end(stream, ErrorEvent(f"{type(error).__name__}: {error}", code=DECODE_STEP_FAILED))
            return
        for output in outputs:
            stream = self._running.get(output.group.slots[0])
            if stream is None or stream.group is not output.group:
                continue
            self._take_output(stream, output)

    def _take_output(self, stream: _RequestState, output) -> None:
        if output.codes is not None:
            codes = output.codes[0]
            stream.chunk_codes.append(codes)
            if stream.request.decode_audio and self.codec is not None:
                stream.pending.append(codes)
            if stream.request.emit_codes and not self._deliver(
                    stream, CodesEvent(codes.to("cpu"), stream.chunk, len(stream.chunk_codes) - 1)):
                return
        if output.error is not None:
            self._end(stream, ErrorEvent(output.error, code=output.error_code or NON_FINITE_LOGITS))
        elif output.done:
            stream.chunk_done = True
            stream.group = None

    def _decode_audio(self) -> None:
        """One batched codec call when some stream's policy (or finished chunk) asks for it.

        The call then takes every stream's pending frames (up to the policy's `ride_along`, or all for a finished
        chunk): a call runs its longest count of frames for every row up to its last slot anyway, so riding along
        costs little and saves a call of its own a tick later.
        """
        now = time.perf_counter()
        rows = max(self._running, default=0) + 1
        self.costs.codec_share = self.codec.window_share(rows)
        wanted = {slot: self._frames_to_decode(stream, now, rows) for slot, stream in self._running.items()
                  if stream.pending and stream.prime is None}
        if not any(wanted.values()):
            return
        riding = self.policy.ride_along(max(wanted.values()))
        work = {}
        for slot in wanted:
            stream = self._running[slot]
            take = len(stream.pending) if stream.chunk_done else min(len(stream.pending), max(riding, wanted[slot]))
            work[slot] = (torch.stack(stream.pending[:take]), stream.settings.nq)
            stream.pending = stream.pending[take:]
        started = time.perf_counter()
        try:
            audio = self.codec.decode(work)
        except Exception as error:  # a codec failure: the streams in this call are affected
            logger.exception("the codec failed for %d requests", len(work))
            for slot in work:
                self._end(self._running[slot], ErrorEvent(f"{type(error).__name__}: {error}", code=CODEC_FAILED))
            return
        span = (max(work) + 1) * max(codes.shape[0] for codes, _ in work.values())
        self.costs.add_codec_call(span * self.codec.window_share(max(work) + 1), time.perf_counter() - started)
        for slot, waveform in audio.items():  # a listener that raises ends its own request only (_deliver)
            self._emit(self._running[slot], waveform, is_pause=False)

    def _frames_to_decode(self, stream: _RequestState, now: float, rows: int) -> int:
        """How many pending frames the stream's policy wants decoded now (0: none yet; a finished chunk: all)."""
        if stream.chunk_done:
            return len(stream.pending)
        slack = stream.lead(self.codec.rate, now) if stream.first_emit_time is not None else None
        return self.policy.frames_wanted(len(stream.pending), slack, self.costs, rows, self.codec.hop / self.codec.rate)

    def _emit(self, stream: _RequestState, waveform: torch.Tensor, is_pause: bool) -> bool:
        """Deliver audio; False when the request's listener raised (the request has then ended)."""
        if stream.first_emit_time is None:
            stream.first_emit_time = time.perf_counter()
        stream.emitted_samples += waveform.shape[-1]
        return self._deliver(stream, AudioEvent(waveform, self.codec.rate, stream.chunk, is_pause))

    def _deliver(self, stream: _RequestState, event) -> bool:
        """Give `event` to the request's queue or listener. A listener that raises ends its own request only (with
        LISTENER_FAILED; a final event is only logged): the other requests of the tick keep their events and frames.
        Returns whether the event was delivered."""
        try:
            stream.handle.deliver(event)
            return True
        except Exception:  # the caller's code: whatever it raises concerns its request only
            logger.exception("the event listener of request %d raised on a %s; ending that request",
                             stream.handle.id, type(event).__name__)
        if not isinstance(event, FINAL_EVENTS):
            self._end(stream, ErrorEvent("the request's event listener raised", code=LISTENER_FAILED))
        return False

    def _close_finished(self) -> None:
        """Streams whose chunk is over and fully decoded: pause, then the next chunk (next tick), or finish."""
        for stream in list(self._running.values()):
            if not stream.chunk_done or stream.pending or stream.prime is not None:
                continue
            self._close_chunk(stream)

    def _close_chunk(self, stream: _RequestState) -> None:
        request, index = stream.request, stream.chunk
        frames = torch.stack(stream.chunk_codes).to("cpu") if stream.chunk_codes else \
            torch.zeros(0, self.n_vq, dtype=torch.long)
        stream.codes.append(frames)
        stream.truncated.append(frames.shape[0] >= stream.settings.max_new_frames)
        stream.stops.append(stream.guard.stops.get(0) if stream.guard is not None else None)
        if stream.stops[-1] is not None:
            logger.warning("request %d: chunk %d ended early by a runaway guard (%s after %d frames)",
                           stream.handle.id, index, stream.stops[-1].reason, stream.stops[-1].frames)
        last = index == len(request.chunks) - 1
        if not last and self.codec is not None and request.decode_audio:
            pause = request.chunks[index].pause_seconds
            if not self._emit(stream, torch.zeros(self.codec.channels, round(pause * self.codec.rate)), is_pause=True):
                return
            self.codec.reset(stream.slot)
        if last:
            seconds = stream.emitted_samples / self.codec.rate if self.codec is not None else 0.0
            self._end(stream, FinishedEvent(stream.codes, stream.truncated, stream.seed, seconds, stream.stops))
            return
        stream.chunk += 1
        stream.chunk_done = False
        stream.needs_prefill = True

    def _end(self, stream: _RequestState, event) -> None:
        """The request leaves: its group (if running) and slot are freed, its final event delivered."""
        if stream.group is not None and stream.group in self.decoder.groups:
            self.decoder.finish(stream.group)
        stream.group = None
        if self._running.get(stream.slot) is stream:
            del self._running[stream.slot]
            if self.codec is not None:  # a forgotten history shortens the codec ring prefix the others attend
                self.codec.reset(stream.slot)
        self._deliver(stream, event)

    # ------------------------------------------------------------------------------------------------------------
    # Background thread

    def start(self) -> None:
        """Run ticks on a daemon thread until `stop` (idle waits cost nothing)."""
        if self.running:
            return
        self._stopping = False
        self._served.clear()
        self._thread = threading.Thread(target=self.serve, name="speech-engine", daemon=True)
        self._thread.start()

    def serve(self) -> None:
        """Run ticks in the calling thread until another thread calls `stop` (what `start` runs on its thread).

        On CPU the thread matters: torch's OpenMP runs slower from a thread while another thread that ran parallel
        work (the one that loaded the model, a worker that encoded a clip) is still alive; a thread that has ended
        costs nothing. Measured on a 2-core AMD EPYC, int8, one stream: 33 ms per frame when the loading thread runs
        the engine itself, 57 ms from a second thread; the server's one-client real-time factor went from 1.41 to
        0.82 once no such thread stayed alive. So bench.py runs the engine with `serve` in the thread that built the
        model, and the server loads the model on the thread that then serves it and encodes clips on threads that
        end with the work (server/app.py).
        """
        self._served.clear()
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._running:
                        self._wake.wait()
                    if self._stopping and not self._running and not self._waiting:
                        return
                try:
                    self.step()
                except Exception:  # never let the engine's thread die: log and keep serving
                    logger.exception("engine tick failed")
        finally:
            self._served.set()

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> bool:
        """End `serve` (and `start`'s thread): with `drain`, after the running and waiting requests finish (or
        `timeout`); without, cancel first every request submitted before this call (requests submitted later, e.g.
        after a new `start`, are served as usual). Returns whether it ended."""
        with self._wake:
            self._stopping = True
            if not drain:
                self._cancel_below = next(self._ids)
            self._wake.notify()
        ended = self._served.wait(timeout)
        if ended and self._thread is not None:
            self._thread.join()
            self._thread = None
        return ended


def auto_slot_count(model, max_positions: int) -> int:
    """Slots whose global KV caches fit in SLOT_MEMORY_FRACTION of the device's free memory (1..MAX_AUTO_SLOTS)."""
    gpt2 = model.config.gpt2_config
    weight = model.transformer.ln_f.weight
    per_slot = 2 * gpt2.n_layer * gpt2.n_embd * max_positions * weight.element_size()
    free = free_memory_bytes(weight.device)
    if free is None:
        return 8
    return max(1, min(MAX_AUTO_SLOTS, int(SLOT_MEMORY_FRACTION * free // per_slot)))


__all__ = [
    "AudioEvent",
    "CANCELLED",
    "CODEC_FAILED",
    "ChunkPrompt",
    "CodesEvent",
    "DECODE_STEP_FAILED",
    "ERROR_CODES",
    "ErrorEvent",
    "FinishedEvent",
    "INTERNAL_ERROR",
    "LISTENER_FAILED",
    "NON_FINITE_LOGITS",
    "PREFILL_FAILED",
    "QueueFullError",
    "RequestError",
    "RequestHandle",
    "SpeechEngine",
    "EngineRequest",
    "StreamDecodePolicy",
    "DEADLINE_POLICY",
    "DeadlinePolicy",
    "WAIT_REASONS",
    "EVERY_FRAME_STREAM_POLICY",
    "UPSTREAM_CUDA_STREAM_POLICY",
    "UPSTREAM_STREAM_POLICY",
    "auto_slot_count",
    "stream_lead_seconds",
]
