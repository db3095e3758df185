"""audio_io: reading prompts at any rate / channel count / format into 48 kHz stereo, rejecting bad files, writing."""

import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import import_module

audio_io = import_module("audio_io")

FORMATS = {
    "wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III"),
}


def sine(frequency, rate, seconds, channels=1, amplitude=0.5):
    """[N, C] float32 sine; channel c is scaled by 1 / (c + 1) so channels differ."""
    t = np.arange(int(round(rate * seconds))) / rate
    tone = amplitude * np.sin(2 * np.pi * frequency * t)
    return np.stack([tone / (c + 1) for c in range(channels)], axis=1).astype(np.float32)


def write(path, frames, rate, ext="wav"):
    file_format, subtype = FORMATS[ext]
    if file_format not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {file_format}")
    sf.write(str(path), frames, rate, format=file_format, subtype=subtype)
    return path


def peak_frequency(signal, rate):
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return np.argmax(spectrum) * rate / len(signal)


@pytest.mark.parametrize(
    "rate, frames, expected", [(44100, 44100, 48000), (16000, 8000, 24000), (48000, 12345, 12345), (44100, 1000, 1088)]
)
def test_resampled_length_is_input_length_times_rate_ratio_rounded(tmp_path, rate, frames, expected):
    path = write(tmp_path / "a.wav", sine(440, rate, frames / rate), rate)
    audio = audio_io.load_audio(path)
    assert audio.dtype == torch.float32
    assert tuple(audio.shape) == (2, expected)


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
@pytest.mark.parametrize("rate", [16000, 44100])
def test_every_format_loads_and_keeps_the_sine_frequency(tmp_path, ext, rate):
    path = write(tmp_path / f"a.{ext}", sine(1000, rate, 0.5, channels=2), rate, ext)
    audio = audio_io.load_audio(path)
    assert audio.shape[0] == 2
    # mp3 encoders may add a little priming padding; the other formats are exact.
    expected = int(round(0.5 * 48000))
    assert abs(audio.shape[1] - expected) <= (2000 if ext == "mp3" else 0)
    assert peak_frequency(audio[0].numpy(), 48000) == pytest.approx(1000, abs=4)


def test_mono_is_repeated_to_both_channels(tmp_path):
    path = write(tmp_path / "mono.wav", sine(300, 48000, 0.1), 48000)
    audio = audio_io.load_audio(path)
    assert torch.equal(audio[0], audio[1])
    np.testing.assert_allclose(audio[0].numpy(), sf.read(str(path), dtype="float32")[0], atol=0)


def test_stereo_channels_are_kept_apart(tmp_path):
    frames = sine(300, 48000, 0.1, channels=2)
    audio = audio_io.load_audio(write(tmp_path / "stereo.wav", frames, 48000))
    np.testing.assert_allclose(audio.numpy(), frames.T, atol=1 / 32767)


@pytest.mark.parametrize("channels", [3, 6])
def test_more_than_two_channels_become_their_average_on_both_sides(tmp_path, channels):
    frames = sine(300, 48000, 0.1, channels=channels)
    audio = audio_io.load_audio(write(tmp_path / f"{channels}ch.wav", frames, 48000))
    assert audio.shape == (2, frames.shape[0])
    np.testing.assert_allclose(audio[0].numpy(), frames.mean(axis=1), atol=1e-4)
    assert torch.equal(audio[0], audio[1])


def test_six_channels_at_16k_are_mixed_and_resampled(tmp_path):
    audio = audio_io.load_audio(write(tmp_path / "surround.flac", sine(500, 16000, 0.25, channels=6), 16000, "flac"))
    assert tuple(audio.shape) == (2, 12000)
    assert peak_frequency(audio[1].numpy(), 48000) == pytest.approx(500, abs=4)


def test_mono_target_averages_stereo(tmp_path):
    frames = sine(300, 48000, 0.1, channels=2)
    audio = audio_io.load_audio(write(tmp_path / "s.wav", frames, 48000), channels=1)
    np.testing.assert_allclose(audio[0].numpy(), frames.mean(axis=1), atol=1e-4)


def test_long_prompt_is_trimmed_with_a_warning(tmp_path, caplog):
    path = write(tmp_path / "long.wav", sine(300, 16000, 3.0), 16000)
    with caplog.at_level(logging.WARNING, logger=audio_io.logger.name):
        audio = audio_io.load_audio(path, max_seconds=1.25)
    assert tuple(audio.shape) == (2, 60000)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING  # seen at the default log level, not only with --verbose
    assert "using its first 1.25 s" in record.getMessage() and str(path) in record.getMessage()


def test_short_prompt_is_not_trimmed_and_logs_nothing(tmp_path, caplog):
    path = write(tmp_path / "short.wav", sine(300, 48000, 0.5), 48000)
    with caplog.at_level(logging.INFO, logger=audio_io.logger.name):
        audio = audio_io.load_audio(path, max_seconds=None)
    assert audio.shape[1] == 24000 and caplog.text == ""


def zero_length_wav(path):
    sf.write(str(path), np.zeros((0, 1), np.float32), 16000)
    return path


def garbage(path):
    path.write_bytes(b"this is not audio" * 50)
    return path


def empty_file(path):
    path.write_bytes(b"")
    return path


def silence(path):
    sf.write(str(path), np.full((16000, 2), 2e-4, np.float32), 16000, subtype="FLOAT")
    return path


def not_a_number(path):
    sf.write(str(path), np.array([[0.5], [np.nan]] * 100, np.float32), 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "does not exist"),
        (empty_file, "is empty (0 bytes)"),
        (zero_length_wav, "contains no audio samples"),
        (silence, "is silent"),
        (garbage, "could not read audio file"),
        (not_a_number, "NaN or Inf"),
    ],
    ids=["missing", "empty-file", "zero-length", "silence", "garbage-bytes", "nan"],
)
def test_bad_prompt_files_raise_value_error_naming_the_file(tmp_path, make, message):
    path = make(tmp_path / "bad.wav")
    with pytest.raises(ValueError, match="bad.wav") as error:
        audio_io.load_audio(path)
    assert message in str(error.value)


def test_directory_path_raises_value_error_naming_it(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    with pytest.raises(ValueError, match="voices is a directory"):
        audio_io.load_audio(folder)


@pytest.mark.parametrize("kwargs", [{"target_rate": 0}, {"channels": 3}, {"max_seconds": 0}, {"target_rate": 44100.5}])
def test_bad_load_arguments_raise_value_error(tmp_path, kwargs):
    path = write(tmp_path / "a.wav", sine(300, 16000, 0.1), 16000)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        audio_io.load_audio(path, **kwargs)


def test_reference_clip_loads_as_48k_stereo(reference_clip):
    info = sf.info(str(reference_clip))
    audio = audio_io.load_audio(reference_clip)
    assert tuple(audio.shape) == (2, round(info.frames * 48000 / info.samplerate))
    assert torch.equal(audio[0], audio[1]) and audio.abs().max() > 0.05


def test_pcm16_round_trip_is_within_one_step(tmp_path):
    waveform = torch.from_numpy(sine(440, 48000, 0.2, channels=2).T.copy())
    path = audio_io.save_audio(tmp_path / "out.wav", waveform, 48000)
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == 48000 and sf.info(str(path)).subtype == "PCM_16"
    np.testing.assert_allclose(data.T, waveform.numpy(), atol=1 / 32767)


def test_float_round_trip_is_exact_and_unclipped(tmp_path):
    waveform = np.linspace(-1.5, 1.5, 1000, dtype=np.float32)
    path = audio_io.save_audio(tmp_path / "out.wav", waveform, 24000, subtype="FLOAT")
    data, _ = sf.read(str(path), dtype="float32")
    np.testing.assert_array_equal(data, waveform)


def test_pcm16_clips_out_of_range_samples_with_a_warning(tmp_path, caplog):
    waveform = np.array([[0.0, 1.7, -3.0, 0.5]], np.float32)
    with caplog.at_level(logging.WARNING, logger=audio_io.logger.name):
        path = audio_io.save_audio(tmp_path / "loud.wav", waveform, 16000)
    data, _ = sf.read(str(path), dtype="float32")
    np.testing.assert_allclose(data, [0.0, 1.0, -1.0, 0.5], atol=1 / 32767)
    assert "Clipping 2 of 4 samples" in caplog.text


def test_saved_prompt_loads_back(tmp_path):
    waveform = sine(440, 44100, 0.3, channels=2).T
    path = audio_io.save_audio(tmp_path / "nested" / "dir" / "voice.flac", waveform, 44100)
    assert tuple(audio_io.load_audio(path).shape) == (2, 14400)


def test_failed_save_leaves_no_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "out.wav"

    def broken_write(file, data, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"RIFF partial")
        raise OSError("disk full")

    monkeypatch.setattr(audio_io.sf, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        audio_io.save_audio(target, np.zeros(100, np.float32) + 0.1, 16000)
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"previous")
    with pytest.raises(OSError):
        audio_io.save_audio(target, np.zeros(100, np.float32) + 0.1, 16000)
    assert os.listdir(tmp_path) == ["out.wav"] and target.read_bytes() == b"previous"


@pytest.mark.parametrize(
    "name, waveform, kwargs, message",
    [
        ("out.mp3", np.zeros(10), {}, "must end in one of"),
        ("out.wav", np.zeros(10), {"subtype": "PCM_24"}, "subtype must be one of"),
        ("out.flac", np.zeros(10), {"subtype": "FLOAT"}, "supports subtype 'PCM_16' only"),
        ("out.wav", np.zeros((0,)), {}, "has no samples"),
        ("out.wav", np.zeros((4800, 2)), {}, "needs transposing"),
        ("out.wav", np.array([0.1, np.inf]), {}, "NaN or Inf"),
        ("out.wav", np.zeros(10), {"sample_rate": -1}, "sample_rate must be a positive integer"),
    ],
)
def test_bad_save_arguments_raise_value_error_and_write_nothing(tmp_path, name, waveform, kwargs, message):
    kwargs = {"sample_rate": 16000, **kwargs}
    with pytest.raises(ValueError, match=message):
        audio_io.save_audio(tmp_path / name, waveform, **kwargs)
    assert os.listdir(tmp_path) == []
