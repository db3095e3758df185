"""Command line: the OpenAI-compatible speech server (server/app.py) with uvicorn, on NPU, CUDA or CPU.

    python serve.py --model-path . --device auto --host 127.0.0.1 --port 8000
    python serve.py --model-path . --device cpu --weight-format int8 --threads 2 --api-key "$KEY"

The model flags are infer_npu.py's (settings/model_flags.py: device, dtype, weight format, attention, verification),
and a request's generation defaults are what infer_npu.py applies without flags (settings/generation_flags.py); settings are checked by the same rules
(synthesis_request.check_generation_settings). The engine decodes --num-slots streams together (default: sized from
free memory); up to --max-queue more wait for a slot, and beyond that requests get 429 at once, before any work. A
request that waits longer than --queue-timeout for a slot gets 503 with Retry-After. A request that may make more
than --max-audio-seconds of audio or more than --max-chunks voice-clone chunks is refused with 400 before any work.
The API key comes from --api-key or the environment variable MOSS_TTS_API_KEY.
Voices: uploads (--voices-dir), the model folder's preset voices (preset_voices/, fetched by infer_npu.py
--download-only) and OpenAI's voice names mapped onto them (voice_library/presets.py); --default-voice speaks when a request
names no voice and for OpenAI names whose preset is not installed. --wyoming-port PORT also serves the Wyoming protocol
(Home Assistant) on the same engine (server/wyoming.py).

Before the port is bound, the model flags and the model folder's pinned files are checked as infer_npu.py checks
them: a bad flag, a missing or corrupt file prints one `error:` message and exits with 2.

SIGTERM or Ctrl-C (SIGINT): the server stops accepting connections and lets running streams finish for up to
--grace-seconds; then it cancels what is left (a streamed audio body ends early, an SSE stream ends with an `error`
event) and exits with 0. A second Ctrl-C exits at once. Exit codes: 0 after a stop, 1 when loading the model failed
after the port was bound, 2 bad flags or model files.
"""

if __name__ == "__main__" and not __package__:
    # Run as a script: import this file as part of the repository package so that its relative imports work.
    from local_package import import_module

    raise SystemExit(import_module("serve").main())

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch
import uvicorn

from . import synthesis, weights
from .engine import (DEADLINE_POLICY, EVERY_FRAME_STREAM_POLICY, UPSTREAM_CUDA_STREAM_POLICY, UPSTREAM_STREAM_POLICY,
                     SpeechEngine)
from .settings.command_line import EXIT_USER, UsageError, in_flag_terms
from .settings.generation_flags import generation_defaults
from .settings.model_flags import add_model_arguments, check_model_of_flags, load_model_of_flags, model_folder
from .server.app import DEFAULT_PREPARE_WORKERS, DEFAULT_STALL_SECONDS, create_app
from .server.service import (DEFAULT_MAX_AUDIO_SECONDS, DEFAULT_MAX_CHUNKS, DEFAULT_MAX_INPUT_CHARS, ServiceOptions,
                             SpeechService)
from .voice_library.presets import DEFAULT_VOICE, preset_folder
from .voice_library.store import VoiceStore, check_voice_name

logger = logging.getLogger(__name__)

API_KEY_ENV = "MOSS_TTS_API_KEY"
EXIT_OK, EXIT_LOAD_FAILED, EXIT_USER = 0, 1, EXIT_USER
# uvicorn's own grace runs this much longer than --grace-seconds, so that the server's cancellation (which ends every
# stream with its last event) comes first and uvicorn never has to cancel a response task.
CANCEL_MARGIN_SECONDS = 5.0
# --stream-policy choices (engine.py); "throughput" is the larger budget upstream applies on its accelerator.
STREAM_POLICIES = {"deadline": DEADLINE_POLICY, "upstream": UPSTREAM_STREAM_POLICY,
                   "throughput": UPSTREAM_CUDA_STREAM_POLICY, "every-frame": EVERY_FRAME_STREAM_POLICY}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MOSS-TTS-Nano speech server (OpenAI speech API).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser.add_argument_group("model and device (as infer_npu.py)"))
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=int, default=8000, help="port to listen on")
    server.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}; unset: "
                             "no key)")
    server.add_argument("--served-model-name", default="moss-tts-nano-100m",
                        help="the model id of /v1/models (OpenAI's tts-1, tts-1-hd and gpt-4o-mini-tts also work)")
    server.add_argument("--voices-dir", default="voices", help="folder of voice clips and their cached codes")
    server.add_argument("--default-voice", default=DEFAULT_VOICE,
                        help="voice used when a request names none, and for OpenAI voice names whose preset is not "
                             "installed (an uploaded voice or a preset)")
    server.add_argument("--wyoming-port", type=int, default=None,
                        help="also serve the Wyoming protocol (Home Assistant) on this port, same host and engine")
    server.add_argument("--max-input-chars", type=int, default=DEFAULT_MAX_INPUT_CHARS,
                        help="longest accepted `input`")
    server.add_argument("--grace-seconds", type=float, default=30.0,
                        help="on SIGTERM or Ctrl-C, how long running streams may take to finish")
    server.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS,
                        help="the most audio a request may ask for (chunks x max_new_frames + pauses); more is a 400")
    server.add_argument("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS,
                        help="the most voice-clone chunks of a request (each prefills the reference); more is a 400")
    server.add_argument("--queue-timeout", type=float, default=60.0,
                        help="seconds a request may wait for a slot before it gets 503 with Retry-After (0: no limit)")
    server.add_argument("--prepare-workers", type=int, default=DEFAULT_PREPARE_WORKERS,
                        help="requests prepared at once (tokenize, chunk, encode ref_audio)")
    server.add_argument("--engine-stall-seconds", type=float, default=DEFAULT_STALL_SECONDS,
                        help="/health fails when the engine has work and no tick ended for this long")
    server.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    server.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    engine = parser.add_argument_group("engine")
    engine.add_argument("--num-slots", type=int, default=0,
                        help="streams decoded together (0: as many as half the free memory holds, at most 64)")
    engine.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot")
    engine.add_argument("--max-positions", type=int, default=1024,
                        help="positions per slot: reference + chunk text rows + max_new_frames")
    engine.add_argument("--step-mode", default="eager", choices=("eager", "compile", "graph"),
                        help="decode step: eager, torch.compile or device graphs")
    engine.add_argument("--stream-policy", default="deadline", choices=tuple(STREAM_POLICIES),
                        help="frames per codec call: deadline (as many as each stream's playback slack allows, up "
                             "to 8; engine_schedule.py), upstream (1/2/4/8 by lead, first audio soonest), throughput "
                             "(4..12 by lead, upstream's accelerator budget), every-frame (1 per call: the same "
                             "samples for a request whatever the load)")
    return parser


def load_service(args) -> SpeechService:
    """Model, tokenizer, codec, engine (not started) and voices, as the flags say."""
    model, device, dtype, attention = load_model_of_flags(args)
    tokenizer = synthesis.load_text_tokenizer(model)
    codec = synthesis.load_audio_tokenizer(model, device=device)
    engine = SpeechEngine(model, codec, num_slots=args.num_slots or None, max_positions=args.max_positions,
                          max_queue=args.max_queue, attn_implementation=attention, step_mode=args.step_mode,
                          policy=STREAM_POLICIES[args.stream_policy])
    voices = VoiceStore(Path(args.voices_dir), codec, model.config)
    presets_folder = preset_folder(model_folder(args))
    presets = (VoiceStore(presets_folder, codec, model.config, codec_id=voices.codec_id, cache_folder=voices.folder
                          / ".presets") if presets_folder.is_dir() else None)
    options = ServiceOptions(defaults=generation_defaults(), model_name=args.served_model_name,
                             max_input_chars=args.max_input_chars, max_audio_seconds=args.max_audio_seconds,
                             max_chunks=args.max_chunks, queue_timeout=args.queue_timeout or None,
                             default_voice=args.default_voice)
    logger.info("loaded: device=%s dtype=%s attention=%s weights=%s slots=%d voices=%s", device,
                str(dtype).removeprefix("torch."), attention, args.weight_format, engine.num_slots, voices.folder)
    return SpeechService(model, tokenizer, engine, voices, options, presets=presets)


def check_server_flags(args) -> None:
    """The server's own numbers, before anything loads.

    Raises:
        UsageError: naming the flag.
    """
    limits = (("--max-audio-seconds", args.max_audio_seconds, 1), ("--max-chunks", args.max_chunks, 1),
              ("--queue-timeout", args.queue_timeout, 0), ("--prepare-workers", args.prepare_workers, 1),
              ("--engine-stall-seconds", args.engine_stall_seconds, 1), ("--grace-seconds", args.grace_seconds, 0))
    for flag, value, minimum in limits:
        if not value >= minimum:
            raise UsageError(f"{flag} {value}; expected a number >= {minimum}")


def build_app(args, on_load_failure=None):
    """The app for parsed flags (tests run it in-process with uvicorn)."""
    return create_app(lambda: load_service(args), api_key=args.api_key, on_load_failure=on_load_failure,
                      prepare_workers=args.prepare_workers, stall_seconds=args.engine_stall_seconds)


def uvicorn_config(app, args) -> uvicorn.Config:
    return uvicorn.Config(app, host=args.host, port=args.port, log_config=None, log_level=args.log_level,
                          timeout_graceful_shutdown=args.grace_seconds + CANCEL_MARGIN_SECONDS, lifespan="on")


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, --grace-seconds after the first SIGTERM / SIGINT, cancels the speech requests still
    running (each stream then ends with its last event: an SSE `error` event, or the end of a cut audio body), before
    uvicorn's own grace ends and it would cancel the response tasks under them (a CancelledError traceback)."""

    def __init__(self, config: uvicorn.Config, app, grace_seconds: float) -> None:
        super().__init__(config)
        self.speech_app, self.grace_seconds = app, grace_seconds
        self._timer: Optional[threading.Timer] = None

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if self._timer is None:
            logger.info("stopping: running streams may finish for %g s (Ctrl-C again to exit now)",
                        self.grace_seconds)
            self._timer = threading.Timer(self.grace_seconds, self._cancel_streams)
            self._timer.daemon = True
            self._timer.start()

    def _cancel_streams(self) -> None:
        service = self.speech_app.state.speech.service
        if service is not None and service.engine.running:
            logger.info("grace period over: cancelling %d running and %d waiting requests", service.engine.active,
                        service.engine.waiting)
            service.engine.stop(drain=False, timeout=CANCEL_MARGIN_SECONDS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until SIGTERM / Ctrl-C; returns the exit code (module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_voice_name(args.default_voice)
    except ValueError as error:
        parser.error(f"--default-voice: {error}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = _check_before_serving(args, parser)
    if problem is not None:
        sys.stderr.write(f"error: {problem}\n")
        return EXIT_USER
    args.no_verify = True  # verified just now: loading does not hash the files again
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    failures = []
    server = None

    def stop_on_failure(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    app = build_app(args, stop_on_failure)
    server = DrainingServer(uvicorn_config(app, args), app, args.grace_seconds)
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        # uvicorn handles these while it serves, then raises the signal again with the handler it found: this one,
        # so that a drained server exits with 0 instead of dying of the signal (or a KeyboardInterrupt traceback).
        signal.signal(stop_signal, _after_shutdown)
    print(f"serving {args.served_model_name} on http://{args.host}:{args.port} (GET /health says when it is ready)",
          flush=True)
    if args.wyoming_port is None:
        server.run()
    else:
        from .server.wyoming import WyomingSpeech, serve_both

        speech = WyomingSpeech(server.config.app.state.speech)
        print(f"serving Wyoming on tcp://{args.host}:{args.wyoming_port}", flush=True)
        asyncio.run(serve_both(server, speech, args.host, args.wyoming_port))
    return EXIT_LOAD_FAILED if failures else EXIT_OK


def _check_before_serving(args, parser) -> Optional[str]:
    """The flags and the model folder's files, checked as infer_npu.py checks them; the message, or None."""
    try:
        check_server_flags(args)
        check_model_of_flags(args)
    except (ValueError, weights.WeightsUnavailableError) as error:  # UsageError and ChecksumError are ValueErrors
        return in_flag_terms(str(error), parser)
    return None


def _after_shutdown(signum, frame) -> None:
    logger.info("stopped by signal %d", signum)


__all__ = ["DrainingServer", "build_app", "build_parser", "check_server_flags", "load_service", "main",
           "uvicorn_config"]
