"""One `inference` / `inference_stream` call: its arguments, checked before anything loads, and what it reports.

`build_request` turns upstream's keyword arguments into a `SynthesisRequest` and raises a ValueError naming the value
for every mistake it can see without the model: empty text, an unknown mode, a prompt the mode forbids or lacks, a
generation setting out of range, a missing prompt file, an output path that cannot be written. While a request runs,
`ChunkProgress` shows its chunks and `warn_if_truncated` says which chunks hit max_new_frames; at the end
`result_dict` builds upstream's return dictionary (spec tts.md §7). `read_jsonl` reads many requests' texts and output
files from a JSON-lines file (`infer_npu.py --jsonl`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .audio_io import WRITE_FORMATS
from .captions import check_captions_target
from .generation import GenerationSettings
from .prompting import check_mode
from .sampling import SettingError, validate_sampling_args
from .text_language import check_language
from .text_normalization import TextOptions, normalize_text

logger = logging.getLogger(__name__)
# Chunk progress without a terminal; the command line shows its INFO lines unless --no-progress. Its name is
# "<package>.synthesis.progress", the pipeline's public name, whichever module logs to it.
progress_logger = logging.getLogger(f"{__name__.rpartition('.')[0]}.synthesis.progress")

# Chunks quoted in the one truncation warning of a request (the rest are counted).
TRUNCATION_PREVIEWS = 3
# Without a terminal, chunk progress is a log line (progress_logger, INFO) at most this often, and at the end.
PROGRESS_LOG_SECONDS = 10.0
# The keyword arguments of `inference` that go to `model.generate` (SynthesisRequest.generation): the generation
# settings, plus upstream's use_kv_cache (accepted, always on).
GENERATION_ARGUMENTS = tuple(setting.name for setting in dataclasses.fields(GenerationSettings)) + ("use_kv_cache",)
# The keys of a line of a JSON-lines request file (read_jsonl).
JSONL_KEYS = {"text", "output_path", "prompt_audio_path", "prompt_text"}
# The smallest voice-clone chunk budget (text tokens) accepted above 0: every chunk prefills the whole reference clip
# again, so a budget of a token or two makes one chunk per word (4 KB of text became ~3,400 chunks, 37 s of engine
# time). 0 or less still means one chunk.
MIN_CHUNK_TEXT_TOKENS = 4


@dataclass
class SynthesisRequest:
    """The validated arguments of one `inference` / `inference_stream` call (upstream names).

    `generation` holds the generation keyword arguments: `inference` passes them to `model.generate`;
    `inference_stream` turns them (less use_kv_cache) into the engine's GenerationSettings.
    """

    text: str
    output_audio_path: Optional[str]
    mode: str = "continuation"
    prompt_text: Optional[str] = None
    prompt_audio_path: Optional[str] = None
    text_tokenizer: Any = None
    text_tokenizer_path: Optional[str] = None
    audio_tokenizer: Any = None
    audio_tokenizer_type: Optional[str] = None
    audio_tokenizer_pretrained_name_or_path: Optional[str] = None
    device: Any = None
    nq: Optional[int] = None
    generation: dict = field(default_factory=dict)
    voice_clone_max_text_tokens: int = 50
    voice_clone_max_memory_per_sample_gb: float = 1.0
    tts_max_batch_size: int = 0
    codec_max_batch_size: int = 0
    progress: Optional[bool] = None
    stream_policy: Any = None
    # Text normalization (text_normalization.py): off unless asked, so `inference` stays upstream's by default.
    normalize: Any = False
    language: Optional[str] = None
    captions: Any = False  # True, or a .vtt path (captions.check_captions_target)
    runaway_guards: bool = False  # end chunks that run away (runaway_guards.py); result["runaway_stops"]
    written_text: Optional[str] = None


def build_request(**arguments) -> SynthesisRequest:
    """Turn upstream's keyword arguments into a checked SynthesisRequest.

    Args:
        arguments: the parameters of `inference` (upstream names), including the generation settings (nq,
            max_new_frames, do_sample, text_/audio_ temperature/top_p/top_k, audio_repetition_penalty, use_kv_cache).

    Returns:
        The request; `reference_audio_path` is folded into `prompt_audio_path`.

    Raises:
        ValueError: empty text, unknown mode, a prompt that the mode forbids or lacks, a generation setting out of
            range, an output path that cannot be written or a bad batch/chunk setting.
    """
    reference = arguments.pop("reference_audio_path", None)
    generation = {name: arguments.pop(name) for name in GENERATION_ARGUMENTS}
    request = SynthesisRequest(generation=generation, nq=generation["nq"], **arguments)
    request.prompt_audio_path = _merge_prompt_path(request.prompt_audio_path, reference)
    _check_text_and_mode(request)
    _normalize_text(request)
    check_captions_target(request.captions)
    check_generation_settings(generation)
    _check_batching(request)
    if request.prompt_audio_path is not None and not Path(request.prompt_audio_path).is_file():
        raise ValueError(f"prompt audio file {str(request.prompt_audio_path)!r} does not exist or is not a file; "
                         "expected a wav/flac/ogg/mp3 recording")
    if request.output_audio_path is not None:
        check_output_path(request.output_audio_path)
    return request


def check_generation_settings(generation: dict, n_vq: Optional[int] = None) -> None:
    """The one set of rules for generation settings, used by `inference`, infer_npu.py, the engine's request building
    (synthesis_streaming.engine_request) and the server, before anything is loaded or queued.

    Stricter than upstream, which accepts top_p outside (0, 1] and top_k <= 0 as "no filter" and, for
    max_new_frames=0, generates nothing: each is a mistake here, named with the expected range.

    Args:
        generation: the settings by upstream name (GenerationSettings' fields; other keys are ignored).
        n_vq: the model's codebooks, when known: nq must then be at most n_vq.

    Raises:
        SettingError (a ValueError): its `name` is the setting at fault (the request field or flag of the same name);
            the message names its value and the expected range.
    """
    _require_int(generation, "max_new_frames", 1, "frames of 80 ms per chunk")
    if generation["nq"] is not None:
        _require_int(generation, "nq", 1, "audio codebooks to generate", n_vq)
    for prefix in ("text_", "audio_"):
        top_p = generation[f"{prefix}top_p"]
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise SettingError(f"{prefix}top_p", f"{prefix}top_p={top_p!r}; expected a number in (0, 1] (1 keeps "
                                                 "every token)")
        _require_int(generation, f"{prefix}top_k", 1, "most likely tokens kept; 1024 keeps every audio token")
    validate_sampling_args(generation["do_sample"], generation["text_temperature"], name="text_")
    validate_sampling_args(generation["do_sample"], generation["audio_temperature"],
                           generation["audio_repetition_penalty"], name="audio_")


def check_chunk_budget(value) -> None:
    """voice_clone_max_text_tokens: an integer, 0 or less (one chunk) or at least MIN_CHUNK_TEXT_TOKENS.

    Raises:
        SettingError: named "voice_clone_max_text_tokens".
    """
    name = "voice_clone_max_text_tokens"
    if isinstance(value, bool) or not isinstance(value, int) or 0 < value < MIN_CHUNK_TEXT_TOKENS:
        raise SettingError(name, f"{name}={value!r}; expected an integer >= {MIN_CHUNK_TEXT_TOKENS} (text tokens per "
                                 "voice-clone chunk; each chunk prefills the reference again), or 0 for one chunk")


def _require_int(generation: dict, name: str, minimum: int, meaning: str, maximum: Optional[int] = None) -> None:
    value = generation[name]
    too_big = maximum is not None and isinstance(value, int) and value > maximum
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_big:
        expected = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise SettingError(name, f"{name}={value!r}; expected an integer {expected} ({meaning})")


def _merge_prompt_path(prompt_audio_path, reference_audio_path):
    """prompt_audio_path, or the deprecated alias reference_audio_path (one log line)."""
    if reference_audio_path is None:
        return prompt_audio_path
    if prompt_audio_path is not None and str(prompt_audio_path) != str(reference_audio_path):
        raise ValueError(f"prompt_audio_path={prompt_audio_path!r} and reference_audio_path="
                         f"{reference_audio_path!r} differ; pass only prompt_audio_path")
    logger.warning("reference_audio_path is deprecated; use prompt_audio_path")
    return reference_audio_path


def check_text(text) -> None:
    """Raises ValueError unless `text` is a non-empty string."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text={text!r} is empty; expected a non-empty string to synthesise")


def _check_text_and_mode(request: SynthesisRequest) -> None:
    check_text(request.text)
    check_mode(request.mode)
    if request.mode == "voice_clone":
        if request.prompt_audio_path is None:
            raise ValueError("mode='voice_clone' needs prompt_audio_path (a recording of the voice to clone)")
        if request.prompt_text is not None:
            raise ValueError("mode='voice_clone' does not take prompt_text; use mode='continuation' to continue "
                             "a prompt with its transcript")
    elif (request.prompt_text is None) != (request.prompt_audio_path is None):
        raise ValueError("mode='continuation' takes prompt_text and prompt_audio_path together (the transcript "
                         "and its recording) or neither; use mode='voice_clone' for a voice prompt without text")


def _normalize_text(request: SynthesisRequest) -> None:
    """With `normalize` (True or a TextOptions), `text` becomes what will be spoken; `written_text` keeps the input.

    Raises:
        ValueError: a bad `normalize` / `language`, or a text with nothing speakable.
    """
    options = request.normalize
    if isinstance(options, bool):
        options = TextOptions(cleanup=options, verbalize=options)
    if not isinstance(options, TextOptions):
        raise ValueError(f"normalize={request.normalize!r}; expected True, False or a TextOptions")
    language = options.language if options.language is not None else request.language
    if language is not None:
        request.language = check_language(language)
    request.written_text = request.text
    if options.enabled:
        request.text = normalize_text(request.text, request.language, cleanup=options.cleanup,
                                      verbalize=options.verbalize).text


def _check_batching(request: SynthesisRequest) -> None:
    check_chunk_budget(request.voice_clone_max_text_tokens)
    for name in ("tts_max_batch_size", "codec_max_batch_size"):
        value = getattr(request, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r}; expected an integer (0 or less disables it)")
    if not isinstance(request.voice_clone_max_memory_per_sample_gb, (int, float)):
        raise ValueError(f"voice_clone_max_memory_per_sample_gb={request.voice_clone_max_memory_per_sample_gb!r}; "
                         "expected a number of GiB (0 or less means batch 1)")


def check_output_path(path) -> None:
    """Fail before any generation when the output file could not be written (by a trial file in its folder).

    Raises:
        ValueError: a suffix other than WRITE_FORMATS, a directory, a parent that is a file, or a folder that cannot
            be written (read-only, no permission), naming the user's path.
    """
    path = Path(path)
    if path.suffix.lower() not in WRITE_FORMATS:
        raise ValueError(f"output_audio_path {str(path)!r} must end in one of {tuple(WRITE_FORMATS)}")
    if path.is_dir():
        raise ValueError(f"output_audio_path {str(path)!r} is a directory; expected a file name")
    folder = _nearest_existing(path.absolute().parent)
    if not folder.is_dir():
        raise ValueError(f"output_audio_path {str(path)!r} cannot be written: {folder} is a file, not a folder")
    try:
        handle, trial = tempfile.mkstemp(dir=folder, prefix=".write-test-")
    except OSError as error:
        raise ValueError(f"output_audio_path {str(path)!r} cannot be written: folder {folder} is not writable "
                         f"({error.strerror})") from None
    os.close(handle)
    os.unlink(trial)


def _nearest_existing(folder: Path) -> Path:
    """`folder`, or its closest ancestor that exists (the output's missing folders are created when writing)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Many requests from a JSON-lines file (infer_npu.py --jsonl)


@dataclass
class Job:
    """One output file to synthesise: a line of a JSON-lines file, or a command line's one text."""

    text: str
    output_path: str
    prompt_audio_path: Optional[str]
    prompt_text: Optional[str]


def read_jsonl(path, default_prompt: Optional[str] = None, default_prompt_text: Optional[str] = None) -> list[Job]:
    """The jobs of a JSON-lines file: one {"text", "output_path", "prompt_audio_path"?, "prompt_text"?} object per
    line (blank lines skipped); the optional keys default to `default_prompt` / `default_prompt_text`.

    Raises:
        ValueError: naming the file and line of the first malformed line, a duplicated output_path or an empty file.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    jobs, outputs = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        job = _jsonl_job(line, f"{path}:{number}", default_prompt, default_prompt_text)
        if job.output_path in outputs:
            raise ValueError(f"{path}:{number}: output_path {job.output_path!r} is used by an earlier line")
        outputs.add(job.output_path)
        jobs.append(job)
    if not jobs:
        raise ValueError(f"{path} has no requests; expected one JSON object per line")
    return jobs


def _jsonl_job(line: str, where: str, default_prompt, default_prompt_text) -> Job:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - JSONL_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(JSONL_KEYS)}")
    for key in ("text", "output_path"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {record.get(key)!r}")
    for key in ("prompt_audio_path", "prompt_text"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {record[key]!r}")
    return Job(record["text"], record["output_path"], record.get("prompt_audio_path", default_prompt),
               record.get("prompt_text", default_prompt_text))


# ----------------------------------------------------------------------------------------------------------------
# While it runs, and its result


class ChunkProgress:
    """Progress over chunks: a tqdm bar on a terminal, else a `progress_logger` INFO line every PROGRESS_LOG_SECONDS
    and one at the end. `enabled` None = only when there are several chunks."""

    def __init__(self, total: int, enabled: Optional[bool], description: str):
        from tqdm.auto import tqdm

        show = enabled if enabled is not None else total > 1
        on_terminal = sys.stderr.isatty()
        self.total, self.done, self.description = total, 0, description
        self.started = self.logged = time.perf_counter()
        self.log = bool(show) and not on_terminal
        self.bar = tqdm(total=total, desc=description, unit="chunk", disable=not (show and on_terminal), leave=False)

    def __enter__(self) -> "ChunkProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.close()

    def update(self, count: int) -> None:
        self.done += count
        self.bar.update(count)
        now = time.perf_counter()
        if self.log and (now - self.logged >= PROGRESS_LOG_SECONDS or self.done == self.total):
            self.logged, elapsed = now, now - self.started
            left = elapsed / self.done * (self.total - self.done)
            progress_logger.info("%s: %d/%d chunks, %.0f s elapsed, about %.0f s left", self.description, self.done,
                                 self.total, elapsed, left)


def warn_if_truncated(codes_list: Sequence[torch.Tensor], chunks: Sequence[str], max_new_frames: int,
                      seconds_per_frame: float) -> None:
    """One WARNING for all chunks that hit max_new_frames before the model chose to end them (upstream is silent)."""
    cut = [chunk for codes, chunk in zip(codes_list, chunks) if max_new_frames > 0 and codes.shape[0] >= max_new_frames]
    if not cut:
        return
    shown = ", ".join(repr(_preview(chunk)) for chunk in cut[:TRUNCATION_PREVIEWS])
    more = f" and {len(cut) - TRUNCATION_PREVIEWS} more" if len(cut) > TRUNCATION_PREVIEWS else ""
    logger.warning(
        "%d of %d chunk(s) reached max_new_frames=%d (%.1f s) before the model ended them, so their ends may be cut "
        "off: %s%s. If speech was cut, raise max_new_frames (12.5 frames per second of audio). A tiny random "
        "repository of measurement/checkpoints.py never ends a chunk, so there this warning is expected.",
        len(cut), len(chunks), max_new_frames, max_new_frames * seconds_per_frame, shown, more,
    )


def _preview(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def result_dict(prepared, waveform, rate, codes_list, batch_sizes, audio_path) -> dict:
    """Upstream's return dictionary of a request (`prepared`: its synthesis_inputs.SynthesisInputs)."""
    frames = [codes for codes in codes_list if codes.shape[0] > 0]
    token_ids = torch.cat(frames, dim=0) if frames else torch.zeros(0, prepared.n_vq, dtype=torch.long)
    return {
        "audio_path": audio_path,
        "sample_rate": rate,
        "audio_token_ids": token_ids,
        "waveform": waveform,
        "reference_audio_token_ids": prepared.prompt_codes,
        "voice_clone_text_chunks": list(prepared.chunks),
        "voice_clone_chunk_batch_size": batch_sizes[0],
        "voice_clone_codec_batch_size": batch_sizes[1],
    }


def check_not_empty(waveform: torch.Tensor) -> None:
    """Raises RuntimeError for a waveform without samples (every chunk ended before its first frame)."""
    if waveform.shape[-1] == 0:
        raise RuntimeError("generation produced no audio: the model ended every chunk before its first frame "
                           "(try do_sample=True, another seed or another prompt audio)")
