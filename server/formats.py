"""Generated audio to the OpenAI speech API's `response_format`s, as a whole file or streamed chunk by chunk.

Input: float32 waveforms [channels, samples] (the codec's 48 kHz stereo; any rate and 1 or 2 channels work).

    name  what the bytes are                                             content type  written by
    wav   RIFF/WAVE, 16-bit PCM                                          audio/wav     this module (header + pcm)
    pcm   16-bit signed little-endian, channels interleaved (L R L R),   audio/pcm     this module
          no header: the rate and channel count travel out of band
    flac  FLAC, 16-bit                                                   audio/flac    libsndfile
    mp3   MPEG-1 Layer III, constant 160 kbit/s at 48 kHz                audio/mpeg    libsndfile (LAME)
    opus  Ogg Opus, libsndfile's default bit rate (~125 kbit/s stereo)   audio/ogg     libsndfile (libopus)
    aac   AAC-LC in ADTS frames (FFmpeg's encoder, its default bit rate) audio/aac     PyAV (FFmpeg), when installed

libsndfile is the one inside the pinned soundfile wheel (1.2.2, which writes MP3 and Ogg Opus); it has no AAC
encoder. AAC comes from PyAV (requirements.txt pins av 18.1.0, wheels bundling FFmpeg); where PyAV does not import,
`aac` is refused with a ValueError naming the supported formats. ADTS frames carry their own headers, so a streamed
aac is byte for byte the whole file; decoders play the encoder's priming first (AAC_LEAD_SAMPLES) and pad the end to
a whole frame (AAC_FRAME_SAMPLES).

Rate and channels (`output_layout`, `LayoutConverter`). OpenAI documents `pcm` as 24 kHz mono 16-bit little-endian,
so `pcm` defaults to PCM_DEFAULT_RATE mono; every other format defaults to the codec's native 48 kHz stereo. Any format
may ask for a rate from MIN_RATE to MAX_RATE and 1 or 2 channels (mp3 and opus only at the rates their encoders take:
MP3_RATES, OPUS_RATES). Mono is the mean of the two channels, stereo from mono repeats it. Rates are converted with
soxr's stateful ResampleStream, so a stream converted chunk by chunk gives exactly the samples (and the count,
samples x rate / 48000) of the whole: its first chunks come out a few ms late and `flush` returns the tail.

Samples are clipped to [-1, 1] (one warning per stream says how many were clipped) and quantised as libsndfile does,
value * 32767 rounded to nearest, so pcm, wav and flac carry the same 16-bit samples.

Streaming (`StreamingEncoder`): `encode(chunk)` returns the bytes ready so far, `finish()` the rest. Containers that
record totals in their header cannot do that in a stream, whose first bytes are sent before the total is known:
* wav: the streamed header declares RIFF and data sizes of 0xFFFFFFFF, the largest value the 32-bit fields hold,
  meaning "up to the end of the stream": libsndfile and Python's `wave` read such a stream to its end (tested), where
  a size of 0 would make a strict reader see no audio. The whole file has the exact sizes; all other bytes are equal.
* pcm: streamed bytes equal the whole file's.
* flac: libsndfile completes STREAMINFO (total samples, MD5, frame sizes) at close by seeking back. A stream keeps
  what was written first: total samples 0 ("unknown") and MD5 0 ("not computed"), which the FLAC format allows.
  Every other byte equals the whole file's. The reference decoder (flac 1.4.2) decodes such a stream to the same
  samples as the whole file, warning that the MD5 is unset; libsndfile 1.2.2 cannot read it to its end (it reports
  2**63 - 1 frames and fails at the end of the data).
* mp3: libsndfile reserves the first frame for LAME's "Info" tag and fills it in at close. Streamed, the frame stays
  empty and decodes as 1152 samples of silence; so that the whole file decodes exactly like the stream, whole-file
  mp3 is written the same way and the two are byte-identical. Decoders then also play the encoder's delay and
  padding: the audio starts MP3_LEAD_SAMPLES late and the decoded length is the input's plus MP3_LEAD_SAMPLES plus
  at most one frame (1152 samples). Constant bit rate, because without the Info tag a variable-rate file's length
  is guessed from its first frame (libsndfile decoded only 40% of a variable-rate test file).
* opus: Ogg pages carry their own positions and nothing is rewritten. Pages are flushed every
  OPUS_PAGE_MILLISECONDS (libsndfile's minimum; its default of 1000 ms would hold back the first second). Each
  encoding picks a random Ogg stream serial number, so two encodings differ in those bytes but decode identically.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
import soundfile as sf
import soxr

try:  # optional: PyAV writes aac (FFmpeg's encoder); without it aac is refused
    import av
except ImportError:  # pragma: no cover - av is in requirements.txt
    av = None

from ..audio_io import DEFAULT_CHANNELS, DEFAULT_TARGET_RATE, ArrayLike, as_channels_first, check_rate

logger = logging.getLogger(__name__)

# libsndfile's float -> 16-bit scale (SFC_SET_NORM_FLOAT default), used for pcm and wav too.
PCM_SCALE = 32767
PCM_SAMPLE_BYTES = 2
# Streamed WAV header: RIFF and data sizes unknown, declared as the 32-bit maximum (see the module docstring).
WAV_UNKNOWN_SIZE = 0xFFFFFFFF
WAV_HEADER_BYTES = 44
# libsndfile maps compression level 0..1 to LAME bit rates 320..32 kbit/s; 0.5 = 160 kbit/s at 48 kHz (measured).
MP3_COMPRESSION_LEVEL = 0.5
# What a decoder adds before the audio of our mp3 (the empty tag frame + LAME's encoder delay), measured.
MP3_LEAD_SAMPLES = 2257
MP3_FRAME_SAMPLES = 1152
# Ogg page flush interval for streamed Opus; 50 ms is the lowest libsndfile accepts.
OPUS_PAGE_MILLISECONDS = 50.0
# sndfile.h command code that soundfile 0.14 does not wrap (see _set_ogg_page_latency).
SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302
# Output rates and channels a request may ask for (see "Rate and channels" above).
MIN_RATE, MAX_RATE = 8000, 48000
PCM_DEFAULT_RATE, PCM_DEFAULT_CHANNELS = 24000, 1
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
AAC_RATES = MP3_RATES  # AAC takes the same MPEG family of rates
# What a decoder plays before the audio of our aac (FFmpeg's encoder priming), and the frame it pads the end to.
AAC_LEAD_SAMPLES = 1024
AAC_FRAME_SAMPLES = 1024
RESAMPLER_QUALITY = "HQ"


@dataclass(frozen=True)
class AudioFormat:
    """One `response_format`: its HTTP content type and how libsndfile writes it (container None: written here).

    `finish_header`: whole-file bytes get the header fields libsndfile completes when the file is closed.
    `options`: extra soundfile.SoundFile keyword arguments, as (name, value) pairs.
    """

    name: str
    content_type: str
    container: Optional[str] = None
    subtype: Optional[str] = None
    finish_header: bool = False
    options: tuple = ()


FORMATS = {
    audio.name: audio
    for audio in (
        AudioFormat("wav", "audio/wav"),
        AudioFormat("pcm", "audio/pcm"),
        AudioFormat("flac", "audio/flac", "FLAC", "PCM_16", finish_header=True),
        AudioFormat("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III",
                    options=(("bitrate_mode", "CONSTANT"), ("compression_level", MP3_COMPRESSION_LEVEL))),
        AudioFormat("opus", "audio/ogg", "OGG", "OPUS"),
    )
}
if av is not None:
    FORMATS["aac"] = AudioFormat("aac", "audio/aac", "ADTS")
SUPPORTED_FORMATS = tuple(FORMATS)
# Formats of the OpenAI API that this server refuses, with the reason given to the client.
REFUSED_FORMATS = {} if av is not None else {
    "aac": "no AAC encoder is installed (libsndfile has none; install PyAV, av==18.1.0 in requirements.txt)",
}


def audio_format(response_format: str) -> AudioFormat:
    """The AudioFormat called `response_format`.

    Raises:
        ValueError: naming the value and the supported formats (and why, for `aac`).
    """
    if isinstance(response_format, str) and response_format in FORMATS:
        return FORMATS[response_format]
    reason = REFUSED_FORMATS.get(response_format) if isinstance(response_format, str) else None
    because = f" ({reason})" if reason else ""
    raise ValueError(f"response_format={response_format!r} is not supported{because}; expected one of "
                     f"{', '.join(SUPPORTED_FORMATS)}")


def output_layout(response_format: str, sample_rate: Optional[int], channels: Optional[int],
                  native_rate: int = DEFAULT_TARGET_RATE, native_channels: int = DEFAULT_CHANNELS) -> tuple[int, int]:
    """(rate, channels) a response in `response_format` is sent at: what the request asked for, else the format's
    default (pcm: 24 kHz mono as OpenAI documents it; the others: the native layout).

    Raises:
        ValueError: naming `sample_rate` or `channels` and what was expected.
    """
    pcm = audio_format(response_format).name == "pcm"
    rate = sample_rate if sample_rate is not None else (PCM_DEFAULT_RATE if pcm else native_rate)
    count = channels if channels is not None else (PCM_DEFAULT_CHANNELS if pcm else native_channels)
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"sample_rate={rate!r}; expected an integer from {MIN_RATE} to {MAX_RATE} Hz")
    if count not in (1, 2) or isinstance(count, bool):
        raise ValueError(f"channels={count!r}; expected 1 (mono) or 2 (stereo)")
    allowed = {"mp3": MP3_RATES, "opus": OPUS_RATES, "aac": AAC_RATES}.get(response_format)
    if allowed is not None and rate not in allowed:
        raise ValueError(f"sample_rate={rate} is not one {response_format} can carry; expected one of "
                         f"{', '.join(map(str, allowed))}")
    return rate, count


class LayoutConverter:
    """Chunks [source_channels, n] at source_rate -> [channels, m] at rate, streaming-safe (one soxr stream).

    Example:
        converter = LayoutConverter(48000, 2, 24000, 1)
        for chunk in chunks:
            send(converter.process(chunk))
        send(converter.flush())
    """

    def __init__(self, source_rate: int, source_channels: int, rate: int, channels: int) -> None:
        if channels not in (1, 2) or source_channels not in (1, 2):
            raise ValueError(f"channels {source_channels} -> {channels}; expected 1 or 2 on both sides")
        self.channels = channels
        self._resampler = (soxr.ResampleStream(source_rate, rate, channels, dtype="float32",
                                               quality=RESAMPLER_QUALITY) if rate != source_rate else None)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Converted samples [channels, m] (m may be 0 while the resampler fills)."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.shape[0] != self.channels:
            samples = samples.mean(axis=0, keepdims=True) if self.channels == 1 else np.repeat(samples, 2, axis=0)
        if self._resampler is None:
            return samples
        return self._resampler.resample_chunk(np.ascontiguousarray(samples.T)).T

    def flush(self) -> np.ndarray:
        """The resampler's tail [channels, m], at the end of the stream."""
        if self._resampler is None:
            return np.zeros((self.channels, 0), np.float32)
        return self._resampler.resample_chunk(np.zeros((0, self.channels), np.float32), last=True).T


def encode_audio(waveform: ArrayLike, response_format: str, sample_rate: int = DEFAULT_TARGET_RATE) -> bytes:
    """Encode a whole waveform as one file.

    Args:
        waveform: [channels, samples] or [samples] float audio in [-1, 1] (numpy or torch), 1 or 2 channels.
        response_format: one of SUPPORTED_FORMATS.
        sample_rate: rate of `waveform` in Hz.

    Returns:
        The file's bytes (see the module docstring for how they relate to a stream of the same audio).

    Raises:
        ValueError: unsupported format, bad rate, more than 2 channels, no samples, or NaN/Inf samples.
    """
    samples = as_channels_first(waveform, "waveform")
    if samples.shape[1] == 0:  # flac and mp3 would give 0 bytes, not a file
        raise ValueError(f"refusing to encode an empty waveform (shape {tuple(samples.shape)}) as {response_format!r}")
    encoder = StreamingEncoder(response_format, sample_rate, samples.shape[0], whole_file=True)
    return encoder.encode(samples) + encoder.finish()


def pcm16_bytes(samples: np.ndarray) -> bytes:
    """[C, N] float samples -> 16-bit little-endian bytes, channels interleaved, clipped to [-1, 1]."""
    quantised = np.rint(np.clip(samples, -1.0, 1.0) * PCM_SCALE).astype("<i2")  # [C, N]
    return np.ascontiguousarray(quantised.T).tobytes()  # [N, C] row-major = L R L R ...


def wav_header(sample_rate: int, channels: int, data_bytes: Optional[int]) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV file; `data_bytes` None = unknown length (a stream).

    Raises:
        ValueError: when `data_bytes` does not fit the 32-bit size fields (about 6.2 hours at 48 kHz stereo).
    """
    if data_bytes is None:
        riff_size = data_size = WAV_UNKNOWN_SIZE
    elif data_bytes + WAV_HEADER_BYTES - 8 > WAV_UNKNOWN_SIZE:
        raise ValueError(f"{data_bytes} bytes of audio do not fit in a WAV file (at most {WAV_UNKNOWN_SIZE - 36}); "
                         "use response_format 'pcm' or 'flac'")
    else:
        riff_size, data_size = data_bytes + WAV_HEADER_BYTES - 8, data_bytes
    block = channels * PCM_SAMPLE_BYTES
    fmt_chunk = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
    return struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE") + fmt_chunk + struct.pack("<4sI", b"data", data_size)


class StreamingEncoder:
    """Encodes audio chunk by chunk; the concatenation of everything returned is the encoded stream.

    Example:
        encoder = StreamingEncoder("mp3")
        for chunk in chunks:              # float32 [2, n] at 48 kHz
            send(encoder.encode(chunk))   # may be b"" while the encoder buffers (mp3/flac frames, Ogg pages)
        send(encoder.finish())

    Args:
        response_format: one of SUPPORTED_FORMATS.
        sample_rate: rate of the chunks in Hz.
        channels: 1 or 2.
        whole_file: the bytes are used only once complete (what `encode_audio` does), so header fields that are
            known only at the end are filled in (wav sizes, FLAC STREAMINFO); `encode` then returns b"" and
            `finish` everything.

    Raises:
        ValueError: unsupported format, bad rate or channel count.
    """

    def __init__(self, response_format: str, sample_rate: int = DEFAULT_TARGET_RATE,
                 channels: int = DEFAULT_CHANNELS, *, whole_file: bool = False):
        self.format = audio_format(response_format)
        check_rate(sample_rate, "sample_rate")
        if channels not in (1, 2):
            raise ValueError(f"channels={channels!r}; expected 1 or 2")
        self.sample_rate, self.channels = int(sample_rate), channels
        self.samples_encoded = 0
        self._clipped = 0
        self._finished = False
        if self.format.container is None:
            self._writer = _PcmWriter(self.format.name == "wav", self.sample_rate, channels, whole_file)
        elif self.format.container == "ADTS":
            self._writer = _AacWriter(self.sample_rate, channels, whole_file)
        else:
            self._writer = _SoundFileWriter(self.format, self.sample_rate, channels, whole_file)

    @property
    def content_type(self) -> str:
        return self.format.content_type

    def encode(self, chunk: ArrayLike) -> bytes:
        """Add [channels, n] float samples; returns the bytes that became ready (possibly b"").

        Raises:
            ValueError: a chunk with another channel count, or with NaN/Inf samples.
            RuntimeError: after `finish` or `close`.
        """
        if self._finished:
            raise RuntimeError("this StreamingEncoder is finished; create a new one for another stream")
        samples = self._checked(chunk)
        self.samples_encoded += samples.shape[1]
        return self._writer.write(samples) if samples.shape[1] else b""

    def finish(self) -> bytes:
        """End the stream; returns the remaining bytes (trailing frames, pages or the whole file)."""
        if self._finished:
            raise RuntimeError("this StreamingEncoder is already finished")
        self._finished = True
        if self._clipped:
            logger.warning("Clipped %d of %d %s samples to [-1, 1]", self._clipped,
                           self.samples_encoded * self.channels, self.format.name)
        return self._writer.close()

    def close(self) -> None:
        """Abandon the stream (e.g. the client went away) and release the encoder; no-op once finished."""
        if not self._finished:
            self._finished = True
            self._writer.close()

    def _checked(self, chunk: ArrayLike) -> np.ndarray:
        samples = as_channels_first(chunk, f"{self.format.name} audio chunk")
        if samples.shape[0] != self.channels:
            raise ValueError(f"audio chunk has {samples.shape[0]} channels (shape {tuple(samples.shape)}); this "
                             f"encoder was opened for {self.channels}")
        if not np.isfinite(samples).all():
            raise ValueError(f"audio chunk of shape {tuple(samples.shape)} contains NaN or Inf samples")
        self._clipped += int(np.count_nonzero(np.abs(samples) > 1.0))
        return samples


class _PcmWriter:
    """pcm, and wav = a 44-byte header before the same bytes (exact sizes only for a whole file)."""

    def __init__(self, with_header: bool, sample_rate: int, channels: int, whole_file: bool):
        self._with_header, self._whole_file = with_header, whole_file
        self._sample_rate, self._channels = sample_rate, channels
        self._pending = bytearray()
        if with_header and not whole_file:
            self._pending += wav_header(sample_rate, channels, None)

    def write(self, samples: np.ndarray) -> bytes:
        self._pending += pcm16_bytes(samples)
        return b"" if self._whole_file else self._take()

    def close(self) -> bytes:
        if self._with_header and self._whole_file:
            self._pending[:0] = wav_header(self._sample_rate, self._channels, len(self._pending))
        return self._take()

    def _take(self) -> bytes:
        data = bytes(self._pending)
        self._pending.clear()
        return data


class _SoundFileWriter:
    """flac, mp3 and opus through libsndfile, writing into a _ByteSink instead of a file."""

    def __init__(self, audio: AudioFormat, sample_rate: int, channels: int, whole_file: bool):
        self._whole_file = whole_file
        self._sink = _ByteSink(rewritable=whole_file and audio.finish_header)
        self._file = sf.SoundFile(self._sink, "w", samplerate=sample_rate, channels=channels,
                                  format=audio.container, subtype=audio.subtype, **dict(audio.options))
        if audio.subtype == "OPUS":
            _set_ogg_page_latency(self._file, OPUS_PAGE_MILLISECONDS)

    def write(self, samples: np.ndarray) -> bytes:
        self._file.write(np.ascontiguousarray(np.clip(samples, -1.0, 1.0).T))
        return b"" if self._whole_file else self._sink.take()

    def close(self) -> bytes:
        if not self._file.closed:
            self._file.close()
        return self._sink.take()


class _AacWriter:
    """aac through PyAV: FFmpeg's AAC encoder muxed as ADTS into a _ByteSink (append-only: ADTS never seeks)."""

    def __init__(self, sample_rate: int, channels: int, whole_file: bool):
        self._whole_file, self._rate = whole_file, sample_rate
        self._layout = "mono" if channels == 1 else "stereo"
        self._sink = _ByteSink(rewritable=False)
        self._container = av.open(self._sink, "w", format="adts")
        self._stream = self._container.add_stream("aac", rate=sample_rate, layout=self._layout)

    def write(self, samples: np.ndarray) -> bytes:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.clip(samples, -1.0, 1.0), dtype=np.float32),
                                           format="fltp", layout=self._layout)
        frame.sample_rate = self._rate
        self._mux(frame)
        return b"" if self._whole_file else self._sink.take()

    def close(self) -> bytes:
        if self._container is not None:
            self._mux(None)
            self._container.close()
            self._container = None
        return self._sink.take()

    def _mux(self, frame) -> None:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)


class _ByteSink:
    """The file object libsndfile writes to (soundfile's virtual I/O), handing out the bytes as they come.

    rewritable=True: a plain in-memory file; libsndfile's closing seek-back rewrites are applied (whole files).
    rewritable=False: append-only; bytes once written are final, so a rewrite of earlier bytes is dropped (streams;
    see the module docstring for what each format then keeps).
    """

    def __init__(self, rewritable: bool):
        self._rewritable = rewritable
        self._pending = bytearray()  # bytes [self._taken, self._length) of the file
        self._taken = 0
        self._length = 0
        self._position = 0

    def write(self, data: bytes) -> int:
        count = len(data)
        start, end = self._position, self._position + count
        if start < self._length and not self._rewritable:
            data, start = data[self._length - start:], self._length
        if start > self._length:  # a seek past the end; libsndfile does not do it, pad as a file would
            self._pending += bytes(start - self._length)
        offset = start - self._taken
        if offset < 0:
            raise RuntimeError("libsndfile rewrote bytes that were already handed out")
        self._pending[offset:offset + len(data)] = data
        self._length = max(self._length, end)
        self._position = end
        return count

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._length}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        return b""  # libsndfile does not read files it writes

    def take(self) -> bytes:
        """The bytes written since the last take."""
        data = bytes(self._pending)
        self._pending.clear()
        self._taken = self._length
        return data


def _set_ogg_page_latency(sound_file: sf.SoundFile, milliseconds: float) -> None:
    """Flush Ogg Opus pages every `milliseconds` (libsndfile's default is 1000 ms).

    Why: soundfile 0.14 exposes no wrapper for SFC_SET_OGG_PAGE_LATENCY_MS, so the command goes through soundfile's
    own cffi handles (`_snd`, `_ffi`, `SoundFile._file`). Remove when soundfile wraps the command. If those private
    names change, streaming Opus still works with 1-second pages (logged).
    """
    try:
        value = sf._ffi.new("double*", milliseconds)
        status = sf._snd.sf_command(sound_file._file, SFC_SET_OGG_PAGE_LATENCY_MS, value, sf._ffi.sizeof("double"))
    except AttributeError as error:
        logger.warning("Could not set the Ogg page latency (%s); streamed opus arrives in 1-second pages", error)
        return
    if status != 0:
        logger.warning("libsndfile refused an Ogg page latency of %.0f ms (status %d); streamed opus arrives in "
                       "1-second pages", milliseconds, status)


__all__ = [
    "AAC_LEAD_SAMPLES",
    "AudioFormat",
    "FORMATS",
    "LayoutConverter",
    "PCM_DEFAULT_CHANNELS",
    "PCM_DEFAULT_RATE",
    "REFUSED_FORMATS",
    "SUPPORTED_FORMATS",
    "StreamingEncoder",
    "audio_format",
    "encode_audio",
    "output_layout",
    "pcm16_bytes",
    "wav_header",
]
