"""The text pipeline on the command line: its flags, what they mean for a request, the chunk preview, captions files.

infer_npu.py adds these flags with `add_text_arguments` (upstream's names where upstream has them):

    --no-normalize                     speak the text exactly as given (both stages off)
    --enable-normalize-tts-text {0,1}  the LLM-markup cleanup (upstream's flag; default 1)
    --enable-wetext-processing {0,1}   numbers, dates, currencies, units as words (upstream's flag; default 1)
    --language CODE                    the text's language (default: detected from the text)
    --print-voice-clone-text-chunks    print the chunks as they will be spoken (upstream's flag)
    --dry-run                          print the chunks (as the flag above does), then exit before the model loads
    --captions FILE.vtt                write per-chunk WebVTT captions of the audio
    --no-runaway-guards                let a chunk run to --max-new-frames (default: runaway_guards.py ends it)

The library side is text_normalization.py (the pipeline) and captions.py (the timestamps).
"""

from __future__ import annotations

import argparse

from ..synthesis_inputs import text_chunks
from ..text_language import LANGUAGES
from ..text_normalization import TextOptions


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the module docstring, in their own group."""
    group = parser.add_argument_group("text (what is spoken) and runaway guards")
    group.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                       help="clean up markdown/emoji and say numbers, dates, currencies and units as words in the "
                            "text's language (--no-normalize: the text exactly as given)")
    group.add_argument("--enable-normalize-tts-text", type=int, choices=(0, 1), default=1, nargs="?", const=1,
                       help="the cleanup stage of --normalize (upstream's flag)")
    group.add_argument("--enable-wetext-processing", type=int, choices=(0, 1), default=1, nargs="?", const=1,
                       help="the numbers-as-words stage of --normalize (upstream's flag)")
    group.add_argument("--language", default=None, metavar="CODE",
                       help=f"the text's language, one of {', '.join(LANGUAGES)} (default: detected)")
    group.add_argument("--print-voice-clone-text-chunks", action="store_true",
                       help="print each text chunk as it will be spoken")
    group.add_argument("--dry-run", action="store_true",
                       help="print the chunks and exit without loading the model or generating")
    group.add_argument("--captions", default=None, metavar="FILE.vtt",
                       help="write WebVTT captions (one cue per chunk) of the audio")
    group.add_argument("--runaway-guards", action=argparse.BooleanOptionalAction, default=True,
                       help="end a chunk that runs far past its text's length, loops or stays silent, with a warning "
                            "(runaway_guards.py; --no-runaway-guards: only --max-new-frames ends it)")


def text_options(args) -> TextOptions:
    """The TextOptions of the flags (both stages off with --no-normalize).

    Raises:
        ValueError: --captions with --jsonl (one captions file cannot serve many outputs).
    """
    if args.captions and args.jsonl:
        raise ValueError("--captions names one file; it cannot be used with --jsonl")
    return TextOptions(cleanup=bool(args.normalize and args.enable_normalize_tts_text),
                       verbalize=bool(args.normalize and args.enable_wetext_processing), language=args.language)


def request_options(args) -> dict:
    """The build_request arguments of these flags: normalize, captions, runaway_guards."""
    return {"normalize": text_options(args), "captions": args.captions or False,
            "runaway_guards": args.runaway_guards}


def chunk_preview(tokenizer, requests) -> list[str]:
    """The --print-voice-clone-text-chunks lines: each request's chunks as they will be spoken."""
    lines = []
    for request in requests:
        chunks = text_chunks(tokenizer, request.text, request.mode, request.prompt_text,
                             request.voice_clone_max_text_tokens)
        lines += [f"{request.output_audio_path}: chunk {index + 1}/{len(chunks)}: {chunk}"
                  for index, chunk in enumerate(chunks)]
    return lines


__all__ = ["add_text_arguments", "chunk_preview", "request_options", "text_options"]
