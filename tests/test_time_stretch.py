"""time_stretch: speed changes duration, not pitch; streaming equals whole-signal; 1.0 is a no-op; range checks."""

import numpy as np
import pytest
import torch

from conftest import import_module

time_stretch = import_module("server.time_stretch")

RATE = 48000
SPEEDS = (0.25, 0.5, 0.8, 1.25, 2.0, 4.0)


def harmonic_tone(fundamental, seconds, rate=RATE, harmonics=8):
    """[N] float32 tone with 1/k harmonics (a buzzy, voice-like spectrum whose strongest peak is the fundamental)."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.3 * sum(np.sin(2 * np.pi * k * fundamental * t) / k for k in range(1, harmonics + 1))).astype(np.float32)


def peak_frequency(signal, rate=RATE):
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return np.argmax(spectrum) * rate / len(signal)


def bursts(times, seconds, width=0.08, rate=RATE):
    """[N] float32 silence with Hann-shaped 440 Hz bursts starting at `times` (seconds)."""
    signal = np.zeros(int(seconds * rate), np.float32)
    size = int(width * rate)
    shape = 0.5 * np.sin(2 * np.pi * 440 * np.arange(size) / rate) * np.hanning(size)
    for start in times:
        signal[int(start * rate):int(start * rate) + size] = shape
    return signal


def burst_centres(signal, rate=RATE, gap_seconds=0.04):
    """Energy centroid (seconds) of each burst; bursts are separated by more than gap_seconds of silence."""
    energy = signal.astype(np.float64) ** 2
    loud = np.nonzero(energy > energy.max() * 1e-4)[0]
    groups = np.split(loud, np.nonzero(np.diff(loud) > gap_seconds * rate)[0] + 1)
    return [float(np.sum(group * energy[group]) / np.sum(energy[group]) / rate) for group in groups]


@pytest.mark.parametrize("speed", SPEEDS)
@pytest.mark.parametrize("length", [RATE, 12345, 100])
def test_output_length_is_the_input_length_over_speed(speed, length):
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, (2, length)).astype(np.float32)
    assert time_stretch.time_stretch(audio, speed).shape == (2, round(length / speed))


@pytest.mark.parametrize("speed", SPEEDS)
def test_events_move_to_their_time_over_speed(speed):
    """Bursts at 0.2, 0.6 and 1.0 s land at t / speed: within the search tolerance (10 ms of input time), plus a
    quarter of the analysis hop when speeding up (frames then sample the input only every hop * speed)."""
    times = (0.2, 0.6, 1.0)
    original = burst_centres(bursts(times, 1.2))
    stretched = burst_centres(time_stretch.time_stretch(bursts(times, 1.2), speed)[0])
    assert len(stretched) == 3
    errors = [centre * speed - expected for centre, expected in zip(stretched, original)]
    bound = 0.010 + 0.016 * max(1.0, speed) / 4 + 0.001  # 10 ms search tolerance, a quarter of a 16 ms hop, 1 ms
    assert max(abs(error) for error in errors) <= bound, errors


@pytest.mark.parametrize("speed", SPEEDS)
@pytest.mark.parametrize("fundamental", [110.0, 440.0])
def test_pitch_stays_put(speed, fundamental):
    stretched = time_stretch.time_stretch(harmonic_tone(fundamental, 1.0), speed)[0]
    middle = stretched[len(stretched) // 8: -len(stretched) // 8]
    resolution = RATE / len(middle)
    assert peak_frequency(middle) == pytest.approx(fundamental, abs=max(1.0, resolution))


def test_a_stretched_tone_stays_a_clean_tone():
    """No clicks or phase jumps: at every speed > 99.99 % of the energy stays within 5 Hz of 440 Hz (40 dB)."""
    for speed in SPEEDS:
        stretched = time_stretch.time_stretch(harmonic_tone(440.0, 1.0, harmonics=1), speed)[0]
        middle = stretched[len(stretched) // 8: -len(stretched) // 8]
        power = np.abs(np.fft.rfft(middle * np.hanning(len(middle)))) ** 2
        peak = int(np.argmax(power))
        assert power[peak - 5:peak + 6].sum() / power.sum() > 0.9999, speed


def test_speed_one_returns_the_input_unchanged():
    audio = np.random.default_rng(1).standard_normal((2, 5000)).astype(np.float32)
    assert np.array_equal(time_stretch.time_stretch(audio, 1.0), audio)
    assert np.array_equal(time_stretch.time_stretch(torch.from_numpy(audio), 1), audio)
    stretcher = time_stretch.TimeStretcher(1.0)
    pieces = [stretcher.process(audio[:, :1234]), stretcher.process(audio[:, 1234:]), stretcher.flush()]
    assert np.array_equal(np.concatenate(pieces, axis=1), audio)


@pytest.mark.parametrize("speed", [0.25, 0.7, 1.5, 4.0])
def test_streaming_in_any_chunks_equals_the_whole_signal(speed):
    rng = np.random.default_rng(2)
    audio = np.stack([harmonic_tone(130.0, 0.7), harmonic_tone(210.0, 0.7)])
    audio += 0.05 * rng.standard_normal(audio.shape).astype(np.float32)
    whole = time_stretch.time_stretch(audio, speed)
    stretcher = time_stretch.TimeStretcher(speed)
    pieces, start = [], 0
    for size in rng.integers(0, 5000, 40):
        pieces.append(stretcher.process(audio[:, start:start + size]))
        start += size
    pieces.append(stretcher.process(audio[:, start:]))
    pieces.append(stretcher.flush())
    assert np.array_equal(np.concatenate(pieces, axis=1), whole)
    # output flows while input arrives: all but the last ~50 ms of output came before flush
    assert pieces[-1].shape[1] <= 0.06 * RATE / speed


def test_stereo_channels_are_shifted_together():
    left = harmonic_tone(150.0, 0.5) + 0.1 * np.random.default_rng(3).standard_normal(RATE // 2).astype(np.float32)
    stretched = time_stretch.time_stretch(np.stack([left, -0.5 * left]), 0.6)
    assert np.array_equal(stretched[1], -0.5 * stretched[0])


@pytest.mark.parametrize("speed", [0.2, 4.5, 0, -1, float("nan"), float("inf"), "2", None, True])
def test_out_of_range_speeds_are_refused_naming_the_range(speed):
    with pytest.raises(ValueError, match=r"from 0\.25 to 4\.0"):
        time_stretch.TimeStretcher(speed)


def test_misuse_of_a_stretcher_is_reported():
    stretcher = time_stretch.TimeStretcher(2.0, channels=2)
    with pytest.raises(ValueError, match="has 1 channels"):
        stretcher.process(np.zeros((1, 100), np.float32))
    stretcher.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        stretcher.process(np.zeros((2, 100), np.float32))
