"""audio_formats: every response_format decodes back, streams decode like whole files, pcm layout, refusals."""

import io
import logging
import re
import struct
import wave

import numpy as np
import pytest
import soundfile as sf

from conftest import import_module

audio_formats = import_module("server.formats")

RATE = 48000
# A length that is not a multiple of any codec frame, so padding shows.
LENGTH = 48000 + 1234
LOSSY = ("mp3", "opus", "aac")
# Decoders play an encoder delay before the audio and pad the end to a whole frame: (lead, frame) per format.
DELAYED = {"mp3": (audio_formats.MP3_LEAD_SAMPLES, audio_formats.MP3_FRAME_SAMPLES),
           "aac": (audio_formats.AAC_LEAD_SAMPLES, audio_formats.AAC_FRAME_SAMPLES)}


def stereo_tones(length=LENGTH, rate=RATE):
    """[2, length] float32: 440 Hz left, 660 Hz right, with a fade-in so that the start is not a click."""
    t = np.arange(length) / rate
    fade = np.minimum(1.0, t / 0.05)
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t) * fade,
                     0.3 * np.sin(2 * np.pi * 660 * t) * fade]).astype(np.float32)


def decode(data: bytes, response_format: str, channels: int = 2) -> np.ndarray:
    """Bytes -> float32 [C, N]; pcm by its layout, aac through PyAV (FFmpeg), every other format through soundfile."""
    if response_format == "pcm":
        return (np.frombuffer(data, dtype="<i2").reshape(-1, channels).T / 32768.0).astype(np.float32)
    if response_format == "aac":
        import av

        with av.open(io.BytesIO(data)) as container:
            frames = [frame.to_ndarray() for frame in container.decode(audio=0)]
        return np.concatenate(frames, axis=1).astype(np.float32)
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert rate == RATE
    return samples.T


def stream(audio, response_format, chunk_sizes=(3840, 1, 0, 7680, 12345)):
    """Encode `audio` in irregular chunks; returns (list of byte pieces, encoder)."""
    encoder = audio_formats.StreamingEncoder(response_format, RATE, audio.shape[0])
    pieces, start, index = [], 0, 0
    while start < audio.shape[1]:
        size = chunk_sizes[index % len(chunk_sizes)]
        pieces.append(encoder.encode(audio[:, start:start + size]))
        start, index = start + size, index + 1
    pieces.append(encoder.finish())
    return pieces, encoder


def peak_frequency(signal, rate=RATE):
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return np.argmax(spectrum) * rate / len(signal)


@pytest.mark.parametrize("response_format", audio_formats.SUPPORTED_FORMATS)
def test_every_format_decodes_to_the_input_length_and_sound(response_format):
    audio = stereo_tones()
    decoded = decode(audio_formats.encode_audio(audio, response_format), response_format)
    assert decoded.shape[0] == 2
    if response_format in DELAYED:
        lead, frame = DELAYED[response_format]
        assert lead <= decoded.shape[1] - LENGTH <= lead + frame
        decoded = decoded[:, lead:lead + LENGTH]
    else:
        assert decoded.shape[1] == LENGTH
    if response_format in LOSSY:
        middle = slice(RATE // 4, 3 * RATE // 4)
        assert peak_frequency(decoded[0, middle]) == pytest.approx(440, abs=3)
        assert peak_frequency(decoded[1, middle]) == pytest.approx(660, abs=3)
        error = decoded[:, middle] - audio[:, middle]
        assert 10 * np.log10(np.sum(audio[:, middle] ** 2) / np.sum(error ** 2)) > 15  # SNR in dB
    else:
        assert np.max(np.abs(decoded - audio)) <= 1.0 / 32767


@pytest.mark.parametrize("response_format", ["pcm", "mp3", "aac"])
def test_streamed_bytes_equal_the_whole_file(response_format):
    audio = stereo_tones()
    pieces, _ = stream(audio, response_format)
    assert b"".join(pieces) == audio_formats.encode_audio(audio, response_format)


def test_streamed_wav_differs_from_the_whole_file_only_in_its_two_size_fields():
    audio = stereo_tones()
    streamed = b"".join(stream(audio, "wav")[0])
    whole = audio_formats.encode_audio(audio, "wav")
    assert len(streamed) == len(whole) == 44 + LENGTH * 4
    differing = {i for i in range(len(whole)) if streamed[i] != whole[i]}
    assert differing <= set(range(4, 8)) | set(range(40, 44))
    assert struct.unpack("<I", streamed[4:8])[0] == struct.unpack("<I", streamed[40:44])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", whole[40:44])[0] == LENGTH * 4
    assert np.array_equal(decode(streamed, "wav"), decode(whole, "wav"))
    with wave.open(io.BytesIO(streamed)) as reader:  # a second reader of the unknown-length header
        assert len(reader.readframes(10 * LENGTH)) == LENGTH * 4


def test_streamed_flac_differs_only_in_streaminfo_totals_and_has_the_same_frames():
    audio = stereo_tones()
    streamed = b"".join(stream(audio, "flac")[0])
    whole = audio_formats.encode_audio(audio, "flac")
    assert len(streamed) == len(whole) and streamed[:4] == b"fLaC"
    differing = [i for i in range(len(whole)) if streamed[i] != whole[i]]
    # "fLaC" (4) + metadata block header (4) + STREAMINFO (34): the first 42 bytes hold every difference.
    assert differing and max(differing) < 42
    total_samples = int.from_bytes(streamed[21:26], "big") & ((1 << 36) - 1)
    assert total_samples == 0  # "unknown", as a stream must say
    assert int.from_bytes(whole[21:26], "big") & ((1 << 36) - 1) == LENGTH
    patched = whole[:42] + streamed[42:]
    assert np.array_equal(decode(patched, "flac"), decode(whole, "flac"))


def test_streamed_opus_decodes_exactly_like_the_whole_file():
    audio = stereo_tones()
    streamed = b"".join(stream(audio, "opus")[0])
    assert np.array_equal(decode(streamed, "opus"), decode(audio_formats.encode_audio(audio, "opus"), "opus"))


@pytest.mark.parametrize("response_format", ["opus", "mp3", "flac"])
def test_compressed_streams_hand_out_audio_before_the_end(response_format):
    """The first bytes after the header must come within a fraction of a second of audio (Opus pages: 50 ms)."""
    audio = stereo_tones(RATE // 2)
    encoder = audio_formats.StreamingEncoder(response_format)
    header = encoder.encode(audio[:, :0])
    sizes = [len(encoder.encode(audio[:, start:start + 3840])) for start in range(0, RATE // 2, 3840)]
    encoder.finish()
    assert header == b""
    first_audio = next(index for index, size in enumerate(sizes) if size > 0 and sum(sizes[:index + 1]) > 1000)
    assert first_audio <= 3, f"{response_format}: bytes per 80 ms chunk {sizes}"


def test_pcm_is_interleaved_16_bit_little_endian_scaled_by_32767():
    audio = np.array([[0.5, -1.0, 0.25], [1.0, 0.0, -0.5]], dtype=np.float32)  # [2 channels, 3 samples]
    data = audio_formats.encode_audio(audio, "pcm")
    # L0 R0 L1 R1 L2 R2 with round(x * 32767): 16383.5 -> 16384 (ties to even), 8191.75 -> 8192, -16383.5 -> -16384
    assert data == struct.pack("<6h", 16384, 32767, -32767, 0, 8192, -16384)


def test_out_of_range_samples_are_clipped_and_logged(caplog):
    audio = np.array([[2.0, -3.0, 0.5]], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger=audio_formats.__name__):
        data = audio_formats.encode_audio(audio, "pcm", sample_rate=RATE)
    assert struct.unpack("<3h", data) == (32767, -32767, 16384)
    assert "Clipped 2 of 3 pcm samples" in caplog.text


def test_mono_wav_header_describes_the_data():
    audio = stereo_tones(1000)[:1]
    data = audio_formats.encode_audio(audio, "wav", sample_rate=24000)
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (24000, 1, 1000, "PCM_16")


@pytest.mark.parametrize("bad, expected", [("ogg", "not supported"), (None, "None")])
def test_unsupported_formats_are_refused_naming_the_supported_ones(bad, expected):
    with pytest.raises(ValueError, match="expected one of wav, pcm, flac, mp3, opus, aac") as error:
        audio_formats.StreamingEncoder(bad)
    assert expected in str(error.value)


def test_an_empty_waveform_is_refused():
    with pytest.raises(ValueError, match="empty waveform"):
        audio_formats.encode_audio(np.zeros((2, 0), np.float32), "flac")


def test_bad_chunks_are_refused_with_the_reason():
    encoder = audio_formats.StreamingEncoder("wav", RATE, 2)
    with pytest.raises(ValueError, match="has 1 channels"):
        encoder.encode(np.zeros((1, 10), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        encoder.encode(np.full((2, 10), np.nan, np.float32))
    encoder.finish()
    with pytest.raises(RuntimeError, match="finished"):
        encoder.encode(np.zeros((2, 10), np.float32))


def test_an_abandoned_stream_releases_its_encoder():
    encoder = audio_formats.StreamingEncoder("flac")
    encoder.encode(stereo_tones(4800))
    encoder.close()
    encoder.close()  # idempotent, as a disconnect handler may call it twice
    with pytest.raises(RuntimeError):
        encoder.finish()


def test_content_types_are_the_registered_media_types():
    types = {name: audio_formats.StreamingEncoder(name).content_type for name in audio_formats.SUPPORTED_FORMATS}
    assert types == {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
                     "opus": "audio/ogg", "aac": "audio/aac"}


@pytest.mark.parametrize("response_format, asked, expected", [
    ("pcm", (None, None), (24000, 1)), ("wav", (None, None), (48000, 2)), ("pcm", (48000, 2), (48000, 2)),
    ("mp3", (22050, 1), (22050, 1)), ("opus", (None, 1), (48000, 1)), ("flac", (8000, None), (8000, 2)),
])
def test_pcm_defaults_to_24_khz_mono_and_every_format_takes_a_rate_and_channels(response_format, asked, expected):
    assert audio_formats.output_layout(response_format, *asked) == expected


@pytest.mark.parametrize("response_format, asked, message", [
    ("pcm", (7999, None), "sample_rate=7999; expected an integer from 8000 to 48000"),
    ("wav", (96000, None), "sample_rate=96000"), ("wav", (None, 3), "channels=3; expected 1 (mono) or 2"),
    ("opus", (44100, None), "expected one of 8000, 12000, 16000, 24000, 48000"),
    ("aac", (9000, None), "sample_rate=9000 is not one aac can carry"),
])
def test_a_layout_a_format_cannot_carry_is_refused_naming_the_field(response_format, asked, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        audio_formats.output_layout(response_format, *asked)


@pytest.mark.parametrize("rate, channels", [(24000, 1), (22050, 2), (8000, 1), (44100, 1), (48000, 1)])
def test_layout_conversion_in_irregular_chunks_equals_converting_the_whole(rate, channels):
    audio = stereo_tones()
    whole = audio_formats.LayoutConverter(RATE, 2, rate, channels)
    expected = np.concatenate([whole.process(audio), whole.flush()], axis=1)
    streamed = audio_formats.LayoutConverter(RATE, 2, rate, channels)
    pieces, start = [], 0
    for size in (3840, 1, 0, 7680, 12345) * 10:
        pieces.append(streamed.process(audio[:, start:start + size]))
        start += size
    pieces += [streamed.process(audio[:, start:]), streamed.flush()]
    converted = np.concatenate(pieces, axis=1)
    assert converted.shape == (channels, round(LENGTH * rate / RATE)) == expected.shape
    assert np.max(np.abs(converted - expected)) < 1e-5
    middle = slice(rate // 4, 3 * rate // 4)
    assert peak_frequency(converted[0, middle], rate) == pytest.approx(440, abs=3)  # mono: the louder tone leads
