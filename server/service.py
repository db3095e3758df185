"""What the speech server does with a request, apart from HTTP: check it, resolve its voice, build the engine request.

`SpeechService` holds the loaded pieces (model, text tokenizer, codec, the running `SpeechEngine`, the `VoiceStore`)
and the server's defaults. Its blocking methods (`prepare`, `add_voice`, `warm_up`) run on worker threads, never on
the event loop; generation itself happens only on the engine's thread. Every user mistake becomes an `APIError`
naming the request field (server/schema.py).

Each request gets a private random generator seeded with its `seed`, or with a fresh random seed that the response
reports, so a request's audio never depends on what runs beside it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..engine import FinishedEvent, QueueFullError, RequestHandle, SpeechEngine, EngineRequest
from ..generation import GenerationSettings
from ..sampling import SettingError
from .schema import OPENAI_MODEL_ALIASES, APIError, SpeechBody, VoiceObject, bad_field
from ..synthesis import engine_request
from ..synthesis_inputs import text_chunks
from ..synthesis_request import check_chunk_budget, check_generation_settings
from ..text_chunking import count_tokens, pause_seconds_after
from ..text_normalization import normalize_text
from ..text_wetext import normalizer
from ..voice_library.catalog import VoiceCatalog
from ..voice_library.presets import DEFAULT_VOICE
from ..voice_library.store import UnknownVoiceError, VoiceExistsError, VoiceStore

logger = logging.getLogger(__name__)

# OpenAI's `input` limit; the server's --max-input-chars default.
DEFAULT_MAX_INPUT_CHARS = 4096
# Encoded ref_audio clips remembered by content (a client repeating its reference is not re-encoded).
REFERENCE_CACHE_SIZE = 32
# Seeds are drawn from [0, SEED_LIMIT) (what SpeechBody's seed accepts, server/schema.py).
SEED_LIMIT = 2**63
# Retry-After (s) of a 429 when the engine's queue is full.
DEFAULT_RETRY_AFTER_SECONDS = 1
# Work per request, checked before any (the server's --max-audio-seconds / --max-chunks defaults): the most audio a
# request may ask for (every chunk at max_new_frames, plus the pauses between chunks) and its voice-clone chunks. A
# 4096-character Chinese input at the default settings is 45 chunks of at most 30 s (1350 s); each chunk prefills the
# reference clip again.
DEFAULT_MAX_AUDIO_SECONDS = 1800.0
DEFAULT_MAX_CHUNKS = 64
WARM_UP_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class ServiceOptions:
    """The server's choices that requests do not change.

    Attributes:
        defaults: generation defaults: every GenerationSettings field plus voice_clone_max_text_tokens
            (generation_flags.generation_defaults(), what the CLI applies without flags).
        model_name: the served model id (GET /v1/models; `model` must be it or an OpenAI alias).
        max_input_chars: the longest `input` accepted.
        retry_after_seconds: the Retry-After of a 429 (and of a 503 after queue_timeout).
        max_audio_seconds: the most audio one request may ask for (chunks x max_new_frames, plus pauses).
        max_chunks: the most voice-clone chunks one request may make.
        queue_timeout: seconds a request may wait for a slot before it gets 503 (None: no limit).
        default_voice: who speaks without a voice, and for OpenAI names whose preset is not installed.
    """

    defaults: dict
    model_name: str = "moss-tts-nano-100m"
    max_input_chars: int = DEFAULT_MAX_INPUT_CHARS
    retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_chunks: int = DEFAULT_MAX_CHUNKS
    queue_timeout: Optional[float] = None
    default_voice: str = DEFAULT_VOICE


@dataclass
class AcceptedSpeech:
    """A checked request, ready for the engine."""

    request: EngineRequest
    seed: int
    input_tokens: int
    voice: Optional[str] = None  # the voice that speaks (x-moss-voice); None for ref_audio or no reference
    spoken_text: str = ""  # `input` after text normalization (what the chunks say)


class SpeechService:
    """The server's model side (module docstring).

    Args:
        model: the TTS model, on its device.
        tokenizer: its text tokenizer.
        engine: a SpeechEngine over the model and codec (started by the caller).
        voices: the uploaded voices' store (its codec is the engine's).
        options: ServiceOptions.
        presets: the store of the model folder's preset voices, or None (voice_library/catalog.py says how names resolve).
    """

    def __init__(self, model, tokenizer, engine: SpeechEngine, voices: VoiceStore, options: ServiceOptions,
                 presets: Optional[VoiceStore] = None) -> None:
        self.model, self.tokenizer, self.engine, self.voices, self.options = model, tokenizer, engine, voices, options
        self.catalog = VoiceCatalog(voices, presets, options.default_voice)
        self.n_vq = int(model.config.n_vq)
        self.pad_id = int(model.config.audio_pad_token_id)
        self.sample_rate = engine.codec.rate
        self.channels = engine.codec.channels
        self.seconds_per_frame = engine.codec.hop / engine.codec.rate
        self.created = int(time.time())
        self._references: OrderedDict = OrderedDict()  # sha256 of ref_audio bytes -> codes [T, n_vq]
        self._references_lock = threading.Lock()

    # -- requests -----------------------------------------------------------------------------------------------

    def prepare(self, body: SpeechBody) -> AcceptedSpeech:
        """Check `body` and build its engine request (blocking: encodes ref_audio when given). Everything that needs
        no clip encoding (settings, chunk count, the work bound) is checked before the clip is encoded.

        Raises:
            APIError: 400 naming the field at fault.
        """
        self._check_model(body.model)
        self._check_input(body.input)
        settings, max_text_tokens = self._settings(body)
        mode = body.mode or "voice_clone"
        _check_prompt_fields(body, mode)
        try:
            spoken = normalize_text(body.input, body.language).text if body.normalize else body.input
            chunks = text_chunks(self.tokenizer, spoken, mode, body.ref_text, max_text_tokens)
        except ValueError as error:
            raise bad_field("input", error) from None
        self._check_work(body, chunks, settings.max_new_frames)
        codes, voice = self._prompt_codes(body, mode, settings.nq)
        seed = body.seed if body.seed is not None else secrets.randbelow(SEED_LIMIT)
        try:
            request = engine_request(self.model, self.tokenizer, spoken, mode, codes, body.ref_text, settings,
                                     max_text_tokens, chunks=chunks, seed=seed, runaway_guards=body.runaway_guards,
                                     realtime=body.stream)
        except ValueError as error:
            raise bad_field("input", error) from None
        self._check_positions(body, request, codes)
        return AcceptedSpeech(request, seed, count_tokens(self.tokenizer, body.input), voice, spoken)

    def submit(self, prepared: AcceptedSpeech, listener) -> RequestHandle:
        """Queue the request on the engine; events go to `listener` (called on the engine thread).

        Raises:
            APIError: 429 (with Retry-After) when the engine's queue is full.
        """
        try:
            return self.engine.submit(prepared.request, listener)
        except QueueFullError as error:
            raise self._busy(error) from None
        except ValueError as error:  # prepare checked settings and positions: nothing should be left to refuse
            raise bad_field("input", error) from None

    def check_queue(self) -> None:
        """Raises APIError 429 when the engine's queue is full now (before any work on a request; submit checks
        again). Requests that free slots will take at the engine's next tick do not count as waiting."""
        engine = self.engine
        if engine.waiting - (engine.num_slots - engine.active) >= engine.max_queue:
            raise self._busy(f"{self.engine.waiting} requests are already waiting (max_queue={self.engine.max_queue})"
                             "; retry later")

    def _busy(self, reason) -> APIError:
        return APIError(429, f"the server is busy: {reason}", error_type="rate_limit_error",
                        code="rate_limit_exceeded", headers={"Retry-After": str(self.options.retry_after_seconds)})

    def _check_work(self, body: SpeechBody, chunks: list, max_new_frames: int) -> None:
        """The per-request bounds (ServiceOptions.max_chunks, max_audio_seconds), before any work."""
        options, set_fields = self.options, body.overrides()
        if len(chunks) > options.max_chunks:
            param = "voice_clone_max_text_tokens" if "voice_clone_max_text_tokens" in set_fields else "input"
            raise bad_field(param, f"input splits into {len(chunks)} voice-clone chunks; the server makes at most "
                                   f"{options.max_chunks} per request (--max-chunks): send a larger "
                                   "voice_clone_max_text_tokens or a shorter input")
        pauses = sum(pause_seconds_after(chunk) for chunk in chunks[:-1])
        seconds = len(chunks) * max_new_frames * self.seconds_per_frame + pauses
        if seconds > options.max_audio_seconds:
            param = "max_new_frames" if "max_new_frames" in set_fields else "input"
            raise bad_field(param, f"this request may make up to {seconds:.0f} s of audio ({len(chunks)} chunk(s) of "
                                   f"up to max_new_frames={max_new_frames} frames of {self.seconds_per_frame:g} s, "
                                   f"plus pauses); the server allows at most {options.max_audio_seconds:g} s per request "
                                   "(--max-audio-seconds): send a smaller max_new_frames or a shorter input")

    def _check_positions(self, body: SpeechBody, request, codes: Optional[torch.Tensor]) -> None:
        """Every chunk's prompt rows + max_new_frames must fit a slot; the error names what makes it too long."""
        capacity, frames = self.engine.decoder.capacity, request.settings.max_new_frames
        rows = max(chunk.rows.shape[0] for chunk in request.chunks)
        if rows + frames <= capacity:
            return
        reference = 0 if codes is None else int(codes.shape[0])
        clip = "ref_audio" if body.ref_audio is not None else "voice"
        if rows < capacity and ("max_new_frames" in body.overrides() or reference == 0):
            raise bad_field("max_new_frames", f"max_new_frames={frames} does not fit: the prompt takes {rows} of the "
                                              f"{capacity} positions of a slot; expected at most {capacity - rows}")
        if reference * 2 >= rows:
            raise bad_field(clip, f"the {clip} clip takes {reference} of the {capacity} positions of a slot, leaving "
                                  f"{max(capacity - rows, 0)} frames for max_new_frames={frames}: use a shorter clip "
                                  "or a smaller max_new_frames")
        param = "voice_clone_max_text_tokens" if (body.mode or "voice_clone") == "voice_clone" else "input"
        raise bad_field(param, f"a chunk's prompt takes {rows} of the {capacity} positions of a slot, leaving "
                               f"{max(capacity - rows, 0)} frames for max_new_frames={frames}: send a smaller "
                               "voice_clone_max_text_tokens or a shorter input")

    def _check_model(self, name: str) -> None:
        accepted = (self.options.model_name,) + OPENAI_MODEL_ALIASES
        if name not in accepted:
            raise bad_field("model", f"model={name!r} is not served here; expected one of {', '.join(accepted)}")

    def _check_input(self, text: str) -> None:
        if not text.strip():
            raise bad_field("input", "input is empty; expected the text to speak")
        if len(text) > self.options.max_input_chars:
            raise bad_field("input", f"input is {len(text)} characters; expected at most "
                                     f"{self.options.max_input_chars} (split longer texts into several requests)")

    def _settings(self, body: SpeechBody) -> tuple[GenerationSettings, int]:
        """The request's GenerationSettings and voice-clone chunk size, over the server's defaults, checked by the
        library's one set of rules (synthesis_request.check_generation_settings, as infer_npu.py and `inference`)."""
        values = {**self.options.defaults, **body.overrides()}
        max_text_tokens = values.pop("voice_clone_max_text_tokens")
        try:
            check_generation_settings(values, self.n_vq)
            check_chunk_budget(max_text_tokens)
            settings = GenerationSettings(**values).checked(self.n_vq)
        except SettingError as error:  # error.name is the argument, and the request field of the same name
            raise APIError(400, str(error), param=error.name) from None
        return settings, max_text_tokens

    def _prompt_codes(self, body: SpeechBody, mode: str, nq: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
        """The reference codes [T, n_vq] (channels >= nq padded, as synthesis.encode_prompt_audio pads them) and the
        name of the voice they are (None for ref_audio or no reference)."""
        codes = self._reference_codes(body.ref_audio) if body.ref_audio is not None else None
        uses_voice = mode == "voice_clone" or body.ref_text is not None
        voice = None
        if codes is None and uses_voice:
            voice, codes = self._voice_codes(body.voice_name())
        if mode == "continuation" and (codes is None) != (body.ref_text is None):
            raise bad_field("ref_text", "mode 'continuation' takes ref_text with ref_audio (or a voice), or neither")
        if codes is not None:
            codes = codes.clone()
            codes[:, nq:] = self.pad_id
        return codes, voice

    def _voice_codes(self, name: Optional[str]) -> tuple[str, torch.Tensor]:
        """(voice used, codes) of a voice name, None meaning the default voice (voice_library/catalog.py)."""
        try:
            return self.catalog.resolve(name)
        except ValueError as error:  # UnknownVoiceError, a bad name, or a clip that is not a usable prompt
            raise bad_field("voice", error) from None

    def _reference_codes(self, text: str) -> torch.Tensor:
        data = decode_base64_audio(text, self.voices.max_upload_bytes)
        key = hashlib.sha256(data).hexdigest()
        with self._references_lock:
            if key in self._references:
                self._references.move_to_end(key)
                return self._references[key]
        try:
            codes, _ = self.voices.encode_clip(data, "ref_audio")
        except ValueError as error:
            raise bad_field("ref_audio", error) from None
        with self._references_lock:
            self._references[key] = codes
            while len(self._references) > REFERENCE_CACHE_SIZE:
                self._references.popitem(last=False)
        return codes

    # -- voices -------------------------------------------------------------------------------------------------

    def list_voices(self) -> list[VoiceObject]:
        """Uploads, presets and OpenAI's names, each saying which voice speaks for it (voice_library/catalog.py)."""
        presets = self.catalog.presets
        folders = {"upload": self.voices.folder, "preset": presets.folder if presets is not None else None}
        return [self._voice_object(entry.name, folders.get(entry.kind)).model_copy(update={
            "kind": entry.kind, "uses": entry.uses, "replaces": entry.replaces, "fallback": entry.fallback})
            for entry in self.catalog.entries()]

    def add_voice(self, name: str, data: bytes) -> VoiceObject:
        """Store an uploaded clip as voice `name` (encoded once now; blocking).

        Raises:
            APIError: 409 when the voice exists; 400 naming `name` or `audio_sample`.
        """
        try:
            self.voices.add_voice(name, data)
        except VoiceExistsError as error:
            raise APIError(409, str(error), param="name", code="voice_exists") from None
        except ValueError as error:
            param = "name" if str(error).startswith("voice name") else "audio_sample"
            raise bad_field(param, error) from None
        return self._voice_object(name, self.voices.folder)

    def delete_voice(self, name: str) -> None:
        """Raises: APIError 404 (no such voice) or 400 (a bad name)."""
        try:
            self.voices.delete_voice(name)
        except UnknownVoiceError as error:
            raise APIError(404, str(error), param="voice_id", code="voice_not_found") from None
        except ValueError as error:
            raise bad_field("voice_id", error) from None

    def _voice_object(self, name: str, folder: Optional[Path]) -> VoiceObject:
        """The Voice of `name`, created when its clip in `folder` was (no folder: when the server started)."""
        clips = folder.glob(f"{name}.*") if folder is not None else ()
        created = min((int(clip.stat().st_mtime) for clip in clips), default=self.created)
        return VoiceObject(id=name, name=name, created_at=created)

    # -- readiness ----------------------------------------------------------------------------------------------

    def warm_up(self, timeout: float = WARM_UP_TIMEOUT_SECONDS) -> float:
        """Run short requests through the engine (prefill, frames, codec); returns their seconds: one in continuation
        mode, then one in the default voice when it resolves, so that its codes are loaded and, with the engine's
        prefix store, its prompt rows stored before the first request asks for it.

        Raises:
            RuntimeError: when one fails.
        """
        started = time.perf_counter()
        self._warm_up_request(SpeechBody(model=self.options.model_name, input="Hello.", mode="continuation",
                                         max_new_frames=2, do_sample=False, seed=0), timeout)
        normalizer("zh")  # the first request's normalization loaded the English grammar; now the Chinese one
        try:
            voice, _ = self.catalog.resolve(None)
        except ValueError as error:  # no default voice here (e.g. no presets): requests will name theirs
            logger.info("warm-up: no default voice to load (%s)", error)
        else:
            self._warm_up_request(SpeechBody(model=self.options.model_name, input="Hello.", voice=voice,
                                             max_new_frames=1, do_sample=False, seed=0), timeout)
        return time.perf_counter() - started

    def _warm_up_request(self, body: SpeechBody, timeout: float) -> None:
        final = list(self.submit(self.prepare(body), None).events(timeout=timeout))[-1]
        if not isinstance(final, FinishedEvent):
            raise RuntimeError(f"the warm-up request failed: {final.message}")

    def status(self) -> dict:
        engine = self.engine
        return {"model": self.options.model_name, "slots": engine.num_slots, "active": engine.active,
                "waiting": engine.waiting, "max_queue": engine.max_queue, "sample_rate": self.sample_rate,
                "channels": self.channels}


def _check_prompt_fields(body: SpeechBody, mode: str) -> None:
    """The reference fields that cannot go together (before any clip is decoded)."""
    if body.ref_audio is not None and body.voice_name() is not None:
        raise bad_field("ref_audio", "ref_audio and voice are both given; send one of them (with the openai SDK, "
                                     "voice=None and extra_body={'ref_audio': ...})")
    if mode == "voice_clone" and body.ref_text is not None:
        raise bad_field("ref_text", "ref_text is only for mode 'continuation'; mode 'voice_clone' speaks input "
                                    "in the voice of ref_audio or voice without a transcript")


def decode_base64_audio(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 audio file (a `data:<type>;base64,` prefix is allowed).

    Raises:
        APIError: 400 naming ref_audio: not base64, or larger than max_bytes.
    """
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) * 3 // 4 > max_bytes + 3:
        raise bad_field("ref_audio", f"ref_audio holds about {len(text) * 3 // 4} bytes; expected at most {max_bytes}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_field("ref_audio", f"ref_audio is not valid base64 ({error}); expected the base64 of an audio "
                                     "file (wav, flac, ogg or mp3)") from None


__all__ = ["DEFAULT_MAX_AUDIO_SECONDS", "DEFAULT_MAX_CHUNKS", "DEFAULT_MAX_INPUT_CHARS", "AcceptedSpeech",
           "ServiceOptions", "SpeechService", "decode_base64_audio"]
