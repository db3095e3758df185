"""Fetching the preset voices (voice_library/presets.py: fetch_presets) with a stand-in for the network: pinned clips are checked
against their sha256, clips without a published one are recorded on first download and checked against that record
afterwards, a missing network costs one failure, and a tiny repository's stand-ins are left alone."""

import hashlib
import io
import json
import urllib.error

import pytest

from conftest import import_module

voice_presets = import_module("voice_library.presets")
checkpoints = import_module("measurement.checkpoints")


class FakeNetwork:
    """urlopen(url, timeout) over a dict url -> bytes; counts the calls; `down` refuses every connection."""

    def __init__(self, files, down=False):
        self.files, self.down, self.calls = files, down, 0

    def __call__(self, url, timeout):
        self.calls += 1
        if self.down:
            raise urllib.error.URLError("connection refused")
        return io.BytesIO(self.files[url])


def clip(name, data, pinned):
    digest = hashlib.sha256(data).hexdigest() if pinned else None
    return voice_presets.PresetClip(name, f"assets/audio/{name}.wav", "en", digest, len(data) if pinned else None)


def test_a_pinned_clip_is_installed_only_when_its_sha256_matches(tmp_path):
    good, bad = clip("good", b"RIFF good", True), clip("bad", b"RIFF expected", True)
    network = FakeNetwork({good.url: b"RIFF good", bad.url: b"RIFF tampered"})
    outcomes = voice_presets.fetch_presets(tmp_path, (good, bad), network)
    assert outcomes["good"] == "ok (downloaded)" and "expected" in outcomes["bad"]
    folder = voice_presets.preset_folder(tmp_path)
    assert (folder / "good.wav").read_bytes() == b"RIFF good" and not (folder / "bad.wav").exists()


def test_an_unpublished_hash_is_recorded_on_first_download_and_checked_afterwards(tmp_path):
    unpinned = clip("open", b"RIFF first", False)
    voice_presets.fetch_presets(tmp_path, (unpinned,), FakeNetwork({unpinned.url: b"RIFF first"}))
    folder = voice_presets.preset_folder(tmp_path)
    record = json.loads((folder / voice_presets.PRESET_LOCK_FILE).read_text())["open"]
    assert record == {"sha256": hashlib.sha256(b"RIFF first").hexdigest(), "size": 10, "source": unpinned.url}
    (folder / "open.wav").write_bytes(b"RIFF other")
    outcomes = voice_presets.fetch_presets(tmp_path, (unpinned,), FakeNetwork({}))
    assert "expected " + record["sha256"] in outcomes["open"]


def test_without_network_the_first_failure_skips_the_other_downloads(tmp_path):
    clips = tuple(clip(f"c{index}", b"x", True) for index in range(4))
    network = FakeNetwork({}, down=True)
    outcomes = voice_presets.fetch_presets(tmp_path, clips, network)
    assert network.calls == 1
    assert all(outcome.startswith("not installed") for outcome in outcomes.values())


def test_stand_in_presets_of_a_tiny_repository_are_left_alone(tmp_path):
    checkpoints.write_stand_in_presets(tmp_path)
    before = {path.name: path.read_bytes() for path in voice_presets.preset_folder(tmp_path).iterdir()}
    network = FakeNetwork({}, down=True)
    outcomes = voice_presets.fetch_presets(tmp_path, opener=network)
    assert network.calls == 0 and set(outcomes) == set(voice_presets.PRESETS)
    assert {path.name: path.read_bytes() for path in voice_presets.preset_folder(tmp_path).iterdir()} == before


@pytest.mark.parametrize("name, expected", [("alloy", "en_2"), ("onyx", "en_4"), ("zh_1", "zh_1")])
def test_preset_clip_maps_openai_names_through_the_one_table(tmp_path, name, expected):
    checkpoints.write_stand_in_presets(tmp_path)
    used, path = voice_presets.preset_clip(tmp_path, name)
    assert used == expected and path == voice_presets.preset_folder(tmp_path) / f"{expected}.wav"


def test_every_openai_voice_name_has_a_pinned_preset():
    assert set(voice_presets.OPENAI_VOICES) == {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx",
                                                "sage", "shimmer", "verse", "marin", "cedar"}
    assert set(voice_presets.OPENAI_VOICES.values()) <= set(voice_presets.PRESETS)
    assert voice_presets.DEFAULT_VOICE in voice_presets.PRESETS
