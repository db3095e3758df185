"""Command line: the OpenAI-compatible speech server (speech_server.py) with uvicorn, on NPU, CUDA or CPU.

    python serve.py --model-path . --device auto --host 127.0.0.1 --port 8000
    python serve.py --model-path . --device cpu --weight-format int8 --threads 2 --api-key "$KEY"

The model flags are infer_npu.py's (device, dtype, weight format, attention, verification), and a request's
generation defaults are what infer_npu.py applies without flags. The engine decodes --num-slots streams together
(default: sized from free memory); up to --max-queue more wait for a slot, and beyond that requests get 429 at once.
The API key comes from --api-key or the environment variable MOSS_TTS_API_KEY.
Voices: uploads (--voices-dir), the model folder's preset voices (preset_voices/, fetched by infer_npu.py
--download-only) and OpenAI's voice names mapped onto them (voice_presets.py); --default-voice speaks when a request
names no voice and for OpenAI names whose preset is not installed. --wyoming-port PORT also serves the Wyoming protocol
(Home Assistant) on the same engine (wyoming_server.py).

SIGTERM or Ctrl-C: the server stops accepting connections, lets running streams finish for up to --grace-seconds,
then cancels what is left and exits. Exit codes: 0 after a normal stop, 1 when loading the model failed, 2 bad flags.
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
from pathlib import Path
from typing import Optional, Sequence

import torch
import uvicorn

from . import infer_npu, synthesis
from .engine import EVERY_FRAME_STREAM_POLICY, UPSTREAM_CUDA_STREAM_POLICY, UPSTREAM_STREAM_POLICY, SpeechEngine
from .speech_server import create_app
from .speech_service import DEFAULT_MAX_INPUT_CHARS, ServiceOptions, SpeechService
from .voice_presets import DEFAULT_VOICE, preset_folder
from .voices import VoiceStore, check_voice_name

logger = logging.getLogger(__name__)

API_KEY_ENV = "MOSS_TTS_API_KEY"
EXIT_OK, EXIT_LOAD_FAILED = 0, 1
# --stream-policy choices (engine.py); "throughput" is the larger budget upstream applies on its accelerator.
STREAM_POLICIES = {"upstream": UPSTREAM_STREAM_POLICY, "throughput": UPSTREAM_CUDA_STREAM_POLICY,
                   "every-frame": EVERY_FRAME_STREAM_POLICY}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MOSS-TTS-Nano speech server (OpenAI speech API).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    infer_npu.add_model_arguments(parser.add_argument_group("model and device (as infer_npu.py)"))
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
                        help="on SIGTERM, how long running streams may take to finish")
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
    engine.add_argument("--stream-policy", default="upstream", choices=tuple(STREAM_POLICIES),
                        help="frames per codec call: upstream (1/2/4/8 by lead, first audio soonest), throughput "
                             "(4..12 by lead, upstream's accelerator budget), every-frame (1 per call: the same "
                             "samples for a request whatever the load)")
    return parser


def load_service(args) -> SpeechService:
    """Model, tokenizer, codec, engine (not started) and voices, as the flags say."""
    model, device, dtype, attention = infer_npu.load_model(args)
    tokenizer = synthesis.load_text_tokenizer(model)
    codec = synthesis.load_audio_tokenizer(model, device=device)
    engine = SpeechEngine(model, codec, num_slots=args.num_slots or None, max_positions=args.max_positions,
                          max_queue=args.max_queue, attn_implementation=attention, step_mode=args.step_mode,
                          policy=STREAM_POLICIES[args.stream_policy])
    voices = VoiceStore(Path(args.voices_dir), codec, model.config)
    presets_folder = preset_folder(infer_npu._model_folder(args))
    presets = (VoiceStore(presets_folder, codec, model.config, codec_id=voices.codec_id, cache_folder=voices.folder
                          / ".presets") if presets_folder.is_dir() else None)
    options = ServiceOptions(defaults=infer_npu.generation_defaults(), model_name=args.served_model_name,
                             max_input_chars=args.max_input_chars, default_voice=args.default_voice)
    logger.info("loaded: device=%s dtype=%s attention=%s weights=%s slots=%d voices=%s", device,
                str(dtype).removeprefix("torch."), attention, args.weight_format, engine.num_slots, voices.folder)
    return SpeechService(model, tokenizer, engine, voices, options, presets=presets)


def build_app(args, on_load_failure=None):
    """The app for parsed flags (tests run it in-process with uvicorn)."""
    return create_app(lambda: load_service(args), api_key=args.api_key, on_load_failure=on_load_failure)


def uvicorn_config(app, args) -> uvicorn.Config:
    return uvicorn.Config(app, host=args.host, port=args.port, log_config=None, log_level=args.log_level,
                          timeout_graceful_shutdown=args.grace_seconds, lifespan="on")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until SIGTERM / Ctrl-C; returns the exit code (module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_voice_name(args.default_voice)
    except ValueError as error:
        parser.error(f"--default-voice: {error}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    failures = []
    server = None

    def stop_on_failure(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    server = uvicorn.Server(uvicorn_config(build_app(args, stop_on_failure), args))
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        # uvicorn handles these while it serves, then raises the signal again with the handler it found: this one,
        # so that a drained server exits with 0 instead of dying of the signal (or a KeyboardInterrupt traceback).
        signal.signal(stop_signal, _after_shutdown)
    print(f"serving {args.served_model_name} on http://{args.host}:{args.port} (GET /health says when it is ready)",
          flush=True)
    if args.wyoming_port is None:
        server.run()
    else:
        from .wyoming_server import WyomingSpeech, serve_both

        speech = WyomingSpeech(server.config.app.state.speech)
        print(f"serving Wyoming on tcp://{args.host}:{args.wyoming_port}", flush=True)
        asyncio.run(serve_both(server, speech, args.host, args.wyoming_port))
    return EXIT_LOAD_FAILED if failures else EXIT_OK


def _after_shutdown(signum, frame) -> None:
    logger.info("stopped by signal %d", signum)


__all__ = ["build_app", "build_parser", "load_service", "main", "uvicorn_config"]
