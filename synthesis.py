"""Text (+ a voice prompt) to a 48 kHz stereo waveform: `inference` and `inference_stream` (spec tts.md §7).

`SynthesisMixin` gives `MossTTSNanoForCausalLM` upstream's two convenience methods with upstream's signatures and
return dictionaries. The model file stays free of audio I/O: this module loads the tokenizers, reads and encodes the
prompt audio through the codec, splits long voice-clone texts, batches the chunks, runs `model.generate` /
`model.generate_stream`, decodes the codes and writes the file (through `audio_io`).

The pipeline, for one call:

    validate -> model to device, eval -> text tokenizer (§7.5) -> codec (§7.4) -> prompt codes (trimmed to the codec's
    floor length) -> chunks (voice clone, §7.2) -> batches (§7.3) -> generate (+ the stability fallback, §7.1)
    -> decode (joined with pauses) -> save -> train mode restored

Choices that differ from upstream, none of which changes the generated tokens (spec §11):
* The text tokenizer is our SentencePiece class, loaded directly from the model folder; nothing is imported through
  transformers' dynamic-module machinery and `HF_MODULES_CACHE` is left alone (§11 item 12).
* The codec is our `MossAudioTokenizerModel`, loaded from the model folder's `audio_tokenizer/` subfolder (what
  `python infer_npu.py --download-only` creates), else from `audio_tokenizer_pretrained_name_or_path` when that is a
  local folder. Nothing is downloaded at inference time; a missing codec raises a ValueError that says how to get it.
  Any object with the upstream codec API may be passed as `audio_tokenizer=` instead.
* The stability fallback retries once in float32 with the device's best attention backend, logs a WARNING that says
  exactly what changed, and restores the model's dtype afterwards (upstream casts the model for good, §11 item 7).
  The attention override is a run-time argument of `generate`, so the config is never touched.
* Chunk batching asks the device for its free memory (`devices.chunk_batch_size`, NPU included; §11 item 6).
* A chunk that reaches `max_new_frames` before the model ends it is reported with a WARNING (upstream cuts silently).
* Continuation mode does not chunk, so its text is limited to CONTINUATION_MAX_TEXT_TOKENS tokens (a ValueError
  says to use voice_clone mode, which chunks any length). Upstream has no limit and would attempt the whole text.
* The streaming frame budget is a `StreamDecodePolicy` argument (upstream's runtime monkey-patches it on CUDA).
* `inference_stream` writes `output_audio_path` progressively (temporary file, renamed when complete).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from .audio_io import WRITE_FORMATS, ProgressiveWavWriter, load_audio, save_audio
from .devices import chunk_batch_size, resolve_attention, resolve_device
from .engine import (UPSTREAM_CUDA_STREAM_POLICY, UPSTREAM_STREAM_POLICY, ChunkPrompt, ErrorEvent, FinishedEvent,
                     SpeechEngine, SpeechRequest, StreamDecodePolicy, stream_lead_seconds)
from .generation import GenerationSettings
from .sampling import validate_sampling_args
from .text_chunking import (count_tokens, pause_samples, pause_seconds_after, split_text_into_chunks,
                            voice_clone_text_chunks)
from .weight_formats import dtype_change_unavailable_reason
from .weights import CODEC_REPO_ID, CODEC_SUBFOLDER, PINNED, describe_manual_download

logger = logging.getLogger(__name__)
# Chunk progress without a terminal; the command line shows its INFO lines unless --no-progress.
progress_logger = logging.getLogger(f"{__name__}.progress")

MODES = ("continuation", "voice_clone")
CODEC_TYPE = "moss-audio-tokenizer-nano"
TOKENIZER_FILE = "tokenizer.model"
# Training-layout tokenizer locations that upstream also recognises (spec §7.5).
TOKENIZER_FALLBACKS = ("hf_tokenizer", "sentencepiece/mossttsnano_spm_bpe.model")
# Messages that trigger the one float32 retry of `inference` (upstream `_is_generation_stability_error`, §7.1).
STABILITY_ERROR_MARKERS = (
    "Non-finite",
    "device-side assert triggered",
    "probability tensor contains either",
    "flash_attention_2 requires fp16/bf16 tensors",
)
# Continuation mode speaks the whole text in one generation of at most max_new_frames frames (24 s by default, at
# about 3 text tokens per second of speech). 2048 tokens is ~10 minutes of speech: anything longer cannot be spoken in
# one generation and would only cost a huge prefill, so it is refused with a pointer to voice_clone mode.
CONTINUATION_MAX_TEXT_TOKENS = 2048
# Codec frames per second of the released codec, for messages only (12.5 Hz).
DEFAULT_FRAME_RATE = 12.5
# Chunks quoted in the one truncation warning of a request (the rest are counted).
TRUNCATION_PREVIEWS = 3
# Without a terminal, chunk progress is a log line (progress_logger, INFO) at most this often, and at the end.
PROGRESS_LOG_SECONDS = 10.0


# ----------------------------------------------------------------------------------------------------------------
# Requests


@dataclass
class SynthesisRequest:
    """The validated arguments of one `inference` / `inference_stream` call (upstream names).

    `generation` holds the keyword arguments passed to `model.generate` / `model.generate_stream`.
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
    generation = {name: arguments.pop(name) for name in _GENERATION_ARGUMENTS}
    request = SynthesisRequest(generation=generation, nq=generation["nq"], **arguments)
    request.prompt_audio_path = _merge_prompt_path(request.prompt_audio_path, reference)
    _check_text_and_mode(request)
    check_generation_settings(generation)
    _check_batching(request)
    if request.prompt_audio_path is not None and not Path(request.prompt_audio_path).is_file():
        raise ValueError(f"prompt audio file {str(request.prompt_audio_path)!r} does not exist or is not a file; "
                         "expected a wav/flac/ogg/mp3 recording")
    if request.output_audio_path is not None:
        _check_output_path(request.output_audio_path)
    return request


_GENERATION_ARGUMENTS = (
    "nq", "max_new_frames", "do_sample", "text_temperature", "text_top_p", "text_top_k", "audio_temperature",
    "audio_top_p", "audio_top_k", "audio_repetition_penalty", "use_kv_cache",
)


def check_generation_settings(generation: dict) -> None:
    """Check the generation settings before anything is loaded (generate checks them only when it starts).

    Stricter than upstream, which accepts top_p outside (0, 1] and top_k <= 0 as "no filter" and, for
    max_new_frames=0, generates nothing: each is a mistake here, named with the expected range.

    Raises:
        ValueError: naming the setting, its value and the expected range.
    """
    _require_int(generation, "max_new_frames", 1, "frames of 80 ms per chunk")
    if generation["nq"] is not None:
        _require_int(generation, "nq", 1, "audio codebooks to generate")
    for prefix in ("text_", "audio_"):
        top_p = generation[f"{prefix}top_p"]
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"{prefix}top_p={top_p!r}; expected a number in (0, 1] (1 keeps every token)")
        _require_int(generation, f"{prefix}top_k", 1, "most likely tokens kept; 1024 keeps every audio token")
    validate_sampling_args(generation["do_sample"], generation["text_temperature"], name="text_")
    validate_sampling_args(generation["do_sample"], generation["audio_temperature"],
                           generation["audio_repetition_penalty"], name="audio_")


def _require_int(generation: dict, name: str, minimum: int, meaning: str) -> None:
    value = generation[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}; expected an integer >= {minimum} ({meaning})")


def _merge_prompt_path(prompt_audio_path, reference_audio_path):
    """prompt_audio_path, or the deprecated alias reference_audio_path (one log line)."""
    if reference_audio_path is None:
        return prompt_audio_path
    if prompt_audio_path is not None and str(prompt_audio_path) != str(reference_audio_path):
        raise ValueError(f"prompt_audio_path={prompt_audio_path!r} and reference_audio_path="
                         f"{reference_audio_path!r} differ; pass only prompt_audio_path")
    logger.warning("reference_audio_path is deprecated; use prompt_audio_path")
    return reference_audio_path


def _check_text_and_mode(request: SynthesisRequest) -> None:
    if not isinstance(request.text, str) or not request.text.strip():
        raise ValueError(f"text={request.text!r} is empty; expected a non-empty string to synthesise")
    if request.mode not in MODES:
        raise ValueError(f"mode={request.mode!r} is unknown; expected one of {MODES}")
    if request.mode == "voice_clone":
        if request.prompt_audio_path is None:
            raise ValueError("mode='voice_clone' needs prompt_audio_path (a recording of the voice to clone)")
        if request.prompt_text is not None:
            raise ValueError("mode='voice_clone' does not take prompt_text; use mode='continuation' to continue "
                             "a prompt with its transcript")
    elif (request.prompt_text is None) != (request.prompt_audio_path is None):
        raise ValueError("mode='continuation' takes prompt_text and prompt_audio_path together (the transcript "
                         "and its recording) or neither; use mode='voice_clone' for a voice prompt without text")


def _check_batching(request: SynthesisRequest) -> None:
    for name in ("voice_clone_max_text_tokens", "tts_max_batch_size", "codec_max_batch_size"):
        value = getattr(request, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r}; expected an integer (0 or less disables it)")
    if not isinstance(request.voice_clone_max_memory_per_sample_gb, (int, float)):
        raise ValueError(f"voice_clone_max_memory_per_sample_gb={request.voice_clone_max_memory_per_sample_gb!r}; "
                         "expected a number of GiB (0 or less means batch 1)")


def _check_output_path(path) -> None:
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
# Text tokenizer (spec §7.5)


def _synthesis_cache(model) -> dict:
    """Per-model cache of loaded tokenizers and codecs (a plain dict in the instance __dict__, not a submodule)."""
    return vars(model).setdefault("_synthesis_cache", {})


def default_model_folders(model, include_code_folder: bool = False) -> list[Path]:
    """Local folders the model may have been loaded from: config._name_or_path, model.name_or_path and, when asked
    (the tokenizer search, as upstream), this module's folder; in that order, without duplicates."""
    names = [getattr(model.config, "_name_or_path", None), getattr(model, "name_or_path", None)]
    if include_code_folder:
        names.append(Path(__file__).resolve().parent)
    folders = []
    for name in names:
        if name and Path(name).is_dir() and Path(name).resolve() not in folders:
            folders.append(Path(name).resolve())
    return folders


def load_text_tokenizer(model, text_tokenizer=None, text_tokenizer_path=None):
    """The text tokenizer: the given object, else the one at text_tokenizer_path, else the model folder's.

    Args:
        model: the TTS model (its folders are searched, see default_model_folders).
        text_tokenizer: an explicit tokenizer object; returned as is.
        text_tokenizer_path: a tokenizer.model file or a folder holding one.

    Returns:
        A tokenizer (cached per path on the model); pad falls back to eos when missing.

    Raises:
        ValueError: no tokenizer at the given path, or none in any default folder.
    """
    if text_tokenizer is not None:
        return text_tokenizer
    if text_tokenizer_path is not None:
        sources = [Path(text_tokenizer_path)]
    else:
        sources = default_model_folders(model, include_code_folder=True)
    cache = _synthesis_cache(model)
    for source in sources:
        key = ("text_tokenizer", str(source.resolve()))
        if key not in cache:
            tokenizer = _tokenizer_from(source)
            if tokenizer is None:
                continue
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            cache[key] = tokenizer
        return cache[key]
    searched = ", ".join(str(source) for source in sources) or "(no local model folder)"
    raise ValueError(f"no text tokenizer ({TOKENIZER_FILE}) found in {searched}; pass text_tokenizer_path=, or run "
                     "`python infer_npu.py --download-only` to fetch the model files")


def _tokenizer_from(source: Path):
    """Our SentencePiece tokenizer from a .model file or a folder (incl. training layouts), or None."""
    from .tokenization_moss_tts_nano import MossTTSNanoSentencePieceTokenizer

    if source.is_file() and source.suffix == ".model":
        return MossTTSNanoSentencePieceTokenizer(vocab_file=str(source))
    if not source.is_dir():
        return None
    if (source / TOKENIZER_FILE).is_file():
        try:  # reads tokenizer_config.json / special_tokens_map.json when present
            return MossTTSNanoSentencePieceTokenizer.from_pretrained(str(source), local_files_only=True)
        except (OSError, ValueError) as error:
            logger.info("loading the tokenizer folder %s failed (%s); using %s directly", source, error,
                        TOKENIZER_FILE)
            return MossTTSNanoSentencePieceTokenizer(vocab_file=str(source / TOKENIZER_FILE))
    for fallback in TOKENIZER_FALLBACKS:
        if (source / fallback).exists():
            return _tokenizer_from(source / fallback)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Codec (spec §7.4, codec.md §5)


@dataclass(frozen=True)
class CodecInfo:
    """What the pipeline reads from a codec object: sample rate (Hz), channel count, samples per frame."""

    sample_rate: int
    channels: int
    hop: int


def codec_info(codec, config) -> CodecInfo:
    """Sample rate, channels and frame hop of any codec with the upstream attributes (upstream's fallbacks)."""
    rate = getattr(codec, "sampling_rate", None) or getattr(codec, "sample_rate", None)
    rate = int(rate or getattr(config, "audio_tokenizer_sample_rate", 48000))
    channels = getattr(codec, "number_channels", None) or getattr(codec, "channels", None) or 1
    hop = getattr(codec, "downsample_rate", None)
    if hop is None:
        hop = round(rate / float(getattr(codec, "frame_rate", DEFAULT_FRAME_RATE)))
    return CodecInfo(rate, int(channels), int(hop))


def load_audio_tokenizer(model, audio_tokenizer=None, audio_tokenizer_type=None,
                         audio_tokenizer_pretrained_name_or_path=None, device=None):
    """The codec: the given object, else our MossAudioTokenizerModel from a local folder (never downloaded here).

    Folders tried: audio_tokenizer_pretrained_name_or_path when it is a local folder; the model folder's
    `audio_tokenizer/` subfolder; the config's audio_tokenizer_pretrained_name_or_path when it is a local folder.

    Args:
        model: the TTS model.
        audio_tokenizer: an object with the upstream codec API; returned (moved to device) as is.
        audio_tokenizer_type: None or "moss-audio-tokenizer-nano".
        audio_tokenizer_pretrained_name_or_path: a local codec folder (a Hub id other than the pinned codec's is
            refused: run `python infer_npu.py --download-only` or pass the object).
        device: where to put it.

    Returns:
        The codec in eval mode on `device` (cached per folder on the model).

    Raises:
        ValueError: unknown type, or no codec folder with config.json and weights (the message says how to get it).
    """
    if audio_tokenizer_type not in (None, CODEC_TYPE):
        raise ValueError(f"audio_tokenizer_type={audio_tokenizer_type!r}; expected {CODEC_TYPE!r}")
    if audio_tokenizer is None:
        folder = _codec_folder(model, audio_tokenizer_pretrained_name_or_path)
        cache = _synthesis_cache(model)
        key = ("audio_tokenizer", str(folder))
        if key not in cache:
            cache[key] = _load_codec_folder(folder)
        audio_tokenizer = cache[key]
    audio_tokenizer.eval()
    return audio_tokenizer.to(device) if device is not None and hasattr(audio_tokenizer, "to") else audio_tokenizer


def _codec_folder(model, requested) -> Path:
    """The first local codec folder among the candidates (see load_audio_tokenizer)."""
    if requested is not None and Path(requested).is_dir():
        return Path(requested).resolve()
    if requested is not None and str(requested) != CODEC_REPO_ID:
        raise ValueError(f"audio_tokenizer_pretrained_name_or_path={requested!r} is not a local folder; nothing is "
                         "downloaded at inference time: pass a folder holding the codec's config.json and "
                         "model.safetensors, or the codec object as audio_tokenizer=")
    candidates = [folder / CODEC_SUBFOLDER for folder in default_model_folders(model)]
    configured = getattr(model.config, "audio_tokenizer_pretrained_name_or_path", None)
    if configured and Path(configured).is_dir():
        candidates.append(Path(configured))
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    target = default_model_folders(model)[0] if default_model_folders(model) else Path.cwd()
    codec_pins = [pin for pin in PINNED if pin.target.startswith(f"{CODEC_SUBFOLDER}/")]
    raise ValueError(
        f"the audio tokenizer (codec) was not found in {', '.join(str(c) for c in candidates) or 'any folder'}. "
        "Run `python infer_npu.py --download-only` to fetch every model file (pinned, sha256-checked), or pass "
        "audio_tokenizer= / audio_tokenizer_pretrained_name_or_path=<local folder>.\n"
        + describe_manual_download(target, codec_pins)
    )


def _load_codec_folder(folder: Path):
    from .modeling_moss_audio_tokenizer import MossAudioTokenizerModel

    try:
        return MossAudioTokenizerModel.from_pretrained(str(folder), local_files_only=True)
    except OSError as error:
        codec_pins = [pin for pin in PINNED if pin.target.startswith(f"{CODEC_SUBFOLDER}/")]
        raise ValueError(f"could not load the audio tokenizer from {folder}: {error}\nRun `python infer_npu.py "
                         "--download-only`, or:\n" + describe_manual_download(folder.parent, codec_pins)) from error


def encode_prompt_audio(codec, info: CodecInfo, path, config, nq: int) -> torch.Tensor:
    """Prompt file -> codes [T, n_vq] long on the CPU, trimmed to the codec's (floor) length; channels >= nq = pad.

    Raises:
        ValueError: from audio_io for a missing/empty/silent/unreadable file, or a prompt shorter than one frame.
    """
    waveform = load_audio(path, target_rate=info.sample_rate, channels=info.channels)  # [C, N] float32
    device = _module_device(codec)
    output = codec.batch_encode([waveform.to(device) if device is not None else waveform], chunk_duration=None)
    codes = _field(output, "audio_codes", 0)  # [n_q, B, F]
    lengths = _field(output, "audio_codes_lengths", 1)
    length = int(lengths[0]) if lengths is not None else codes.shape[-1]
    if length < 1:
        raise ValueError(f"prompt audio {path} is shorter than one codec frame "
                         f"({info.hop / info.sample_rate * 1000:.0f} ms); expected a few seconds of speech")
    # Upstream keeps floor(N / hop) frames although the tensor holds ceil(N / hop) (spec §11 item 9, PRESERVE).
    frames = codes[:, 0, :length].transpose(0, 1).to("cpu", torch.long)  # [T, n_q]
    pad, n_vq = int(config.audio_pad_token_id), int(config.n_vq)
    prompt = torch.full((length, n_vq), pad, dtype=torch.long)
    width = min(n_vq, frames.shape[1])
    prompt[:, :width] = frames[:, :width]
    prompt[:, nq:] = pad
    return prompt


def _field(output, name: str, index: int):
    """output.name for ModelOutputs/objects, output[index] for tuples, None when absent."""
    if hasattr(output, name):
        return getattr(output, name)
    if isinstance(output, (tuple, list)) and len(output) > index:
        return output[index]
    return None


def _module_device(module) -> Optional[torch.device]:
    parameters = getattr(module, "parameters", None)
    if parameters is None:
        return None
    first = next(iter(parameters()), None)
    return None if first is None else first.device


def _as_codec_codes(codes: torch.Tensor, nq: int) -> torch.Tensor:
    """[F, n_vq] frames -> the codec's [nq, F] long."""
    return codes[:, :nq].transpose(0, 1).contiguous().long()


def decode_codes(codec, info: CodecInfo, codes_list: Sequence[torch.Tensor], nq: int) -> tuple[list, int]:
    """Offline decode of several code sequences in one batch_decode call.

    Args:
        codec: upstream codec API.
        info: codec_info(codec).
        codes_list: tensors [F_i, n_vq]; empty ones give empty waveforms without a codec call.
        nq: codebooks to use.

    Returns:
        (list of float32 CPU waveforms [C, N_i], sample rate of the output).
    """
    present = [index for index, codes in enumerate(codes_list) if codes.shape[0] > 0]
    waveforms = [torch.zeros(info.channels, 0) for _ in codes_list]
    rate = info.sample_rate
    if present:
        device = _module_device(codec)
        batch = [_as_codec_codes(codes_list[i], nq).to(device if device is not None else "cpu") for i in present]
        output = codec.batch_decode(batch, num_quantizers=nq, chunk_duration=None)
        rate = int(getattr(output, "sample_rate", None) or getattr(output, "sampling_rate", None) or rate)
        for row, index in enumerate(present):
            waveforms[index] = _decoded_row(output, row, codes_list[index].shape[0] * info.hop)
    return waveforms, rate


def _decoded_row(output, row: int, default_length: int) -> torch.Tensor:
    """Row `row` of a decoder output as float32 CPU [C, length]."""
    audio = _field(output, "audio", 0)
    lengths = _field(output, "audio_lengths", 1)
    length = int(lengths[row]) if lengths is not None else default_length
    return audio[row, :, :length].detach().to("cpu", torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Generation with the stability fallback (spec §7.1)


def is_stability_error(error: BaseException) -> bool:
    """Whether `error` is one of the numeric/backend failures that the float32 retry may cure."""
    return isinstance(error, (RuntimeError, ValueError)) and any(m in str(error) for m in STABILITY_ERROR_MARKERS)


def generate_codes(model, input_ids, attention_mask, generation: dict, fallback: bool = True) -> list:
    """Generate one batch and return each row's codes, trimmed of trailing pad frames (CPU [F_i, n_vq] long).

    With `fallback`, a stability error (STABILITY_ERROR_MARKERS) is retried once in float32 with the device's best
    attention backend; the model's dtype is restored afterwards.
    """
    try:
        output = model.generate(input_ids, attention_mask, **generation)
    except (RuntimeError, ValueError) as error:
        if not fallback or not is_stability_error(error):
            raise
        output = _retry_in_float32(model, input_ids, attention_mask, generation, error)
    pad = int(model.config.audio_pad_token_id)
    return [codes.to("cpu") for codes in model._trim_generated_audio_token_ids(output.audio_token_ids, pad)]


def _retry_in_float32(model, input_ids, attention_mask, generation: dict, error: BaseException):
    """The single retry of §7.1: float32 + the device's best backend, announced, then the dtype restored.

    A model in a converted weight format (oneDNN-packed bf16 or int8 layers) cannot be cast to float32 in place: the
    retry is refused with a RuntimeError that says so and how to get a float32 model.
    """
    original_dtype, device = model.dtype, model.device
    blocker = dtype_change_unavailable_reason(model)
    if blocker is not None:
        raise RuntimeError(
            f"Generation failed ({type(error).__name__}: {error}). The float32 retry cannot run: {blocker}. Load the "
            "model again without a weight format (fp32) to generate in float32."
        ) from error
    attention = resolve_attention(None, device, torch.float32)
    before = (model.config.attn_implementation, getattr(model.config, "local_attn_implementation", None))
    logger.warning(
        "Generation failed (%s: %s). Retrying this batch once with the model cast from %s to float32 and attention "
        "%r for both decoders (requested before: global %r, local %r). The model is cast back to %s afterwards.",
        type(error).__name__, error, original_dtype, attention, before[0], before[1], original_dtype,
    )
    try:
        model.to(torch.float32)
        return model.generate(input_ids, attention_mask, attn_implementation=attention, **generation)
    finally:
        model.to(original_dtype)


def _warn_if_truncated(codes_list: Sequence[torch.Tensor], chunks: Sequence[str], max_new_frames: int) -> None:
    """One WARNING for all chunks that hit max_new_frames before the model chose to end them (upstream is silent)."""
    cut = [chunk for codes, chunk in zip(codes_list, chunks) if max_new_frames > 0 and codes.shape[0] >= max_new_frames]
    if not cut:
        return
    shown = ", ".join(repr(_preview(chunk)) for chunk in cut[:TRUNCATION_PREVIEWS])
    more = f" and {len(cut) - TRUNCATION_PREVIEWS} more" if len(cut) > TRUNCATION_PREVIEWS else ""
    logger.warning(
        "%d of %d chunk(s) reached max_new_frames=%d (%.1f s) before the model ended them, so their ends may be cut "
        "off: %s%s. Raise max_new_frames, or use voice_clone mode with a smaller voice_clone_max_text_tokens.",
        len(cut), len(chunks), max_new_frames, max_new_frames / DEFAULT_FRAME_RATE, shown, more,
    )


def _preview(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# Chunks and batch sizes (spec §7.2, §7.3)


def text_chunks(tokenizer, text: str, mode: str, prompt_text: Optional[str] = None, max_tokens: int = 50
                ) -> list[str]:
    """The texts generated one by one: voice-clone chunks of at most `max_tokens` tokens (§7.2), or [text] in
    continuation (where prompt_text + text is checked against CONTINUATION_MAX_TEXT_TOKENS).

    Raises:
        ValueError: a continuation text over CONTINUATION_MAX_TEXT_TOKENS tokens.
    """
    if mode == "voice_clone":
        return voice_clone_text_chunks(tokenizer, text, max_tokens)
    spoken = (prompt_text or "") + text
    tokens = count_tokens(tokenizer, spoken)
    if tokens > CONTINUATION_MAX_TEXT_TOKENS:
        raise ValueError(
            f"text is {tokens} tokens ({len(spoken)} characters); continuation mode speaks the whole text in one "
            f"generation and accepts at most {CONTINUATION_MAX_TEXT_TOKENS} tokens. Use mode='voice_clone' with a "
            "prompt audio (it splits long text into chunks), or split the text yourself"
        )
    return [text]


def resolve_batch_sizes(device, num_chunks: int, request: SynthesisRequest, streaming: bool) -> tuple[int, int]:
    """(TTS batch, codec batch) for the chunks (spec §7.3), free memory from the device layer.

    TTS: devices.chunk_batch_size (1 on CPU, like upstream), capped by tts_max_batch_size (> 0), and when streaming
    by codec_max_batch_size (> 0). Codec: the TTS batch when streaming; otherwise 1 without a codec limit, else
    min(codec limit, TTS batch).
    """
    tts_batch = chunk_batch_size(device, num_chunks, float(request.voice_clone_max_memory_per_sample_gb))
    if request.tts_max_batch_size > 0:
        tts_batch = min(tts_batch, request.tts_max_batch_size)
    if streaming and request.codec_max_batch_size > 0:
        tts_batch = min(tts_batch, request.codec_max_batch_size)
    tts_batch = max(1, tts_batch)
    if streaming:
        return tts_batch, tts_batch
    if request.codec_max_batch_size > 0:
        return tts_batch, max(1, min(request.codec_max_batch_size, tts_batch))
    return tts_batch, 1


def build_rows(model, tokenizer, mode: str, chunk: str, prompt_codes, prompt_text: Optional[str] = None) -> tuple:
    """Prompt rows (ids [1, T, 17], mask [1, T]) of one chunk in `mode`."""
    if mode == "voice_clone":
        return model.build_inference_input_ids(chunk, tokenizer, mode="voice_clone",
                                               prompt_audio_codes=prompt_codes, device="cpu")
    return model.build_inference_input_ids(chunk, tokenizer, mode="continuation", prompt_text=prompt_text,
                                           prompt_audio_codes=prompt_codes, device="cpu")


def _batches(count: int, size: int) -> list[range]:
    return [range(start, min(count, start + size)) for start in range(0, count, size)]


class _ChunkProgress:
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

    def __enter__(self) -> "_ChunkProgress":
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


# ----------------------------------------------------------------------------------------------------------------
# Shared preparation


@dataclass
class _Prepared:
    """Everything one request needs, loaded before any generation."""

    device: torch.device
    tokenizer: Any
    codec: Any
    info: CodecInfo
    nq: int
    n_vq: int
    prompt_codes: Optional[torch.Tensor]
    chunks: list


def _prepare(model, request: SynthesisRequest, prompt_cache: Optional[dict] = None) -> _Prepared:
    """Model to device + eval, tokenizers, codec, prompt codes and chunks (spec §7 'Flow').

    `prompt_cache` ({(path, nq): codes}) lets several requests with the same prompt encode it once.
    """
    device = resolve_device(request.device) if request.device is not None else model.device
    nq = _check_nq(model, request.nq)
    model.to(device)
    model.eval()
    tokenizer = load_text_tokenizer(model, request.text_tokenizer, request.text_tokenizer_path)
    chunks = text_chunks(tokenizer, request.text, request.mode, request.prompt_text,
                         request.voice_clone_max_text_tokens)
    codec = load_audio_tokenizer(model, request.audio_tokenizer, request.audio_tokenizer_type,
                                 request.audio_tokenizer_pretrained_name_or_path, device)
    info = codec_info(codec, model.config)
    prompt_codes = None
    if request.prompt_audio_path is not None:
        key = (str(request.prompt_audio_path), nq, id(codec))
        cache = prompt_cache if prompt_cache is not None else {}
        if key not in cache:
            cache[key] = encode_prompt_audio(codec, info, request.prompt_audio_path, model.config, nq)
        prompt_codes = cache[key]
    return _Prepared(device, tokenizer, codec, info, nq, int(model.config.n_vq), prompt_codes, chunks)


def _check_nq(model, nq) -> int:
    n_vq = int(model.config.n_vq)
    if nq is None:
        return n_vq
    if isinstance(nq, bool) or not isinstance(nq, int) or not 1 <= nq <= n_vq:
        raise ValueError(f"nq={nq!r}; expected None or an integer in 1..{n_vq}")
    return nq


def _result(prepared, waveform, rate, codes_list, batch_sizes, audio_path) -> dict:
    """Upstream's return dictionary."""
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


def _check_not_empty(waveform: torch.Tensor) -> None:
    if waveform.shape[-1] == 0:
        raise RuntimeError("generation produced no audio: the model ended every chunk before its first frame "
                           "(try do_sample=True, another seed or another prompt audio)")


# ----------------------------------------------------------------------------------------------------------------
# Offline synthesis


def run_inference(model, request: SynthesisRequest) -> dict:
    """`inference`: synthesise the whole text, write `output_audio_path` (if not None), return upstream's dict.

    Raises:
        ValueError: bad inputs (see build_request, load_*, encode_prompt_audio).
        RuntimeError: generation failed even after the float32 retry, or produced no audio.
    """
    (result,) = list(iter_inference_many(model, [request]))
    return result


def iter_inference_many(model, requests: Sequence[SynthesisRequest]) -> Iterator[dict]:
    """Synthesise several requests with the chunks of all of them batched together (e.g. `infer_npu.py --jsonl`).

    Every request is prepared (tokenizer, codec, prompt codes, chunks) before anything is generated, so a bad input
    fails before any work. Batch sizes, progress and device come from the first request. Each request's file is
    written, and its result yielded, as soon as all of its chunks are generated.

    Args:
        model: the TTS model.
        requests: from build_request.

    Yields:
        The `inference` result dictionary of each request, in order.
    """
    was_training = model.training
    try:
        prompt_cache: dict = {}
        prepared = [_prepare(model, request, prompt_cache) for request in requests]
        items = [(index, chunk) for index, one in enumerate(prepared) for chunk in range(len(one.chunks))]
        batch_sizes = resolve_batch_sizes(prepared[0].device, len(items), requests[0], streaming=False)
        codes: list = [[None] * len(one.chunks) for one in prepared]
        finished = 0
        with _ChunkProgress(len(items), requests[0].progress, "synthesising") as bar:
            for batch in _batches(len(items), batch_sizes[0]):
                for (index, chunk), chunk_codes in zip([items[k] for k in batch],
                                                       _generate_items(model, requests, prepared, items, batch)):
                    codes[index][chunk] = chunk_codes
                bar.update(len(batch))
                while finished < len(requests) and all(c is not None for c in codes[finished]):
                    yield _finish(requests[finished], prepared[finished], codes[finished], batch_sizes)
                    finished += 1
    finally:
        model.train(was_training)


def _generate_items(model, requests, prepared, items, batch) -> list:
    """Codes [F_i, n_vq] of the (request, chunk) items in `batch`, generated together (left-padded)."""
    rows = []
    for index, chunk in (items[k] for k in batch):
        one = prepared[index]
        rows.append(build_rows(model, one.tokenizer, requests[index].mode, one.chunks[chunk], one.prompt_codes,
                               requests[index].prompt_text))
    ids, mask = model._left_pad_inference_batch([r[0] for r in rows], [r[1] for r in rows],
                                                device=prepared[0].device)
    return generate_codes(model, ids, mask, requests[0].generation, fallback=True)


def _finish(request, prepared: _Prepared, codes_list: list, batch_sizes) -> dict:
    """Decode, check, save and describe one request."""
    _warn_if_truncated(codes_list, prepared.chunks, int(request.generation["max_new_frames"]))
    waveform, rate = _decode_all(request, prepared, codes_list, batch_sizes[1])
    _check_not_empty(waveform)
    audio_path = None
    if request.output_audio_path is not None:
        audio_path = str(save_audio(request.output_audio_path, waveform, rate))
    return _result(prepared, waveform, rate, codes_list, batch_sizes, audio_path)


def _decode_all(request, prepared: _Prepared, codes_list: list, codec_batch: int) -> tuple[torch.Tensor, int]:
    """The waveform [C, N]: chunks decoded in codec batches and joined with pauses; or one decode (continuation
    prompts are decoded with the generated codes and their samples cut off, spec §5.3)."""
    codec, info, nq = prepared.codec, prepared.info, prepared.nq
    if len(codes_list) > 1:
        waveforms, rate = _decode_chunks(codec, info, codes_list, nq, codec_batch)
        return _join_with_pauses(waveforms, prepared.chunks, rate, info.channels), rate
    codes, cut = codes_list[0], 0
    if request.mode == "continuation" and prepared.prompt_codes is not None and codes.shape[0] > 0:
        codes, cut = torch.cat([prepared.prompt_codes, codes], dim=0), prepared.prompt_codes.shape[0]
    (waveform,), rate = decode_codes(codec, info, [codes], nq)
    cut_samples = int(round(cut * info.hop * rate / info.sample_rate))
    return waveform[:, cut_samples:], rate


def _decode_chunks(codec, info, codes_list, nq, codec_batch) -> tuple[list, int]:
    """Decode chunk codes in groups of codec_batch; a failing group is decoded chunk by chunk (upstream)."""
    waveforms, rate = [], info.sample_rate
    for batch in _batches(len(codes_list), codec_batch):
        group = [codes_list[i] for i in batch]
        try:
            decoded, rate = decode_codes(codec, info, group, nq)
        except (RuntimeError, ValueError) as error:
            if len(group) == 1:
                raise
            logger.warning("Batched decoding of %d chunks failed (%s); decoding them one by one", len(group), error)
            decoded = []
            for codes in group:
                (single,), rate = decode_codes(codec, info, [codes], nq)
                decoded.append(single)
        waveforms += decoded
    return waveforms, rate


def _join_with_pauses(waveforms: list, chunks: Sequence[str], rate: int, channels: int) -> torch.Tensor:
    """Chunk waveforms joined with the §7.2 pause after every chunk but the last."""
    pieces = []
    for index, (waveform, chunk) in enumerate(zip(waveforms, chunks)):
        pieces.append(waveform)
        if index < len(chunks) - 1:
            pieces.append(torch.zeros(waveform.shape[0] if waveform.numel() else channels,
                                      pause_samples(chunk, int(rate))))
    return torch.cat(pieces, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Streaming synthesis (spec §7 inference_stream), on the engine


def speech_request(model, tokenizer, text: str, mode: str = "voice_clone", prompt_codes=None,
                   prompt_text: Optional[str] = None, settings: Optional[GenerationSettings] = None,
                   voice_clone_max_text_tokens: int = 50, chunks: Optional[list] = None,
                   **engine_options) -> SpeechRequest:
    """An engine request for `text`: one prompt per chunk (voice clone) or one prompt (continuation), each chunk
    followed by its pause (spec §7.2), in the given voice.

    Args:
        model: the TTS model (its config gives the special ids).
        tokenizer: the text tokenizer.
        text: what to say (non-empty).
        mode: "voice_clone" (prompt_codes = the reference voice) or "continuation" (optionally continuing
            prompt_text + prompt_codes; the codec stream is primed with the prompt's codes, spec §5.3).
        prompt_codes: long [T_ref, n_vq] codes of the reference / prompt audio.
        prompt_text: continuation only: the transcript of prompt_codes.
        settings: generation settings (default: the model methods' defaults).
        voice_clone_max_text_tokens: token budget per voice-clone chunk (<= 0: one chunk).
        chunks: the chunk texts, when already split.
        engine_options: further SpeechRequest fields (seed, generator, global_random, emit_codes, ...).

    Raises:
        ValueError: an unknown mode, a missing or forbidden prompt, empty or over-long text.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text={text!r} is empty; expected a non-empty string to synthesise")
    if chunks is None:
        chunks = text_chunks(tokenizer, text, mode, prompt_text, voice_clone_max_text_tokens)
    prompts = []
    for index, chunk in enumerate(chunks):
        ids, _ = build_rows(model, tokenizer, mode, chunk, prompt_codes, prompt_text)
        pause = pause_seconds_after(chunk) if index < len(chunks) - 1 else 0.0
        prompts.append(ChunkPrompt(ids[0], pause, chunk))
    prime = prompt_codes if mode == "continuation" else None
    return SpeechRequest(prompts, settings or GenerationSettings(), codec_prime=prime, **engine_options)


def run_inference_stream(model, request: SynthesisRequest, policy: Optional[StreamDecodePolicy] = None
                         ) -> Iterator[dict]:
    """`inference_stream`: one request on a one-slot engine, ticked inline; audio events as the policy decodes them,
    then the result event.

    Random numbers come from the device's global generator, as upstream's (seed with torch.manual_seed). No stability
    fallback (as upstream: audio may already have been emitted). The file, when asked for, is written progressively
    to a temporary file and renamed at the end.

    Args:
        model: the TTS model.
        request: from build_request.
        policy: the codec decode policy (default: request.stream_policy, else UPSTREAM_STREAM_POLICY).
    """
    policy = policy or request.stream_policy or UPSTREAM_STREAM_POLICY
    was_training, writer, engine = model.training, None, None
    try:
        prepared = _prepare(model, request)
        settings = GenerationSettings(**{name: value for name, value in request.generation.items()
                                         if name != "use_kv_cache"})
        job = speech_request(model, prepared.tokenizer, request.text, request.mode, prepared.prompt_codes,
                             request.prompt_text, settings, chunks=prepared.chunks, global_random=True)
        positions = max(chunk.rows.shape[0] for chunk in job.chunks) + job.settings.checked(prepared.n_vq).max_new_frames
        engine = SpeechEngine(model, prepared.codec, num_slots=1, max_positions=positions, policy=policy)
        info = prepared.info
        if request.output_audio_path is not None:
            writer = ProgressiveWavWriter(request.output_audio_path, info.sample_rate, info.channels)
        result = yield from _stream_events(engine, engine.submit(job), prepared, request, writer)
        audio_path = writer.close() if writer is not None else None
        writer = None
        yield {"type": "result", **_result(prepared, result["waveform"], info.sample_rate, result["codes"], (1, 1),
                                           audio_path)}
    finally:
        if writer is not None:
            writer.abort()
        if engine is not None:
            engine.close()
        model.train(was_training)


def _stream_events(engine, handle, prepared: _Prepared, request, writer):
    """Tick the engine and turn its events into upstream's dictionaries; returns the waveform and codes."""
    pieces, emitted, first_time = [], 0, None
    rate = prepared.info.sample_rate
    with _ChunkProgress(len(prepared.chunks), request.progress, "streaming") as bar:
        while True:
            busy = engine.step()
            for event in handle.pending():
                if isinstance(event, ErrorEvent):
                    raise RuntimeError(f"streaming synthesis failed: {event.message}")
                if isinstance(event, FinishedEvent):
                    _warn_if_truncated(event.codes, prepared.chunks, int(request.generation["max_new_frames"]))
                    waveform = torch.cat(pieces, dim=-1) if pieces else torch.zeros(prepared.info.channels, 0)
                    _check_not_empty(waveform)
                    return {"waveform": waveform, "codes": event.codes}
                first_time = first_time or time.perf_counter()
                lead = stream_lead_seconds(emitted / rate, first_time, time.perf_counter())
                emitted += event.waveform.shape[-1]
                pieces.append(event.waveform)
                if writer is not None:
                    writer.write(event.waveform)
                bar.update(int(event.is_pause))
                yield {"type": "audio", "waveform": event.waveform, "sample_rate": rate,
                       "chunk_index": event.chunk_index, "is_pause": event.is_pause,
                       "emitted_audio_seconds": emitted / rate, "lead_seconds": lead}
            if not busy:
                raise RuntimeError("the engine stopped without finishing the request")


# ----------------------------------------------------------------------------------------------------------------
# The mixin


class SynthesisMixin:
    """`inference` and `inference_stream` for MossTTSNanoForCausalLM, with upstream's signatures and results.

    Both accept two keyword-only extras after upstream's parameters: `progress` (per chunk: True, False, or None =
    when several chunks are synthesised; a tqdm bar on a terminal, else INFO lines of `progress_logger`) and, for
    streaming, `stream_policy`.
    """

    def inference(
        self, text, output_audio_path, mode="continuation", prompt_text=None, prompt_audio_path=None,
        reference_audio_path=None, text_tokenizer=None, text_tokenizer_path=None, audio_tokenizer=None,
        audio_tokenizer_type=None, audio_tokenizer_pretrained_name_or_path=None, device=None, nq=None,
        max_new_frames=300, do_sample=False, text_temperature=1.5, text_top_p=1.0, text_top_k=50,
        audio_temperature=1.7, audio_top_p=0.8, audio_top_k=25, audio_repetition_penalty=1.0, use_kv_cache=True,
        voice_clone_max_text_tokens=50, voice_clone_max_memory_per_sample_gb=1.0, tts_max_batch_size=0,
        codec_max_batch_size=0, *, progress=None,
    ) -> dict:
        """Synthesise `text` and write it to `output_audio_path` (spec §7).

        Args:
            text: what to say (non-empty).
            output_audio_path: .wav/.flac destination (written atomically), or None to only return the audio.
            mode: "continuation" (default) or "voice_clone" (needs prompt_audio_path; chunks long text).
            prompt_text / prompt_audio_path: continuation prompt (transcript + recording), or the voice to clone.
            reference_audio_path: deprecated alias of prompt_audio_path.
            text_tokenizer / text_tokenizer_path: a tokenizer object or a tokenizer.model file/folder (default: the
                model folder).
            audio_tokenizer / audio_tokenizer_type / audio_tokenizer_pretrained_name_or_path: the codec object, or
                a local codec folder (default: the model folder's audio_tokenizer/).
            device: where to run ("cpu", "cuda", "npu:1", ...); None keeps the model's device.
            nq .. use_kv_cache: generation settings of `generate` (model defaults, spec §6.4 left column).
            voice_clone_max_text_tokens: token budget per voice-clone chunk (<= 0: no chunking).
            voice_clone_max_memory_per_sample_gb: memory planned per chunk for batching by free device memory.
            tts_max_batch_size / codec_max_batch_size: caps on the chunk batches (0 = no cap).
            progress: chunk progress (keyword-only extra; see the class docstring).

        Returns:
            dict with audio_path, sample_rate, audio_token_ids [F, 16], waveform [C, N] float32 CPU,
            reference_audio_token_ids, voice_clone_text_chunks, voice_clone_chunk_batch_size,
            voice_clone_codec_batch_size.

        Raises:
            ValueError: bad inputs (empty text, bad prompt file, unknown mode, missing tokenizer or codec, ...).
            RuntimeError: generation failed (also after the float32 retry) or produced no audio.
        """
        arguments = dict(locals())
        arguments.pop("self")
        return run_inference(self, build_request(**arguments))

    def inference_stream(
        self, text, output_audio_path=None, mode="continuation", prompt_text=None, prompt_audio_path=None,
        reference_audio_path=None, text_tokenizer=None, text_tokenizer_path=None, audio_tokenizer=None,
        audio_tokenizer_type=None, audio_tokenizer_pretrained_name_or_path=None, device=None, nq=None,
        max_new_frames=300, do_sample=False, text_temperature=1.5, text_top_p=1.0, text_top_k=50,
        audio_temperature=1.7, audio_top_p=0.8, audio_top_k=25, audio_repetition_penalty=1.0, use_kv_cache=True,
        voice_clone_max_text_tokens=50, voice_clone_max_memory_per_sample_gb=1.0, tts_max_batch_size=0,
        codec_max_batch_size=0, *, progress=None, stream_policy=None,
    ) -> Iterator[dict]:
        """Like `inference`, but yields audio as it is produced (spec §7 inference_stream).

        Yields:
            {"type": "audio", "waveform" [C, n] float32 CPU, "sample_rate", "chunk_index", "is_pause",
            "emitted_audio_seconds", "lead_seconds"} events in playback order (pauses between chunks included),
            then {"type": "result", ...the keys of `inference`...}.

        Args:
            (as `inference`); stream_policy: a StreamDecodePolicy (default upstream's CPU policy 1/2/4/8 frames).
        """
        arguments = dict(locals())
        arguments.pop("self")
        policy = arguments.pop("stream_policy")
        return run_inference_stream(self, build_request(**arguments), policy)

    # Upstream private helpers that callers use directly (spec §7).
    def _load_text_tokenizer(self, text_tokenizer=None, text_tokenizer_path=None):
        return load_text_tokenizer(self, text_tokenizer, text_tokenizer_path)

    def _split_text_into_best_sentences(self, text_tokenizer, text, max_tokens):
        return split_text_into_chunks(text_tokenizer, text, max_tokens)

    @staticmethod
    def _compute_stream_lead_seconds(emitted_audio_seconds, first_emit_time, now=None):
        return stream_lead_seconds(emitted_audio_seconds, first_emit_time,
                                   time.perf_counter() if now is None else now)

    @staticmethod
    def _resolve_stream_decode_frame_budget(lead_seconds, emitted_any=True, policy=UPSTREAM_STREAM_POLICY):
        return policy.frame_budget(lead_seconds, emitted_any)


__all__ = [
    "CONTINUATION_MAX_TEXT_TOKENS",
    "CodecInfo",
    "ProgressiveWavWriter",
    "StreamDecodePolicy",
    "SynthesisMixin",
    "SynthesisRequest",
    "UPSTREAM_CUDA_STREAM_POLICY",
    "UPSTREAM_STREAM_POLICY",
    "build_request",
    "codec_info",
    "decode_codes",
    "encode_prompt_audio",
    "generate_codes",
    "is_stability_error",
    "load_audio_tokenizer",
    "load_text_tokenizer",
    "resolve_batch_sizes",
    "run_inference",
    "run_inference_stream",
    "text_chunks",
]
