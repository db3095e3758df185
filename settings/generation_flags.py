"""The command line's generation flags and their defaults: the values upstream's infer.py actually applies.

infer_npu.py adds these flags; serve.py and the Ray app take `generation_defaults()` as the settings of a request
that sets none, so every door speaks with the same defaults and no server reads them from a script.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..generation import GenerationSettings


# What upstream's infer.py applies (spec tts.md §6.4, right column): the command line's defaults and the server's
# and the Ray app's settings of a request that sets none. The model methods keep their own defaults
# (GenerationSettings).
UPSTREAM_INFER_SETTINGS = GenerationSettings(nq=None, max_new_frames=375, do_sample=True, text_temperature=1.0,
                                             text_top_p=1.0, text_top_k=50, audio_temperature=0.8, audio_top_p=0.95,
                                             audio_top_k=25, audio_repetition_penalty=1.2)
UPSTREAM_VOICE_CLONE_MAX_TEXT_TOKENS = 75


def add_generation_arguments(parser) -> None:
    """The generation flags (infer_npu.py's, with upstream infer.py's values as defaults)."""
    settings = UPSTREAM_INFER_SETTINGS
    group = parser.add_argument_group("generation (defaults = what upstream infer.py applies)")
    group.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=settings.do_sample,
                       help="sample (--no-do-sample: greedy)")
    group.add_argument("--max-new-frames", type=int, default=settings.max_new_frames,
                       help="frames per chunk (12.5 per second)")
    group.add_argument("--text-temperature", type=float, default=settings.text_temperature,
                       help="temperature of the continue/stop choice")
    group.add_argument("--text-top-p", type=float, default=settings.text_top_p, help="top-p of the continue/stop choice")
    group.add_argument("--text-top-k", type=int, default=settings.text_top_k, help="top-k of the continue/stop choice")
    group.add_argument("--audio-temperature", type=float, default=settings.audio_temperature,
                       help="audio token temperature")
    group.add_argument("--audio-top-p", type=float, default=settings.audio_top_p, help="audio token top-p")
    group.add_argument("--audio-top-k", type=int, default=settings.audio_top_k, help="audio token top-k")
    group.add_argument("--audio-repetition-penalty", type=float, default=settings.audio_repetition_penalty,
                       help="audio repetition penalty")
    group.add_argument("--nq", type=int, default=settings.nq,
                       help="audio codebooks to generate, 1..16 (default all 16)")
    group.add_argument("--use-kv-cache", action=argparse.BooleanOptionalAction, default=True, help="KV cache")
    group.add_argument("--voice-clone-max-text-tokens", type=int, default=UPSTREAM_VOICE_CLONE_MAX_TEXT_TOKENS,
                       help="text tokens per chunk")
    group.add_argument("--voice-clone-max-memory-per-sample-gb", type=float, default=1.0,
                       help="device memory planned per chunk when batching chunks")
    group.add_argument("--tts-max-batch-size", type=int, default=0, help="cap on chunks per batch (0: none)")
    group.add_argument("--codec-max-batch-size", type=int, default=0, help="cap on chunks per codec call (0: none)")


def generation_defaults() -> dict:
    """What the command line applies when no generation flag is given: the GenerationSettings fields plus
    voice_clone_max_text_tokens."""
    return {**dataclasses.asdict(UPSTREAM_INFER_SETTINGS),
            "voice_clone_max_text_tokens": UPSTREAM_VOICE_CLONE_MAX_TEXT_TOKENS}


__all__ = ["UPSTREAM_INFER_SETTINGS", "UPSTREAM_VOICE_CLONE_MAX_TEXT_TOKENS", "add_generation_arguments",
           "generation_defaults"]
