"""The command line's generation flags and their defaults: the values upstream's infer.py actually applies.

infer_npu.py adds these flags; serve.py and the Ray app take `generation_defaults()` as the settings of a request
that sets none, so every door speaks with the same defaults and no server reads them from a script.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..generation import GenerationSettings


def add_generation_arguments(parser) -> None:
    """The generation flags (infer_npu.py's, with upstream infer.py's values as defaults)."""
    group = parser.add_argument_group("generation (defaults = what upstream infer.py applies)")
    group.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=True,
                       help="sample (--no-do-sample: greedy)")
    group.add_argument("--max-new-frames", type=int, default=375, help="frames per chunk (12.5 per second)")
    group.add_argument("--text-temperature", type=float, default=1.0, help="temperature of the continue/stop choice")
    group.add_argument("--text-top-p", type=float, default=1.0, help="top-p of the continue/stop choice")
    group.add_argument("--text-top-k", type=int, default=50, help="top-k of the continue/stop choice")
    group.add_argument("--audio-temperature", type=float, default=0.8, help="audio token temperature")
    group.add_argument("--audio-top-p", type=float, default=0.95, help="audio token top-p")
    group.add_argument("--audio-top-k", type=int, default=25, help="audio token top-k")
    group.add_argument("--audio-repetition-penalty", type=float, default=1.2, help="audio repetition penalty")
    group.add_argument("--nq", type=int, default=None, help="audio codebooks to generate, 1..16 (default all 16)")
    group.add_argument("--use-kv-cache", action=argparse.BooleanOptionalAction, default=True, help="KV cache")
    group.add_argument("--voice-clone-max-text-tokens", type=int, default=75, help="text tokens per chunk")
    group.add_argument("--voice-clone-max-memory-per-sample-gb", type=float, default=1.0,
                       help="device memory planned per chunk when batching chunks")
    group.add_argument("--tts-max-batch-size", type=int, default=0, help="cap on chunks per batch (0: none)")
    group.add_argument("--codec-max-batch-size", type=int, default=0, help="cap on chunks per codec call (0: none)")


def generation_defaults() -> dict:
    """What the command line applies when no generation flag is given: the GenerationSettings fields plus
    voice_clone_max_text_tokens."""
    parser = argparse.ArgumentParser(add_help=False)
    add_generation_arguments(parser)
    names = [field.name for field in dataclasses.fields(GenerationSettings)] + ["voice_clone_max_text_tokens"]
    return {name: parser.get_default(name) for name in names}


__all__ = ["add_generation_arguments", "generation_defaults"]
