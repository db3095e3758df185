"""The speech server's flags (serve.py's command line, and the Ray app's config `args`), and the service they
describe: model, tokenizer, codec, engine and voices. serve.py and serve_ray.py both read this module."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .. import synthesis, weight_formats
from ..engine import SpeechEngine
from ..engine_schedule import STREAM_POLICIES
from ..onnx_graph import phases_of
from ..prefix_store import DEFAULT_BUDGET_BYTES
from ..server.app import DEFAULT_PREPARE_WORKERS, DEFAULT_STALL_SECONDS
from ..server.service import (DEFAULT_MAX_AUDIO_SECONDS, DEFAULT_MAX_CHUNKS, DEFAULT_MAX_INPUT_CHARS, ServiceOptions,
                              SpeechService)
from ..voice_library.presets import DEFAULT_VOICE, preset_folder
from ..voice_library.store import VoiceStore
from .command_line import UsageError
from .generation_flags import generation_defaults
from .model_flags import add_model_arguments, load_model_of_flags, model_folder

logger = logging.getLogger(__name__)

API_KEY_ENV = "MOSS_TTS_API_KEY"
# --prefill-chunk-rows: a 64-row chunk of the released model took 74 ms in int8 on a 2-vCPU AMD EPYC (a 10 s voice's
# 196 rows: 4 chunks); a text chunk after a stored voice is one chunk, so only a voice's first use is spread out.
DEFAULT_PREFILL_CHUNK_ROWS = 64


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
                        help="the most voice-clone chunks of a request (each is a prompt of its own); more is a 400")
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
    engine.add_argument("--voice-cache-mb", type=float, default=DEFAULT_BUDGET_BYTES / 2**20,
                        help="keep the keys and values of each voice's shared prompt rows (template and reference) "
                             "in this many MiB, so that the next chunk or request in that voice prefills only its "
                             "text (prefix_store.py); 0: prefill every prompt whole, as the CLI does")
    engine.add_argument("--prefill-chunk-rows", type=int, default=DEFAULT_PREFILL_CHUNK_ROWS,
                        help="prefill prompts in chunks of this many rows, one chunk per tick while streams play, so "
                             "that a new voice's long prompt does not stall the streams already playing; 0: each "
                             "prompt (its voice, then its text) in one call, as the CLI does")
    return parser


def load_service(args) -> SpeechService:
    """Model, tokenizer, codec, engine (not started) and voices, as the flags say."""
    model, device, dtype, attention = load_model_of_flags(args)
    tokenizer = synthesis.load_text_tokenizer(model)
    codec = synthesis.load_audio_tokenizer(model, device=device)
    engine = SpeechEngine(model, codec, num_slots=args.num_slots or None, max_positions=args.max_positions,
                          max_queue=args.max_queue, attn_implementation=attention, step_mode=args.step_mode,
                          policy=STREAM_POLICIES[args.stream_policy],
                          prefix_store_bytes=int(args.voice_cache_mb * 2**20) if args.voice_cache_mb > 0 else None,
                          prefill_chunk_rows=args.prefill_chunk_rows or None)
    voices = VoiceStore(Path(args.voices_dir), codec, model.config)
    presets_folder = preset_folder(model_folder(args))
    presets = (VoiceStore(presets_folder, codec, model.config, codec_id=voices.codec_id, cache_folder=voices.folder
                          / ".presets") if presets_folder.is_dir() else None)
    options = ServiceOptions(defaults=generation_defaults(), model_name=args.served_model_name,
                             max_input_chars=args.max_input_chars, max_audio_seconds=args.max_audio_seconds,
                             max_chunks=args.max_chunks, queue_timeout=args.queue_timeout or None,
                             default_voice=args.default_voice)
    applied, phases = weight_formats.weight_format_of(model), phases_of(model)
    kernels = weight_formats.linear_kernel_of(model) + (f" {phases}" if phases else "")
    logger.info("loaded: device=%s dtype=%s attention=%s weights=%s kernels=%s slots=%d voices=%s", device,
                str(dtype).removeprefix("torch."), attention, applied, kernels, engine.num_slots, voices.folder)
    hint = weight_formats.faster_format_hint(device, applied)
    if hint is not None:
        logger.info("hint: %s", hint)
    return SpeechService(model, tokenizer, engine, voices, options, presets=presets)


def check_server_flags(args) -> None:
    """The server's own numbers, before anything loads.

    Raises:
        UsageError: naming the flag.
    """
    limits = (("--max-audio-seconds", args.max_audio_seconds, 1), ("--max-chunks", args.max_chunks, 1),
              ("--queue-timeout", args.queue_timeout, 0), ("--prepare-workers", args.prepare_workers, 1),
              ("--engine-stall-seconds", args.engine_stall_seconds, 1), ("--grace-seconds", args.grace_seconds, 0),
              ("--voice-cache-mb", args.voice_cache_mb, 0), ("--prefill-chunk-rows", args.prefill_chunk_rows, 0))
    for flag, value, minimum in limits:
        if not value >= minimum:
            raise UsageError(f"{flag} {value}; expected a number >= {minimum}")


__all__ = ["API_KEY_ENV", "build_parser", "check_server_flags", "load_service"]
