"""The speech server's Prometheus metrics (prometheus_client), one registry per app.

    moss_tts_requests_total{route, status}              HTTP responses by route and status code
    moss_tts_speech_ended_total{outcome}                speech requests by how they ended: finished, error,
                                                        disconnected (the client left; its request was cancelled),
                                                        queue_timeout (no slot within --queue-timeout: 503)
    moss_tts_speech_errors_total{code}                  requests the engine ended with an error, by the stable
                                                        code also sent in the error JSON (engine_error_code)
    moss_tts_runaway_chunks_total{reason}               chunks a runaway guard ended early (frame_cap, loop, silence)
    moss_tts_time_to_first_audio_seconds                request arrival to its first audio chunk
    moss_tts_real_time_factor_ratio                     wall seconds per second of audio, of finished requests
    moss_tts_audio_seconds_total                        seconds of audio produced (before any speed change)
    moss_tts_active_streams / moss_tts_queued_requests  requests in a slot / waiting for one (read at scrape time)
    moss_tts_queued_requests_by_reason{reason}          waiting requests by why they wait (engine_schedule.py:
                                                        no_free_slot, prefill_budget, keeping_streams_ahead,
                                                        protecting_slack)
    moss_tts_slots, moss_tts_slot_occupancy_ratio       engine slots, and active streams / slots
    moss_tts_voice_prefix_lookups{result}               prompts whose voice rows came from the prefix store (hit) or
                                                        were prefilled and stored (miss); with --voice-cache-mb > 0
    moss_tts_voice_prefix_bytes                         what the prefix store holds (prefix_store.py)
    process_*                                           prometheus_client's process metrics (resident memory, CPU
                                                        seconds, open files; Linux), read by loadtest.py --soak
"""

from __future__ import annotations

import time
from typing import Optional

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

from ..engine import ErrorEvent

# Routes counted under their own label; any other path is "other" (bounded label values).
ROUTES = ("/v1/audio/speech", "/v1/audio/voices", "/v1/models", "/health", "/metrics")
VOICE_ROUTE = "/v1/audio/voices/{voice_id}"
TTFA_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/v1/audio/voices/"):
        return VOICE_ROUTE
    return "other"


class ServerMetrics:
    """The metrics of one app (module docstring); `bind_engine` adds the gauges read from the engine."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, open fds (Linux)
        self.requests = Counter("moss_tts_requests", "HTTP responses by route and status code", ["route", "status"],
                                registry=registry)
        self.ended = Counter("moss_tts_speech_ended", "Speech requests by how they ended", ["outcome"],
                             registry=registry)
        self.time_to_first_audio = Histogram("moss_tts_time_to_first_audio_seconds",
                                             "Seconds from request arrival to its first audio", buckets=TTFA_BUCKETS,
                                             registry=registry)
        self.real_time_factor = Histogram("moss_tts_real_time_factor_ratio",
                                          "Wall seconds per audio second of finished requests", buckets=RTF_BUCKETS,
                                          registry=registry)
        self.audio_seconds = Counter("moss_tts_audio_seconds", "Seconds of audio produced", registry=registry)
        self.errors = Counter("moss_tts_speech_errors", "Speech requests the engine ended with an error, by code",
                              ["code"], registry=registry)
        self.runaway_chunks = Counter("moss_tts_runaway_chunks", "Chunks ended early by a runaway guard, by reason",
                                      ["reason"], registry=registry)

    def bind_engine(self, engine) -> None:
        """Gauges read from `engine` at scrape time."""
        registry = self.registry
        Gauge("moss_tts_active_streams", "Requests holding a slot", registry=registry).set_function(
            lambda: engine.active)
        Gauge("moss_tts_queued_requests", "Requests waiting for a slot", registry=registry).set_function(
            lambda: engine.waiting)
        by_reason = Gauge("moss_tts_queued_requests_by_reason", "Requests waiting for a slot, by why they wait",
                          ["reason"], registry=registry)
        for reason in engine.waiting_by_reason():
            by_reason.labels(reason=reason).set_function(lambda reason=reason: engine.waiting_by_reason()[reason])
        Gauge("moss_tts_slots", "Engine slots (streams decoded together)", registry=registry).set(engine.num_slots)
        if engine.prefixes is not None:
            self._bind_prefix_store(engine.prefixes)
        Gauge("moss_tts_slot_occupancy_ratio", "Active streams / slots", registry=registry).set_function(
            lambda: engine.active / engine.num_slots)

    def _bind_prefix_store(self, store) -> None:
        lookups = Gauge("moss_tts_voice_prefix_lookups", "Prompts whose voice rows were found in the prefix store "
                        "(hit) or prefilled and stored (miss), since start", ["result"], registry=self.registry)
        lookups.labels(result="hit").set_function(lambda: store.hits)
        lookups.labels(result="miss").set_function(lambda: store.misses)
        Gauge("moss_tts_voice_prefix_bytes", "Bytes of keys and values held by the voice prefix store",
              registry=self.registry).set_function(lambda: store.nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> "RequestTracker":
        return RequestTracker(self)


def engine_error_code(event) -> str:
    """The stable code of an engine ErrorEvent (OpenAI's error `code`, and the label of moss_tts_speech_errors_total):
    one of engine.ERROR_CODES."""
    return event.code


def counting_errors(listener, metrics: ServerMetrics):
    """`listener` that first counts a failed request's ErrorEvent by its code (called on the engine thread)."""
    def deliver(event) -> None:
        if isinstance(event, ErrorEvent) and not event.cancelled:
            metrics.errors.labels(engine_error_code(event)).inc()
        listener(event)
    return deliver


class RequestTracker:
    """One speech request's timings, recorded into the metrics once: first audio, then how it ended."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.started = time.perf_counter()
        self.first_audio: Optional[float] = None
        self.outcome: Optional[str] = None

    def audio(self, is_pause: bool) -> None:
        if self.first_audio is None and not is_pause:
            self.first_audio = time.perf_counter() - self.started
            self.metrics.time_to_first_audio.observe(self.first_audio)

    def finished(self, audio_seconds: float, stops=()) -> None:
        """A finished request: its audio seconds, RTF, and the chunks a runaway guard ended (GuardStop or None)."""
        self.metrics.audio_seconds.inc(audio_seconds)
        for stop in stops:
            if stop is not None:
                self.metrics.runaway_chunks.labels(stop.reason).inc()
        if audio_seconds > 0:
            self.metrics.real_time_factor.observe((time.perf_counter() - self.started) / audio_seconds)
        self.end("finished")

    def end(self, outcome: str) -> None:
        """Count the request once, under its first outcome."""
        if self.outcome is None:
            self.outcome = outcome
            self.metrics.ended.labels(outcome).inc()


__all__ = ["RequestTracker", "ServerMetrics", "counting_errors", "engine_error_code", "route_label"]
