"""What a synthesis request needs before it generates: the text tokenizer, the codec, the prompt's codes and the
text chunks (spec tts.md §7.2, §7.4, §7.5), and the codec calls synthesis makes (prompt audio -> codes, codes ->
waveform).

Nothing is downloaded here. The text tokenizer is our SentencePiece class, loaded directly from the model folder;
nothing goes through transformers' dynamic-module machinery and `HF_MODULES_CACHE` is left alone (§11 item 12). The
codec is our `MossAudioTokenizerModel`, loaded from the model folder's `audio_tokenizer/` subfolder (what
`python infer_npu.py --download-only` creates), else from `audio_tokenizer_pretrained_name_or_path` when that is a
local folder; a missing codec raises a ValueError that says how to get it. Any object with the upstream codec API may
be passed instead. Loaded tokenizers and codecs are cached on the model instance; on the CPU a loaded codec's Linear
weights take the memory layout `weight_formats.codec_weight_layout` chooses (same values, faster small products).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .audio_io import load_audio
from .configuration_moss_tts_nano import AUDIO_TOKENIZER_TYPES
from .devices import resolve_device
from .generation import GenerationSettings
from .synthesis_request import SynthesisRequest
from .text_chunking import count_tokens, voice_clone_text_chunks
from .weight_formats import use_codec_cpu_layout
from .weights import CODEC_REPO_ID, CODEC_SUBFOLDER, PINNED, describe_manual_download

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
# Training-layout tokenizer locations that upstream also recognises (spec §7.5).
TOKENIZER_FALLBACKS = ("hf_tokenizer", "sentencepiece/mossttsnano_spm_bpe.model")
# Continuation mode speaks the whole text in one generation of at most max_new_frames frames (24 s by default, at
# about 3 text tokens per second of speech). 2048 tokens is ~10 minutes of speech: anything longer cannot be spoken in
# one generation and would only cost a huge prefill, so it is refused with a pointer to voice_clone mode.
CONTINUATION_MAX_TEXT_TOKENS = 2048
# Codec frames per second of the released codec, for a codec object without frame_rate or downsample_rate.
DEFAULT_FRAME_RATE = 12.5


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


def folder_text_tokenizer(folder):
    """The text tokenizer of a model folder (or a tokenizer.model file) without loading the model (--dry-run).

    Raises:
        ValueError: no tokenizer there.
    """
    tokenizer = _tokenizer_from(Path(folder))
    if tokenizer is None:
        raise ValueError(f"no {TOKENIZER_FILE} in {folder}; expected the model folder (run --download-only first)")
    return tokenizer


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
    if audio_tokenizer_type not in (None, *AUDIO_TOKENIZER_TYPES):
        raise ValueError(f"audio_tokenizer_type={audio_tokenizer_type!r}; expected None or one of "
                         f"{AUDIO_TOKENIZER_TYPES}")
    if audio_tokenizer is not None:
        audio_tokenizer.eval()
        return audio_tokenizer.to(device) if device is not None and hasattr(audio_tokenizer, "to") else audio_tokenizer
    folder = _codec_folder(model, audio_tokenizer_pretrained_name_or_path)
    cache = _synthesis_cache(model)
    key = ("audio_tokenizer", str(folder))
    loaded = key not in cache
    if loaded:
        cache[key] = _load_codec_folder(folder)
    codec = cache[key].eval()
    codec = codec.to(device) if device is not None else codec
    layout = use_codec_cpu_layout(codec)  # again after a move: the layout follows the device
    if loaded:
        logger.info("codec from %s: %s", folder, layout)
    return codec


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


def encode_prompt_audio(codec, layout: CodecInfo, path, config, nq: int) -> torch.Tensor:
    """Prompt file -> codes [T, n_vq] long on the CPU, trimmed to the codec's (floor) length; channels >= nq = pad.

    Raises:
        ValueError: from audio_io for a missing/empty/silent/unreadable file, or a prompt shorter than one frame.
    """
    waveform = load_audio(path, target_rate=layout.sample_rate, channels=layout.channels)  # [C, N] float32
    device = _module_device(codec)
    output = codec.batch_encode([waveform.to(device) if device is not None else waveform], chunk_duration=None)
    codes = _output_field(output, "audio_codes", 0)  # [n_q, B, F]
    lengths = _output_field(output, "audio_codes_lengths", 1)
    length = int(lengths[0]) if lengths is not None else codes.shape[-1]
    if length < 1:
        raise ValueError(f"prompt audio {path} is shorter than one codec frame "
                         f"({layout.hop / layout.sample_rate * 1000:.0f} ms); expected a few seconds of speech")
    # Upstream keeps floor(N / hop) frames although the tensor holds ceil(N / hop) (spec §11 item 9, PRESERVE).
    frames = codes[:, 0, :length].transpose(0, 1).to("cpu", torch.long)  # [T, n_q]
    pad, n_vq = int(config.audio_pad_token_id), int(config.n_vq)
    prompt = torch.full((length, n_vq), pad, dtype=torch.long)
    width = min(n_vq, frames.shape[1])
    prompt[:, :width] = frames[:, :width]
    prompt[:, nq:] = pad
    return prompt


def _output_field(output, name: str, index: int):
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


def decode_codes(codec, layout: CodecInfo, codes_list: Sequence[torch.Tensor], nq: int) -> tuple[list, int]:
    """Offline decode of several code sequences in one batch_decode call.

    Args:
        codec: upstream codec API.
        layout: codec_info(codec).
        codes_list: tensors [F_i, n_vq]; empty ones give empty waveforms without a codec call.
        nq: codebooks to use.

    Returns:
        (list of float32 CPU waveforms [C, N_i], sample rate of the output).
    """
    present = [index for index, codes in enumerate(codes_list) if codes.shape[0] > 0]
    waveforms = [torch.zeros(layout.channels, 0) for _ in codes_list]
    rate = layout.sample_rate
    if present:
        device = _module_device(codec)
        batch = [_as_codec_codes(codes_list[i], nq).to(device if device is not None else "cpu") for i in present]
        output = codec.batch_decode(batch, num_quantizers=nq, chunk_duration=None)
        rate = int(getattr(output, "sample_rate", None) or getattr(output, "sampling_rate", None) or rate)
        for row, index in enumerate(present):
            waveforms[index] = _decoded_row(output, row, codes_list[index].shape[0] * layout.hop)
    return waveforms, rate


def _decoded_row(output, row: int, default_length: int) -> torch.Tensor:
    """Row `row` of a decoder output as float32 CPU [C, length]."""
    audio = _output_field(output, "audio", 0)
    lengths = _output_field(output, "audio_lengths", 1)
    length = int(lengths[row]) if lengths is not None else default_length
    return audio[row, :, :length].detach().to("cpu", torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# A request, prepared (spec §7 'Flow')


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


@dataclass
class SynthesisInputs:
    """Everything one request needs, loaded before any generation."""

    device: torch.device
    tokenizer: Any
    codec: Any
    codec_layout: CodecInfo
    nq: int
    n_vq: int
    prompt_codes: Optional[torch.Tensor]
    chunks: list


def load_synthesis_inputs(model, request: SynthesisRequest, prompt_cache: Optional[dict] = None) -> SynthesisInputs:
    """Model to device + eval, tokenizers, codec, prompt codes and chunks (spec §7 'Flow').

    `prompt_cache` ({(path, nq, id(codec)): codes}) lets several requests with the same prompt and codec encode it once.
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
    layout = codec_info(codec, model.config)
    prompt_codes = None
    if request.prompt_audio_path is not None:
        key = (str(request.prompt_audio_path), nq, id(codec))
        cache = prompt_cache if prompt_cache is not None else {}
        if key not in cache:
            cache[key] = encode_prompt_audio(codec, layout, request.prompt_audio_path, model.config, nq)
        prompt_codes = cache[key]
    return SynthesisInputs(device, tokenizer, codec, layout, nq, int(model.config.n_vq), prompt_codes, chunks)


def _check_nq(model, nq) -> int:
    """nq, or n_vq for None; a ValueError naming a value outside 1..n_vq (GenerationSettings' check)."""
    return GenerationSettings(nq=nq).checked(int(model.config.n_vq)).nq
