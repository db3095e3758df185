"""Command line: the OpenAI-compatible speech server (server/app.py) with uvicorn, on NPU, CUDA or CPU.

    python serve.py --model-path . --device auto --host 127.0.0.1 --port 8000
    python serve.py --model-path . --device cpu --weight-format int8 --threads 2 --api-key "$KEY"

The flags live in settings/server_flags.py (the Ray app reads the same ones): the model flags are infer_npu.py's
(settings/model_flags.py), and a request's generation defaults are what infer_npu.py applies without flags
(settings/generation_flags.py); settings are checked by the same rules
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

import asyncio
import logging
import signal
import sys
import threading
from typing import Optional, Sequence

import torch
import uvicorn

from . import weights
from .settings.command_line import EXIT_USER, in_flag_terms
from .settings.model_flags import check_model_of_flags
from .settings.server_flags import build_parser, check_server_flags, load_service
from .server.app import create_app
from .voice_library.store import check_voice_name

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_LOAD_FAILED, EXIT_USER = 0, 1, EXIT_USER
# uvicorn's own grace runs this much longer than --grace-seconds, so that the server's cancellation (which ends every
# stream with its last event) comes first and uvicorn never has to cancel a response task.
CANCEL_MARGIN_SECONDS = 5.0


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
