"""Reading reference (prompt) audio and writing generated audio, without torchaudio.

The codec behind MOSS-TTS-Nano works on 48 kHz stereo, so every prompt goes through the same path:

    file --soundfile--> float32 [C, N] at the file's rate
         --trim to max_seconds--> --channel conversion--> --soxr resampling--> float32 [channels, M] at target_rate

Choices, all documented here because they decide what the codec hears:

* Formats: whatever the installed libsndfile reads. The soundfile wheels bundle libsndfile 1.2.x, which reads WAV
  (PCM, float, WAVE_FORMAT_EXTENSIBLE), FLAC, OGG (Vorbis and Opus) and MP3 (MP3 needs libsndfile >= 1.1; a system
  libsndfile older than that rejects MP3 files with the "could not read" error below).
* Resampling: soxr with quality ``SOXR_QUALITY`` ("VHQ", very high quality, linear phase). The output length is the
  input length times target_rate / source_rate, rounded to the nearest integer (soxr's own rule), e.g. 44,100 samples
  at 44.1 kHz give 48,000 samples at 48 kHz.
* Channels: mono is repeated to both output channels; stereo is kept; more than two channels are down-mixed to the
  equal-weight average of all channels, which is then duplicated to both outputs. libsndfile does not report channel
  layouts, so no layout-specific (5.1 / 7.1) matrix is guessed. For a mono target every input is averaged.
* Length: prompts longer than ``max_seconds`` (default ``DEFAULT_MAX_SECONDS`` = 30 s) are trimmed to their first
  ``max_seconds`` with one WARNING (seen at the default log level); only that part is read from disk. The voice prompt
  is encoded whole and becomes 12.5 prompt frames per second, so a long prompt costs time and context without helping
  the voice.
* Rejected inputs (``ValueError`` naming the file): a missing path, a directory, an empty (0-byte) file, a file
  libsndfile cannot decode (garbage bytes, unsupported format), audio with no samples, audio containing NaN or Inf,
  and silence: every sample below ``SILENCE_PEAK`` (1e-3, i.e. -60 dBFS) in magnitude.

Writing (``save_audio``) produces WAV (or FLAC) atomically: the data goes to a temporary file in the destination folder,
which then replaces the destination with ``os.replace``; a failure leaves no partial output file. 16-bit output is
clipped to [-1, 1] first (libsndfile's float-to-int conversion does not clip), with a warning when clipping happened.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

import numpy as np
import soundfile as sf
import soxr
import torch

logger = logging.getLogger(__name__)

DEFAULT_TARGET_RATE = 48000
DEFAULT_CHANNELS = 2
# Prompts longer than this are trimmed (a voice prompt of 5 to 15 s is typical; 30 s = 375 codec frames).
DEFAULT_MAX_SECONDS = 30.0
# Peak magnitude below which audio counts as silence: -60 dBFS (a 16-bit LSB is 3e-5, about -90 dBFS).
SILENCE_PEAK = 1e-3
# soxr quality recipe: "VHQ" = very high quality (best stop-band rejection of soxr's presets, linear phase).
SOXR_QUALITY = "VHQ"
# Subtypes save_audio writes, and the containers chosen by the output suffix.
WRITE_SUBTYPES = ("PCM_16", "FLOAT")
WRITE_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
# More channels than this in a 2-D waveform almost certainly means a [N, C] array passed as [C, N].
MAX_CHANNELS = 16

PathLike = Union[str, os.PathLike]
ArrayLike = Union[np.ndarray, torch.Tensor]


def load_audio(
    path: PathLike,
    target_rate: int = DEFAULT_TARGET_RATE,
    channels: int = DEFAULT_CHANNELS,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> torch.Tensor:
    """Read an audio file and return it at ``target_rate`` with ``channels`` channels.

    Args:
        path: a wav/flac/ogg/mp3 file (anything the installed libsndfile reads), any rate and channel count.
        target_rate: output sample rate in Hz (48000 for the MOSS codec).
        channels: output channel count, 1 or 2 (see the module docstring for the down-mix rule).
        max_seconds: keep at most this many seconds from the start (logged when trimming); None keeps everything.

    Returns:
        float32 tensor [channels, M] on the CPU, M = round(kept_samples * target_rate / source_rate).

    Raises:
        ValueError: naming the file, when it is missing, a directory, empty, unreadable, has no samples, contains
            NaN/Inf or is silent; or naming the argument, when target_rate / channels / max_seconds are invalid.
    """
    path = _check_audio_path(path)
    check_rate(target_rate, "target_rate")
    _check_channel_count(channels)
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")
    samples, sample_rate = _read_samples(path, max_seconds)
    _check_audible(samples, path)
    return torch.from_numpy(prepare_waveform(samples, sample_rate, target_rate, channels))


def prepare_waveform(
    waveform: ArrayLike,
    sample_rate: int,
    target_rate: int = DEFAULT_TARGET_RATE,
    channels: int = DEFAULT_CHANNELS,
) -> np.ndarray:
    """Convert an in-memory waveform to ``channels`` channels at ``target_rate`` (the load_audio path without I/O).

    Args:
        waveform: [C, N] or [N] samples (numpy or torch, any float dtype), C <= MAX_CHANNELS.
        sample_rate: rate of ``waveform`` in Hz.
        target_rate: output rate in Hz.
        channels: output channel count, 1 or 2.

    Returns:
        float32 C-contiguous array [channels, M], M = round(N * target_rate / sample_rate).
    """
    check_rate(sample_rate, "sample_rate")
    check_rate(target_rate, "target_rate")
    _check_channel_count(channels)
    samples = as_channels_first(waveform, "waveform")
    # Mix down before resampling and repeat after it, so soxr never works on more channels than needed.
    if samples.shape[0] > channels:
        samples = convert_channels(samples, channels)
    samples = resample(samples, sample_rate, target_rate)
    return np.ascontiguousarray(convert_channels(samples, channels))


def convert_channels(samples: np.ndarray, channels: int) -> np.ndarray:
    """Map [C, N] samples to [channels, N]: repeat mono, keep equal counts, else average all channels.

    Args:
        samples: float array [C, N].
        channels: 1 or 2.

    Returns:
        float32 array [channels, N].
    """
    _check_channel_count(channels)
    count = samples.shape[0]
    if count == channels:
        return samples.astype(np.float32, copy=False)
    if count == 1:
        return np.repeat(samples, channels, axis=0).astype(np.float32, copy=False)
    # Equal-weight average (no layout is known, see the module docstring), duplicated to every output channel.
    mixed = samples.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    return np.repeat(mixed, channels, axis=0)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample [C, N] float samples with soxr (quality ``SOXR_QUALITY``); identity when the rates match.

    Returns:
        float32 array [C, M], M = round(N * target_rate / source_rate).
    """
    samples = np.asarray(samples, dtype=np.float32)
    if source_rate == target_rate:
        return samples
    # soxr wants [N, C] (frames first).
    resampled = soxr.resample(np.ascontiguousarray(samples.T), source_rate, target_rate, quality=SOXR_QUALITY)
    return np.ascontiguousarray(resampled.T, dtype=np.float32)


def save_audio(
    path: PathLike,
    waveform: ArrayLike,
    sample_rate: int,
    subtype: str = "PCM_16",
) -> Path:
    """Write a waveform atomically as WAV (or FLAC for a ``.flac`` path), creating missing parent folders.

    Args:
        path: destination ending in .wav (or .flac, 16-bit only).
        waveform: [C, N] or [N] samples in [-1, 1] (numpy or torch, any float dtype; moved to the CPU).
        sample_rate: rate in Hz.
        subtype: "PCM_16" (clips to [-1, 1], warning when it clips) or "FLOAT" (32-bit float, unclipped).

    Returns:
        The written path.

    Raises:
        ValueError: for an unsupported suffix or subtype, a bad rate, an empty waveform, NaN/Inf samples or a
            waveform that is not [C, N] / [N].
    """
    path = Path(path)
    file_format = _check_output(path, subtype)
    check_rate(sample_rate, "sample_rate")
    samples = as_channels_first(waveform, f"waveform for {path}")
    if samples.shape[1] == 0:
        raise ValueError(f"refusing to write {path}: the waveform has no samples (shape {tuple(samples.shape)})")
    if not np.isfinite(samples).all():
        raise ValueError(f"refusing to write {path}: the waveform contains NaN or Inf samples")
    if subtype == "PCM_16":
        samples = _clip_for_pcm(samples, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: sf.write(temporary, samples.T, sample_rate, subtype=subtype,
                                                       format=file_format))
    return path


def _check_audio_path(path: PathLike) -> Path:
    """The path as a Path, or ValueError when it cannot hold audio (missing, a folder, 0 bytes)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"audio file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"audio path {path} is a directory; expected an audio file (wav/flac/ogg/mp3)")
    if path.stat().st_size == 0:
        raise ValueError(f"audio file {path} is empty (0 bytes)")
    return path


def _read_samples(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode at most max_seconds of ``path``; returns (float32 [C, N], sample_rate)."""
    try:
        with sf.SoundFile(str(path)) as audio_file:
            sample_rate, total = audio_file.samplerate, audio_file.frames
            keep = total if max_seconds is None else min(total, int(max_seconds * sample_rate))
            frames = audio_file.read(frames=keep, dtype="float32", always_2d=True)  # [N, C]
    except (sf.SoundFileError, RuntimeError, OSError) as error:
        mp3_note = "" if "MP3" in sf.available_formats() else " (this libsndfile cannot read MP3; it needs >= 1.1)"
        raise ValueError(
            f"could not read audio file {path}: {str(error).rstrip('.')}. "
            f"Expected a wav, flac, ogg or mp3 file{mp3_note}"
        ) from error
    if keep < total:
        logger.warning(
            "Prompt audio %s is %.2f s long; using its first %.2f s (the cap on reference audio; 5 to 15 s of clean "
            "speech is typical)", path, total / sample_rate, keep / sample_rate,
        )
    return np.ascontiguousarray(frames.T), sample_rate


def _check_audible(samples: np.ndarray, path: Path) -> None:
    """Reject audio without samples, with NaN/Inf, or whose peak is below SILENCE_PEAK."""
    if samples.size == 0:
        raise ValueError(f"audio file {path} contains no audio samples")
    peak = float(np.max(np.abs(samples)))
    if not np.isfinite(peak):
        raise ValueError(f"audio file {path} contains NaN or Inf samples")
    if peak < SILENCE_PEAK:
        raise ValueError(
            f"audio file {path} is silent: its peak magnitude {peak:.2e} is below {SILENCE_PEAK:g} (-60 dBFS); "
            "a voice prompt needs audible speech"
        )


def as_channels_first(waveform: ArrayLike, what: str) -> np.ndarray:
    """float32 numpy [C, N] from a [C, N] or [N] numpy array or tensor; ValueError naming ``what`` otherwise."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().to(device="cpu", dtype=torch.float32).numpy()
    samples = np.asarray(waveform, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[None, :]
    if samples.ndim != 2 or samples.shape[0] > MAX_CHANNELS:
        raise ValueError(
            f"{what} must have shape [channels, samples] or [samples] with at most {MAX_CHANNELS} channels, "
            f"got shape {tuple(samples.shape)} (a [samples, channels] array needs transposing)"
        )
    return samples


def check_rate(rate: int, name: str) -> None:
    """ValueError naming ``name`` unless ``rate`` is a positive integer number of Hz."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{name} must be a positive integer number of Hz, got {rate!r}")


def _check_channel_count(channels: int) -> None:
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels!r}")


def _check_output(path: Path, subtype: str) -> str:
    """The soundfile container for ``path``; ValueError for an unknown suffix, subtype or a FLAC float request."""
    if subtype not in WRITE_SUBTYPES:
        raise ValueError(f"subtype must be one of {WRITE_SUBTYPES}, got {subtype!r}")
    file_format = WRITE_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise ValueError(f"output path {path} must end in one of {tuple(WRITE_FORMATS)}")
    if file_format == "FLAC" and subtype != "PCM_16":
        raise ValueError(f"FLAC output {path} supports subtype 'PCM_16' only, got {subtype!r}")
    if path.is_dir():
        raise ValueError(f"output path {path} is a directory; expected a file name")
    return file_format


def _clip_for_pcm(samples: np.ndarray, path: Path) -> np.ndarray:
    """Clip to [-1, 1] for integer output, with one warning saying how much was clipped."""
    outside = int(np.count_nonzero(np.abs(samples) > 1.0))
    if outside == 0:
        return samples
    logger.warning(
        "Clipping %d of %d samples of %s to [-1, 1] for 16-bit output (peak %.3f); use subtype='FLOAT' to keep them",
        outside, samples.size, path, float(np.max(np.abs(samples))),
    )
    return np.clip(samples, -1.0, 1.0)


OUTPUT_FILE_MODE = 0o644


class PendingFile:
    """A hidden temporary file beside ``path`` that becomes ``path`` only when it is complete.

    Write to ``temporary``; ``commit()`` flushes it to disk (fsync), gives it ``mode`` (mkstemp creates 0600; outputs
    are ordinary files) and renames it over ``path`` (``os.replace``, atomic within one file system); ``discard()``
    deletes it. Readers see the old file or the complete new one, never a part, and a killed process leaves at most a
    hidden ``.<name>.*<suffix>`` file. The one implementation of atomic writing: `write_atomically`,
    `ProgressiveWavWriter`, voice_library/store.py and weights.py all go through it.

    Args:
        path: the destination; its folder must exist.
        mode: permission bits of the committed file.
        suffix: of the temporary name (weights.py uses ".part", which git ignores).
    """

    def __init__(self, path: PathLike, mode: int = OUTPUT_FILE_MODE, suffix: str = ".tmp") -> None:
        self.path, self.mode = Path(path), mode
        handle, self.temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=suffix)
        os.close(handle)

    def commit(self) -> Path:
        """Move the finished temporary file to ``path``; returns ``path``."""
        with open(self.temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(self.temporary, self.mode)
        os.replace(self.temporary, self.path)
        return self.path

    def discard(self) -> None:
        """Delete the temporary file (``path`` is left as it was)."""
        Path(self.temporary).unlink(missing_ok=True)


def write_atomically(path: PathLike, write: Callable[[str], None], mode: int = OUTPUT_FILE_MODE,
                     suffix: str = ".tmp") -> Path:
    """Create or replace ``path`` so that readers see the old file or the complete new one, never a part.

    ``write(temporary)`` fills a `PendingFile` beside ``path``, which is committed when ``write`` returns and
    discarded when it raises (or the process is interrupted).

    Returns:
        ``path`` as a Path.
    """
    pending = PendingFile(path, mode, suffix)
    try:
        write(pending.temporary)
        return pending.commit()
    except BaseException:
        pending.discard()
        raise


class ProgressiveWavWriter:
    """Writes a 16-bit WAV (or FLAC) piece by piece into a `PendingFile`: `close` puts it in place, `abort` deletes
    it, so a failed stream never leaves a partial output file.

    Args:
        path: destination ending in one of WRITE_FORMATS (its folder is created).
        sample_rate: rate in Hz.
        channels: channel count of every piece.
    """

    def __init__(self, path: PathLike, sample_rate: int, channels: int) -> None:
        self.path = Path(path)
        file_format = _check_output(self.path, "PCM_16")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pending = PendingFile(self.path)
        self._file = sf.SoundFile(self._pending.temporary, "w", samplerate=int(sample_rate), channels=channels,
                                  subtype="PCM_16", format=file_format)
        self.clipped = 0

    def write(self, waveform: ArrayLike) -> None:
        """Append [C, n] float samples (clipped to [-1, 1] for 16-bit, with one warning at close)."""
        samples = as_channels_first(waveform, f"waveform for {self.path}")
        self.clipped += int(np.count_nonzero(np.abs(samples) > 1.0))
        self._file.write(np.clip(samples, -1.0, 1.0).T)

    def close(self) -> str:
        """Finish the file and move it to its destination; returns the path."""
        self._file.close()
        if self.clipped:
            logger.warning("Clipped %d samples of %s to [-1, 1] for 16-bit output", self.clipped, self.path)
        return str(self._pending.commit())

    def abort(self) -> None:
        """Drop the partial file."""
        if not self._file.closed:
            self._file.close()
        self._pending.discard()
