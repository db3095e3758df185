"""A folder of reference voices for the speech server, each clip encoded once by the codec and cached beside it.

The folder (one voice = one clip; everything else is derived, temporary or a lock):

    alice.wav                      the reference clip: wav, flac, ogg/opus or mp3 at any rate (what audio_io reads)
    alice.codes.safetensors        its prompt codes [T, n_vq] int64 + metadata: the clip's sha256, the codec's
                                   identity, n_vq and the pad id. A cache: deleting it only costs one re-encode
    .alice.codes.safetensors.*.tmp, .alice.wav.*.tmp   writes in progress (hidden; left only by a killed process,
                                   removed by the next store after STALE_TEMPORARY_SECONDS)
    .voices.lock                   serialises adding and deleting between processes (POSIX flock; in-process only
                                   where fcntl does not exist)

Rules:
* A voice name is 1 to 64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit (VOICE_NAME_PATTERN):
  safe as a file name on every system, and lowercase so that case-insensitive file systems cannot confuse two
  voices. Clips in the folder with other names are ignored (one warning each).
* Codes are encoded with `synthesis.encode_prompt_audio` (the path `infer_npu.py` takes, all n_vq codebooks), so a
  clip is validated as a prompt: readable, not silent, at least one 80 ms codec frame; only its first
  `audio_io.DEFAULT_MAX_SECONDS` (30 s) are used. Uploads are capped at MAX_UPLOAD_BYTES.
* The cache is valid while the clip's sha256, the codec identity (a sha256 over its weights, or the `codec_id` the
  caller gives), n_vq and the pad id all match; otherwise the clip is encoded again and the cache rewritten. The clip
  hash is remembered per (size, mtime, inode), so an unchanged clip is not re-read on every request.
* Writes are atomic (`audio_io.write_atomically`: temporary file, fsync, rename). Adding writes the cache first and
  the clip last, so a voice exists exactly when its complete clip does; a process killed at any point leaves either
  no voice (plus a hidden temporary or a cache nobody lists) or the whole voice.
* Threads: one store may serve many threads. Codec calls are serialised by `codec_lock` (pass the lock that guards
  the codec elsewhere, if anything else uses it), and a voice requested by several threads at once is encoded once.
* Processes: several may share one folder. Listing and lookup rescan the folder on every call, so a voice another
  process added or deleted is seen at once; concurrent encodes of one clip write identical caches (last rename wins).

Errors are ValueErrors naming the voice and what was expected; `UnknownVoiceError` (no such voice) and
`VoiceExistsError` (adding a name that exists without replace=True) are subclasses the server can map to 404 / 409.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import soundfile as sf
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..audio_io import PathLike, write_atomically
from ..synthesis import codec_info, encode_prompt_audio

try:  # POSIX advisory locks between processes; absent on Windows, where the store locks within the process only
    import fcntl
except ImportError:  # pragma: no cover - not reachable on Linux
    fcntl = None

logger = logging.getLogger(__name__)

VOICE_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# Clip suffixes a voice may have (lowercase), and the suffix an upload gets from its libsndfile container.
CLIP_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")
UPLOAD_SUFFIXES = {"WAV": ".wav", "WAVEX": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3"}
CODES_SUFFIX = ".codes.safetensors"
CODES_FORMAT = "moss-tts-nano-voice-codes/1"
LOCK_FILE = ".voices.lock"
# 32 MiB holds 30 s of 48 kHz stereo float32 WAV (11 MiB) with room to spare.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
# Hidden temporary files older than this are leftovers of a killed process (a live write takes well under a minute).
STALE_TEMPORARY_SECONDS = 3600.0


class UnknownVoiceError(ValueError):
    """The voice name is valid but no clip has it."""


class VoiceExistsError(ValueError):
    """add_voice without replace=True for a name that already has a clip."""


def check_voice_name(name) -> str:
    """`name` if it is a valid voice name, else ValueError naming it and VOICE_NAME_PATTERN."""
    if not isinstance(name, str) or not VOICE_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"voice name {name!r} is not allowed; expected 1 to 64 characters of a-z, 0-9, '_' and "
                         f"'-', starting with a letter or digit (pattern {VOICE_NAME_PATTERN.pattern})")
    return name


def codec_fingerprint(codec) -> str:
    """sha256 over the codec's state_dict (names, dtypes, shapes and bytes, in name order).

    Raises:
        ValueError: when the codec has no state_dict (pass `codec_id=` to VoiceStore instead).
    """
    if not hasattr(codec, "state_dict"):
        raise ValueError(f"cannot fingerprint a codec of type {type(codec).__name__} (no state_dict); pass "
                         "codec_id= (e.g. its pinned revision) to VoiceStore")
    digest = hashlib.sha256()
    for name, tensor in sorted(codec.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class VoiceStore:
    """The voices in `folder`, with their prompt codes from `codec` (see the module docstring for the rules).

    Args:
        folder: the voices folder (created when missing).
        codec: an object with the upstream codec API (`batch_encode`, as synthesis.encode_prompt_audio uses).
        config: the TTS config (n_vq, audio_pad_token_id, and the codec rate fallback of synthesis.codec_info).
        codec_id: the codec's identity for cache keys; default codec_fingerprint(codec).
        codec_lock: held around every codec call; default a lock of this store's own.
        max_upload_bytes: the largest clip add_voice accepts.
        cache_folder: where the codes caches go (default: beside the clips); the preset voices of a model folder
            that may be read-only keep theirs in the uploads folder.
    """

    def __init__(self, folder: PathLike, codec, config, *, codec_id: Optional[str] = None,
                 codec_lock: Optional[threading.Lock] = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 cache_folder: Optional[PathLike] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cache_folder = Path(cache_folder) if cache_folder is not None else self.folder
        self.cache_folder.mkdir(parents=True, exist_ok=True)
        self.codec, self.config = codec, config
        self.info = codec_info(codec, config)
        self.n_vq = int(config.n_vq)
        self.codec_id = codec_id if codec_id is not None else codec_fingerprint(codec)
        self.max_upload_bytes = max_upload_bytes
        self._codec_lock = codec_lock if codec_lock is not None else threading.Lock()
        self._lock = threading.RLock()  # guards the two dicts below and in-process add/delete
        self._codes: dict[str, tuple[dict, torch.Tensor]] = {}  # name -> (cache metadata, codes)
        self._hashes: dict[Path, tuple[tuple, str]] = {}  # clip -> (stat signature, sha256)
        self._warned: set[str] = set()
        self._remove_stale_temporaries()

    # -- reading ------------------------------------------------------------------------------------------------

    def list_voices(self) -> list[str]:
        """Names of the voices in the folder now (sorted; rescanned on every call)."""
        return sorted({name for name, _ in self._scan()})

    def prompt_codes(self, name: str) -> torch.Tensor:
        """The voice's prompt codes [T, n_vq] int64 (CPU; a copy), encoding the clip when no valid cache exists.

        Raises:
            ValueError: a bad name; UnknownVoiceError when no clip has it; or the clip is not a usable prompt.
        """
        check_voice_name(name)
        for _ in range(2):  # a clip replaced by another process between scan and read: look once more
            clip = self._clip_for(name)
            try:
                return self._codes_of(name, clip).clone()
            except FileNotFoundError:
                continue
        raise UnknownVoiceError(f"voice {name!r} was deleted while it was being read")

    # -- changing -----------------------------------------------------------------------------------------------

    def add_voice(self, name: str, data: bytes, *, replace: bool = False) -> torch.Tensor:
        """Store `data` (an audio file's bytes) as voice `name` and return its prompt codes [T, n_vq].

        The clip is validated and encoded before anything is written to the folder; a refused clip leaves no trace.

        Raises:
            ValueError: a bad name, empty or oversized data, or audio that is not a usable prompt (unreadable,
                silent, shorter than one codec frame, or a container other than wav/flac/ogg/mp3).
            VoiceExistsError: the name exists and replace is False.
        """
        check_voice_name(name)
        if not replace and self._clips(name):
            raise VoiceExistsError(f"voice {name!r} already exists; delete it first or add it with replace=True")
        codes, suffix = self.encode_clip(data, f"voice {name!r}")
        data = bytes(data)
        metadata = self._metadata(hashlib.sha256(data).hexdigest())
        with self._lock, self._folder_lock():
            existing = self._clips(name)
            if existing and not replace:
                raise VoiceExistsError(f"voice {name!r} was added meanwhile; add it with replace=True to replace it")
            self._write_codes(name, metadata, codes)  # the cache first: a voice exists once its clip does
            clip = write_atomically(self.folder / f"{name}{suffix}",
                                    lambda temporary: Path(temporary).write_bytes(data))
            for old in existing:
                if old != clip:
                    old.unlink(missing_ok=True)
            self._codes[name] = (metadata, codes)
        logger.info("Added voice %r (%s, %d frames)", name, clip.name, codes.shape[0])
        return codes.clone()

    def delete_voice(self, name: str) -> None:
        """Remove the voice's clip(s) and cached codes.

        Raises:
            ValueError: a bad name; UnknownVoiceError when no clip has it.
        """
        check_voice_name(name)
        with self._lock, self._folder_lock():
            clips = self._clips(name)
            if not clips:
                raise self._unknown(name)
            for clip in clips:  # the clip first: without it the voice is gone, whatever happens next
                clip.unlink(missing_ok=True)
                self._hashes.pop(clip, None)
            self._codes_path(name).unlink(missing_ok=True)
            self._codes.pop(name, None)
        logger.info("Deleted voice %r", name)

    def encode_clip(self, data: bytes, label: str = "the clip") -> tuple[torch.Tensor, str]:
        """Validate and encode an audio file's bytes as a prompt, storing nothing (what add_voice checks; the
        server's per-request `ref_audio` too).

        Args:
            data: the file's bytes (at most max_upload_bytes).
            label: how messages name the audio, e.g. "voice 'alice'" or "ref_audio".

        Returns:
            (prompt codes [T, n_vq] int64, the clip's file suffix).

        Raises:
            ValueError: empty or oversized data, or audio that is not a usable prompt (unreadable, silent, shorter
                than one codec frame, or a container other than wav/flac/ogg/mp3).
        """
        data = self._check_upload(label, data)
        with tempfile.TemporaryDirectory(prefix="voice-upload-") as scratch:
            upload = Path(scratch) / "upload"
            upload.write_bytes(data)
            return self._encode_upload(upload, label)

    # -- the folder ---------------------------------------------------------------------------------------------

    def _scan(self) -> list[tuple[str, Path]]:
        """(name, clip) for every clip in the folder with a valid name, in file-name order."""
        found = []
        for entry in sorted(os.scandir(self.folder), key=lambda item: item.name):
            path = Path(entry.path)
            if entry.name.startswith(".") or path.suffix.lower() not in CLIP_SUFFIXES or not entry.is_file():
                continue
            if VOICE_NAME_PATTERN.fullmatch(path.stem):
                found.append((path.stem, path))
            else:
                self._warn_once(entry.name, "Ignoring %s in the voices folder %s: %r is not a valid voice name "
                                "(pattern %s)", entry.name, self.folder, path.stem, VOICE_NAME_PATTERN.pattern)
        return found

    def _clips(self, name: str) -> list[Path]:
        return [clip for found, clip in self._scan() if found == name]

    def _clip_for(self, name: str) -> Path:
        clips = self._clips(name)
        if not clips:
            raise self._unknown(name)
        if len(clips) > 1:
            self._warn_once(name, "Voice %r has several clips (%s); using %s", name,
                            ", ".join(clip.name for clip in clips), clips[0].name)
        return clips[0]

    def _unknown(self, name: str) -> UnknownVoiceError:
        voices = self.list_voices()
        return UnknownVoiceError(f"unknown voice {name!r}; expected one of: {', '.join(voices) or '(no voices yet)'}"
                                 f" (the clips in {self.folder})")

    def _codes_path(self, name: str) -> Path:
        return self.cache_folder / f"{name}{CODES_SUFFIX}"

    @contextlib.contextmanager
    def _folder_lock(self):
        """Exclusive lock on LOCK_FILE, so that processes sharing the folder add and delete one at a time."""
        if fcntl is None:
            yield
            return
        with open(self.folder / LOCK_FILE, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for entry in os.scandir(self.folder):
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                try:
                    if now - entry.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                        os.unlink(entry.path)
                        logger.info("Removed %s, left in %s by an interrupted write", entry.name, self.folder)
                except FileNotFoundError:
                    pass  # another store removed it first

    def _warn_once(self, key: str, message: str, *arguments) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *arguments)

    # -- codes --------------------------------------------------------------------------------------------------

    def _metadata(self, clip_sha256: str) -> dict:
        """The cache metadata that valid codes for a clip with this hash must carry (safetensors: str -> str)."""
        return {"format": CODES_FORMAT, "clip_sha256": clip_sha256, "codec": self.codec_id,
                "n_vq": str(self.n_vq), "pad_id": str(int(self.config.audio_pad_token_id))}

    def _clip_hash(self, clip: Path) -> str:
        """sha256 of the clip's bytes, re-read only when its size, mtime or inode changed."""
        status = clip.stat()
        signature = (status.st_size, status.st_mtime_ns, status.st_ino)
        with self._lock:
            known = self._hashes.get(clip)
        if known is not None and known[0] == signature:
            return known[1]
        with open(clip, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        with self._lock:
            self._hashes[clip] = (signature, digest)
        return digest

    def _cached(self, name: str, metadata: dict) -> Optional[torch.Tensor]:
        """Codes from memory or from the cache file when their metadata matches, else None."""
        with self._lock:
            remembered = self._codes.get(name)
        if remembered is not None and remembered[0] == metadata:
            return remembered[1]
        path = self._codes_path(name)
        try:
            with safe_open(str(path), framework="pt") as cache:
                if cache.metadata() != metadata:
                    return None
                return cache.get_tensor("codes")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            logger.warning("Ignoring the unreadable cache %s (%s); encoding voice %r again", path, error, name)
            return None

    def _codes_of(self, name: str, clip: Path) -> torch.Tensor:
        """The codes of `clip`: remembered, cached on disk, or encoded now (once, whatever the thread count)."""
        metadata = self._metadata(self._clip_hash(clip))
        codes = self._cached(name, metadata)
        if codes is None:
            with self._codec_lock:
                codes = self._cached(name, metadata)  # another thread may have encoded it meanwhile
                if codes is None:
                    codes = self._encode(clip, f"voice {name!r}")
                    self._write_codes(name, metadata, codes)
        with self._lock:
            self._codes[name] = (metadata, codes)
        return codes

    def _encode(self, clip: Path, label: str) -> torch.Tensor:
        logger.info("Encoding %s from %s", label, clip.name)
        with torch.no_grad():
            return encode_prompt_audio(self.codec, self.info, clip, self.config, self.n_vq).contiguous()

    def _encode_upload(self, upload: Path, label: str) -> tuple[torch.Tensor, str]:
        """(codes, clip suffix) of an uploaded clip; ValueError saying why it cannot be a prompt."""
        try:
            with self._codec_lock:
                codes = self._encode(upload, label)
        except ValueError as error:
            raise ValueError(f"the audio uploaded for {label} was refused: {error}") from error
        container = sf.info(str(upload)).format
        if container not in UPLOAD_SUFFIXES:
            raise ValueError(f"the audio uploaded for {label} is {container}; expected a wav, flac, ogg or mp3 file")
        return codes, UPLOAD_SUFFIXES[container]

    def _write_codes(self, name: str, metadata: dict, codes: torch.Tensor) -> None:
        write_atomically(self._codes_path(name),
                         lambda temporary: save_file({"codes": codes.contiguous()}, temporary, metadata=metadata))

    def _check_upload(self, label: str, data) -> bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"the audio for {label} must be bytes (an audio file's contents), got "
                             f"{type(data).__name__}")
        data = bytes(data)
        if not data:
            raise ValueError(f"the audio uploaded for {label} is empty (0 bytes)")
        if len(data) > self.max_upload_bytes:
            raise ValueError(f"the audio uploaded for {label} is {len(data)} bytes; expected at most "
                             f"{self.max_upload_bytes} (a voice needs a few seconds of speech)")
        return data


__all__ = [
    "MAX_UPLOAD_BYTES",
    "UnknownVoiceError",
    "VOICE_NAME_PATTERN",
    "VoiceExistsError",
    "VoiceStore",
    "check_voice_name",
    "codec_fingerprint",
]
