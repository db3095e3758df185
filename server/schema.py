"""The HTTP API's bodies: OpenAI's speech, voices and models schemas field for field, our extensions, and errors.

`POST /v1/audio/speech` takes OpenAI's CreateSpeechRequest fields:

    model            one of the served model names (GET /v1/models); OpenAI's TTS model names are accepted as aliases
    input            the text, at most the server's --max-input-chars characters (OpenAI: 4096)
    voice            a voice name of GET /v1/audio/voices, or {"id": name}
    instructions     accepted and ignored (the model has no style prompt)
    response_format  wav | pcm | flac | mp3 | opus | aac (OpenAI's default mp3; aac needs PyAV, else it is refused
                     with the reason)
    speed            0.25 to 4.0, pitch-preserving time stretch (server/time_stretch.py)
    stream_format    audio (default): the response body is the encoded audio, sent as it is produced;
                     sse: server-sent events `speech.audio.delta` ({"audio": base64 of encoded bytes}), one
                     `speech.caption` per chunk once its audio is sent ({"index", "text", "start", "end"}, seconds
                     of the response's audio) then `speech.audio.done` ({"usage": {"input_tokens", "output_tokens",
                     "total_tokens"}, "spoken_text", "runaway_stops": chunks that a runaway guard ended early})

Our extensions (extra body fields; with the openai SDK pass them as `extra_body={...}`). Unset = the server default,
which is what `infer_npu.py` applies without flags:

    mode                         voice_clone (default: speak `input` in the voice) | continuation (continue
                                 ref_text + ref_audio, or speak without any reference when both are absent)
    ref_audio                    base64 of an audio file (wav/flac/ogg/mp3, a data: URL prefix is allowed), used
                                 instead of `voice` (both together is a 400); validated as infer_npu.py validates
                                 --prompt-audio-path
    ref_text                     transcript of ref_audio (continuation only)
    seed                         seeds this request's private random generator (the response header
                                 x-moss-seed always reports the seed used)
    stream                       false: the whole file at once, with exact sizes in wav / flac headers and a
                                 Content-Length (default true: bytes as produced)
    normalize                    true (default): `input` is cleaned of markdown, code, links and emoji, and its
                                 numbers, dates, times, currencies, units and percentages are said as words in its
                                 language (text_normalization.py); false: spoken exactly as given. The text spoken is
                                 returned URL-encoded in the header x-moss-spoken-text (when it is at most 4 KiB so
                                 encoded) and always in the SSE `speech.audio.done` event (`spoken_text`)
    language                     the language of `input` (zh, en, de, es, fr, ja, it, he, ko, ru, fa, ar, pl, pt,
                                 cs, da, sv, hu, el, tr; "pt-BR" style tags are accepted); default: detected
    runaway_guards               true (default): a chunk that runs far past its text's length, loops or stays
                                 silent is ended early (runaway_guards.py; counted in /metrics as
                                 moss_tts_runaway_chunks_total, listed in the SSE done event); false: only
                                 max_new_frames ends it
    do_sample, max_new_frames, text_temperature, text_top_p, text_top_k, audio_temperature, audio_top_p,
    audio_top_k, audio_repetition_penalty, nq, voice_clone_max_text_tokens
                                 the generation settings of infer_npu.py, same names, same meaning (max_new_frames
                                 per voice-clone chunk, 12.5 frames per second)

    sample_rate, channels        the response's rate (8000 to 48000 Hz; mp3 and opus only at their encoders' rates)
                                 and channel count (1 or 2), converted with soxr (formats.output_layout)

`pcm` is 16-bit signed little-endian, channels interleaved (L R L R), without a header, at 24 kHz mono as OpenAI
documents it; the other formats are the codec's native 48 kHz stereo; `sample_rate` / `channels` change either (48 kHz
stereo pcm is `{"sample_rate": 48000, "channels": 2}`). Every audio response states x-sample-rate and x-channels;
x-moss-voice names the voice that spoke (an OpenAI name's preset, or the default voice when that preset is not
installed; absent with ref_audio or without a reference); the SSE audio events (delta and done) carry
response_format, sample_rate and channels.

Errors are OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`, with `param` naming the request field.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, field_validator

from .formats import audio_format, output_layout
from ..generation import GenerationSettings
from ..prompting import GENERATION_MODES as MODES
from ..text_language import check_language
from .time_stretch import check_speed

# OpenAI's text-to-speech model names, accepted as aliases of the served model (clients often hard-code them).
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# Request fields that map onto GenerationSettings (the same names).
GENERATION_FIELDS = tuple(field.name for field in dataclasses.fields(GenerationSettings))
# OpenAI's default `response_format`.
DEFAULT_RESPONSE_FORMAT = "mp3"


class APIError(Exception):
    """An error answered as OpenAI's error JSON.

    Args:
        status: HTTP status.
        message: what is wrong and what was expected.
        param: the request field at fault (None when no single field is).
        error_type: OpenAI's `type` (invalid_request_error, rate_limit_error, server_error, ...).
        code: OpenAI's `code`, or None.
        headers: extra response headers (Retry-After, WWW-Authenticate).
    """

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 error_type: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.error_type, self.code, self.headers = error_type, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_field(param: str, error: Exception | str) -> APIError:
    """A 400 naming `param`."""
    return APIError(400, str(error), param=param)


class VoiceId(BaseModel):
    """OpenAI's custom voice reference."""

    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechBody(BaseModel):
    """POST /v1/audio/speech (module docstring); unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str
    voice: Optional[Union[str, VoiceId]] = None
    instructions: Optional[str] = None
    response_format: str = DEFAULT_RESPONSE_FORMAT
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    # extensions
    mode: Optional[str] = None
    ref_audio: Optional[str] = None
    ref_text: Optional[str] = None
    seed: Optional[int] = None
    stream: bool = True
    do_sample: Optional[bool] = None
    max_new_frames: Optional[int] = None
    text_temperature: Optional[float] = None
    text_top_p: Optional[float] = None
    text_top_k: Optional[int] = None
    audio_temperature: Optional[float] = None
    audio_top_p: Optional[float] = None
    audio_top_k: Optional[int] = None
    audio_repetition_penalty: Optional[float] = None
    nq: Optional[int] = None
    voice_clone_max_text_tokens: Optional[int] = None
    sample_rate: Optional[int] = None
    channels: Optional[int] = None
    normalize: bool = True
    language: Optional[str] = None
    runaway_guards: bool = True

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return audio_format(value).name

    @field_validator("speed")
    @classmethod
    def _speed_in_range(cls, value: float) -> float:
        return check_speed(value)

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in MODES:
            raise ValueError(f"mode={value!r} is unknown; expected one of {', '.join(MODES)}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and not 0 <= value < 2**63:
            raise ValueError(f"seed={value} is out of range; expected an integer from 0 to 2**63 - 1")
        return value

    @field_validator("language")
    @classmethod
    def _model_language(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else check_language(value)

    def audio_layout(self, native_rate: int, native_channels: int) -> tuple[int, int]:
        """(rate, channels) of the response (formats.output_layout: pcm 24 kHz mono unless asked otherwise).

        Raises:
            APIError: 400 naming sample_rate or channels.
        """
        try:
            return output_layout(self.response_format, self.sample_rate, self.channels, native_rate, native_channels)
        except ValueError as error:
            raise bad_field("channels" if str(error).startswith("channels") else "sample_rate", error) from None

    def voice_name(self) -> Optional[str]:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice

    def overrides(self) -> dict:
        """The generation settings this request sets (the others keep the server's defaults)."""
        names = GENERATION_FIELDS + ("voice_clone_max_text_tokens",)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDelta(BaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str
    # extensions: what the audio bytes are
    response_format: Optional[str] = None
    sample_rate: Optional[int] = None
    channels: Optional[int] = None


class SpeechAudioDone(BaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: Usage
    # extensions: what was sent
    response_format: Optional[str] = None
    sample_rate: Optional[int] = None
    channels: Optional[int] = None
    spoken_text: Optional[str] = None  # our extension: the text after normalization
    runaway_stops: Optional[list] = None  # our extension: [{"chunk", "reason", "frames"}] ended by a runaway guard


class SpeechCaption(BaseModel):
    """Our extension event: one chunk's text and where its audio is in the response (seconds)."""

    type: Literal["speech.caption"] = "speech.caption"
    index: int
    text: str
    start: float
    end: float


class VoiceObject(BaseModel):
    """OpenAI's Voice; our voices are named, so the id is the name."""

    id: str
    created_at: int
    name: str
    object: Literal["audio.voice"] = "audio.voice"
    type: Literal["audio_sample"] = "audio_sample"
    # extensions (voice_library/catalog.py): upload | preset | openai; the voice that speaks for this name; the kind of name an
    # upload replaced; whether an OpenAI name falls back to the default voice (its preset is not installed)
    kind: Optional[str] = None
    uses: Optional[str] = None
    replaces: Optional[str] = None
    fallback: Optional[bool] = None


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceObject]


class VoiceDeleted(BaseModel):
    id: str
    deleted: bool = True
    object: Literal["audio.voice.deleted"] = "audio.voice.deleted"


class ModelObject(BaseModel):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "moss-tts-nano"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


__all__ = [
    "APIError",
    "DEFAULT_RESPONSE_FORMAT",
    "GENERATION_FIELDS",
    "ModelList",
    "ModelObject",
    "OPENAI_MODEL_ALIASES",
    "SpeechAudioDelta",
    "SpeechAudioDone",
    "SpeechCaption",
    "SpeechBody",
    "Usage",
    "VoiceDeleted",
    "VoiceId",
    "VoiceList",
    "VoiceObject",
    "bad_field",
    "error_body",
]
