"""Command line: text (+ a voice prompt) to a 48 kHz stereo wav with MOSS-TTS-Nano, on NPU, CUDA or CPU.

    python infer_npu.py --download-only                       # fetch the pinned weights and preset voices (once)
    python infer_npu.py --text "Hello." --output-path out.wav    # default voice; or --voice nova, --prompt-audio-path
    python infer_npu.py --text-file book.txt --output-path book.wav --stream        # or: --jsonl requests.jsonl
    python infer_npu.py --device cpu --weight-format int8 --prompt-audio-path my_voice.wav --text "Hello."

Generation defaults are the values upstream's infer.py actually applies (spec tts.md §6.4, right column): sampling on,
text temperature 1.0, audio temperature 0.8, audio top-p 0.95, audio repetition penalty 1.2, at most 375 frames
(30 s) per chunk, voice-clone chunks of 75 text tokens.

--weight-format (weight_formats.py) is a load-time choice printed in the summary line with the kernels it runs: auto
keeps the --dtype, in float32 as fp32 (the faster of two float32 kernels on this CPU, greedy codes still upstream's),
plain keeps torch's own Linear (upstream's exact arithmetic), bf16 / fp16 halve the weights, int8 (CPU only) quarters
them.

--jsonl FILE: one {"text", "output_path", "prompt_audio_path"?, "prompt_text"?} object per line (the last two default
to the flags; synthesis_request.read_jsonl). Every line is checked before anything is synthesised; the model,
tokenizer, codec and each distinct prompt's codes are loaded once for the whole file.

Exit codes: 0 success; 2 a user error (bad argument, input file or text; an output location that cannot be written;
unknown device, dtype or weight format, or one the device cannot run; missing or corrupt model files, with
instructions), always reported before the model loads where the argument alone tells; 1 a runtime failure
(generation, decoding or writing failed; --download-only could not fetch the files); 130 interrupted (Ctrl-C,
SIGINT); 143 terminated (SIGTERM, as sent by `timeout`, docker and systemd). No output file is left behind on failure
or interruption: files are written to a temporary name and renamed when complete, so with --jsonl the finished files
stay and unfinished ones never appear.
Error messages name this script's flags.

The script passes device strings to devices.py and never names a device type itself.
"""

if __name__ == "__main__" and not __package__:
    # Run as a script: import this file as part of the repository package so that its relative imports work.
    from local_package import import_module

    raise SystemExit(import_module("infer_npu").main())

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from . import devices, synthesis, weight_formats, weights
from .onnx_graph import phases_of
from .settings.command_line import (EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, EXIT_TERMINATED, EXIT_USER, UsageError,
                                    in_flag_terms)
from .settings.generation_flags import add_generation_arguments
from .settings import model_flags
from .settings.model_flags import add_model_arguments, load_model_of_flags, model_folder
from .prompting import GENERATION_MODES
from .synthesis_request import GENERATION_ARGUMENTS, Job, read_jsonl
from .voice_library.presets import DEFAULT_VOICE, fetch_presets, preset_clip
from .settings.text_flags import add_text_arguments, chunk_preview, request_options

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = "outputs/output.wav"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that partial outputs are cleaned up on the way out."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would sys.exit(2); main() returns the code instead
        raise UsageError(f"{self.prog}: {message}")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" only where the help does not state the default itself and X means something."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (help strings state the values actually applied)."""
    parser = _Parser(description="MOSS-TTS-Nano text-to-speech on Ascend NPU, CUDA or CPU.",
                     formatter_class=_HelpFormatter)
    _add_io_arguments(parser)
    _add_runtime_arguments(parser)
    add_generation_arguments(parser)
    add_text_arguments(parser)
    return parser


def _add_io_arguments(parser) -> None:
    group = parser.add_argument_group("input and output")
    text = group.add_mutually_exclusive_group()
    text.add_argument("--text", help="text to speak")
    text.add_argument("--text-file", help="UTF-8 text file to speak (long texts are chunked in voice_clone mode)")
    text.add_argument("--jsonl", help='JSON lines {"text", "output_path", optional "prompt_audio_path", '
                                      '"prompt_text"}: one output file per line')
    group.add_argument("--prompt-audio-path", help="voice prompt (wav/flac/ogg/mp3, any rate and channel count)")
    group.add_argument("--voice", default=DEFAULT_VOICE, help="without --prompt-audio-path: a preset or OpenAI voice")
    group.add_argument("--prompt-text", default=None, help="transcript of the prompt audio (continuation mode only)")
    group.add_argument("--mode", choices=GENERATION_MODES, default="voice_clone", help="generation mode")
    group.add_argument("--output-path", default=DEFAULT_OUTPUT, help="output .wav/.flac (48 kHz stereo)")
    group.add_argument("--stream", action="store_true",
                       help="stream: write audio as it is produced and report the time to first audio")


def _add_runtime_arguments(parser) -> None:
    group = parser.add_argument_group("model and device")
    add_model_arguments(group)
    group.add_argument("--download-only", action="store_true",
                       help="download the pinned, sha256-checked weights into the model folder and exit")
    group.add_argument("--download-source", choices=weights.SOURCES, default="auto",
                       help="where --download-only fetches from (auto: Hugging Face, then ModelScope)")
    group.add_argument("--seed", type=int, default=None, help="random seed (None: not seeded)")
    group.add_argument("--verbose", action="store_true", help="log INFO messages")


# ----------------------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        _say_error(error)
        return EXIT_USER
    except SystemExit as exit_request:  # --help
        return int(exit_request.code or 0)
    _configure_output(args.verbose, args.no_progress)
    with _sigterm_raises_terminated():
        return _run(args, parser)


def _run(args, parser) -> int:
    """The job, with every failure turned into a message and an exit code."""
    try:
        return _download(args) if args.download_only else _synthesise(args)
    except Terminated:
        _say_error("interrupted (SIGTERM); unfinished output files were removed")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _say_error("interrupted; unfinished output files were removed")
        return EXIT_INTERRUPTED
    except UsageError as error:
        _say_error(error)
        return EXIT_USER
    except weights.WeightsUnavailableError as error:  # --download-only: the network failed, not the user
        _say_error(in_flag_terms(str(error), parser))
        return EXIT_RUNTIME if args.download_only else EXIT_USER
    except ValueError as error:  # ChecksumError is a ValueError
        _say_error(in_flag_terms(str(error), parser))
        return EXIT_USER
    except (RuntimeError, OSError) as error:
        _say_error(f"{type(error).__name__}: {in_flag_terms(str(error), parser)}")
        return EXIT_RUNTIME


@contextlib.contextmanager
def _sigterm_raises_terminated():
    """While the job runs, SIGTERM raises Terminated in the main thread (later ones are ignored during cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say_error(error) -> None:
    sys.stderr.write(f"error: {error}\n")


def _configure_output(verbose: bool, no_progress: bool) -> None:
    """Log level, and progress output: off everywhere with --no-progress, else progress lines shown."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if no_progress:
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()  # transformers' "Loading weights" bars
        huggingface_hub.utils.disable_progress_bars()  # download bars of --download-only
    else:
        synthesis.progress_logger.setLevel(logging.INFO)


def _download(args) -> int:
    folder = model_folder(args)
    files = weights.ensure_model_files(target_dir=folder, source=args.download_source, progress=not args.no_progress,
                                       pins=model_flags.PINS)
    for name, path in files.paths.items():
        print(f"ok {name}: {path}")
    for name, outcome in fetch_presets(folder, download=args.download_source != "local").items():
        print(f"{'ok' if outcome.startswith('ok') else 'warning'} preset voice {name}: {outcome}")
    print(f"model folder ready: {files.root}")
    return EXIT_OK


def _jobs(args) -> list:
    """The output files to make, every input checked before any synthesis."""
    if args.mode == "voice_clone" and args.prompt_audio_path is None:  # speak in --voice (voice_library/presets.py)
        voice, args.prompt_audio_path = preset_clip(model_folder(args), args.voice)
        print(f"voice: {voice} ({args.prompt_audio_path})", flush=True)
    if args.jsonl:
        try:
            return read_jsonl(args.jsonl, args.prompt_audio_path, args.prompt_text)
        except ValueError as error:  # in the file's terms: its keys are not this script's flags
            raise UsageError(f"--jsonl: {error}") from None
    if args.text_file:
        text = _read_text_file(args.text_file)
    elif args.text is not None:
        text = args.text
    else:
        raise UsageError("no text given; expected --text, --text-file or --jsonl")
    return [Job(text, args.output_path, args.prompt_audio_path, args.prompt_text)]


def _read_text_file(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read --text-file {path}: {error}; expected a UTF-8 text file") from error


def _request(args, job: Job) -> synthesis.SynthesisRequest:
    """The checked request of one output file (the flags carry `inference`'s parameter names)."""
    settings = {name: getattr(args, name) for name in (*GENERATION_ARGUMENTS, "voice_clone_max_text_tokens",
                                                        "voice_clone_max_memory_per_sample_gb", "tts_max_batch_size",
                                                        "codec_max_batch_size")}
    return synthesis.build_request(
        text=job.text, output_audio_path=job.output_path, mode=args.mode, prompt_text=job.prompt_text,
        prompt_audio_path=job.prompt_audio_path, reference_audio_path=None, text_tokenizer=None,
        text_tokenizer_path=None, audio_tokenizer=None, audio_tokenizer_type=None,
        audio_tokenizer_pretrained_name_or_path=None, device=None, progress=False if args.no_progress else None,
        **request_options(args), **settings,
    )


def _synthesise(args) -> int:
    jobs = _jobs(args)
    requests = [_request(args, job) for job in jobs]  # every request checked before the model loads
    if args.print_voice_clone_text_chunks or args.dry_run:
        print("\n".join(chunk_preview(synthesis.folder_text_tokenizer(model_folder(args)), requests)), flush=True)
        if args.dry_run:
            return EXIT_OK
    model, device, dtype, attention = load_model_of_flags(args)
    weight_format, phases = weight_formats.weight_format_of(model), phases_of(model)
    phase = f"{phases} " if phases else ""  # int8 only
    print(f"device={device} dtype={devices.dtype_name(dtype)} attention={attention} weights={weight_format} "
          f"kernels={weight_formats.linear_kernel_of(model)} {phase}model={model_folder(args)}", flush=True)
    hint = weight_formats.faster_format_hint(device, weight_format)
    if hint is not None:
        print(f"hint: {hint}", flush=True)
    if args.seed is not None:
        devices.manual_seed(device, args.seed)
    started = time.perf_counter()
    if args.stream:
        results = [_stream_one(model, device, request) for request in requests]
    else:
        results = _synthesise_offline(model, device, requests)
    if len(results) > 1:
        total = sum(results)
        elapsed = time.perf_counter() - started
        print(f"total: {len(results)} files, {total:.2f} s of audio in {elapsed:.2f} s "
              f"(RTF {elapsed / max(total, 1e-9):.3f})", flush=True)
    return EXIT_OK


def _synthesise_offline(model, device, requests) -> list:
    """Every request, batched together; one summary line per file with the time since the previous file was done
    (so a file's RTF is its own, not the run's so far). Returns the audio seconds of each file."""
    results, previous = [], time.perf_counter()
    for result in synthesis.iter_inference_many(model, requests):
        devices.synchronize(device)
        now = time.perf_counter()
        _print_summary(result, now - previous)
        results.append(_seconds(result))
        previous = now
    return results


def _seconds(result: dict) -> float:
    """Audio seconds of a result (kept instead of the waveform, so a long --jsonl run holds no audio)."""
    return result["waveform"].shape[-1] / result["sample_rate"]


def _stream_one(model, device, request) -> float:
    """Stream one request to its file; print its summary with the time to first audio."""
    started = time.perf_counter()
    first_audio, result = None, None
    for event in synthesis.run_inference_stream(model, request, synthesis.UPSTREAM_STREAM_POLICY):
        if event["type"] == "audio" and first_audio is None:
            first_audio = time.perf_counter() - started
        result = event
    devices.synchronize(device)
    _print_summary(result, time.perf_counter() - started, first_audio)
    return _seconds(result)


def _print_summary(result: dict, elapsed: float, first_audio: Optional[float] = None) -> None:
    """One line per output file: path, audio seconds, wall seconds, RTF (wall / audio), chunks, first audio."""
    seconds = _seconds(result)
    line = (f"wrote {result['audio_path']}: {seconds:.2f} s of audio in {elapsed:.2f} s "
            f"(RTF {elapsed / max(seconds, 1e-9):.3f}), {len(result['voice_clone_text_chunks'])} chunk(s)")
    if first_audio is not None:
        line += f", first audio after {first_audio:.3f} s"
    print(line, flush=True)


__all__ = ["Job", "add_model_arguments", "build_parser", "main",
           "read_jsonl"]
