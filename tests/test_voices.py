"""voices: codes encoded once and cached beside each clip, re-encoded when the clip or codec changes, atomic adds."""

import copy
import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import import_module

voices = import_module("voice_library.store")
tiny_codec = import_module("measurement.checkpoints").tiny_codec
synthesis = import_module("synthesis")
configuration = import_module("configuration_moss_tts_nano")


class CountingCodec:
    """The tiny codec, counting its batch_encode calls (what a restart must not repeat)."""

    def __init__(self, codec):
        self._codec = codec
        self.encodes = 0

    def batch_encode(self, *arguments, **keywords):
        self.encodes += 1
        return self._codec.batch_encode(*arguments, **keywords)

    def __getattr__(self, name):
        return getattr(self._codec, name)


@pytest.fixture(scope="module")
def codec():
    return tiny_codec(seed=0)


@pytest.fixture(scope="module")
def config():
    return configuration.MossTTSNanoConfig()


@pytest.fixture
def open_store(tmp_path, codec, config):
    """open_store(**keywords) -> (VoiceStore over tmp_path/voices, its CountingCodec): a new 'process' each call."""
    def opener(**keywords):
        counting = CountingCodec(codec)
        return voices.VoiceStore(tmp_path / "voices", counting, config, **keywords), counting
    return opener


def visible_files(store):
    return sorted(name for name in os.listdir(store.folder) if not name.startswith("."))


def audio_bytes(samples, rate=48000, file_format="WAV", subtype="PCM_16"):
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=file_format, subtype=subtype)
    return buffer.getvalue()


def tone(seconds, rate=48000, amplitude=0.3):
    return (amplitude * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_a_restart_uses_the_cached_codes_without_encoding(open_store, reference_clips, codec, config):
    english = reference_clips[0]
    store, counting = open_store()
    added = store.add_voice("en", english.read_bytes())
    assert counting.encodes == 1 and store.list_voices() == ["en"]
    assert visible_files(store) == ["en.codes.safetensors", "en.wav"]
    expected = synthesis.encode_prompt_audio(codec, synthesis.codec_info(codec, config), english, config, 16)
    assert torch.equal(added, expected) and added.shape[1] == config.n_vq
    assert torch.equal(store.prompt_codes("en"), expected) and counting.encodes == 1

    restarted, counting_after = open_store()
    assert restarted.list_voices() == ["en"]
    assert torch.equal(restarted.prompt_codes("en"), expected)
    assert counting_after.encodes == 0


def test_a_clip_dropped_into_the_folder_is_encoded_once_then_cached(open_store, reference_clips):
    store, counting = open_store()
    (store.folder / "zh.wav").write_bytes(reference_clips[1].read_bytes())
    first = store.prompt_codes("zh")
    second = store.prompt_codes("zh")
    assert counting.encodes == 1 and torch.equal(first, second)
    assert (store.folder / "zh.codes.safetensors").is_file()
    second[0, 0] = -1  # callers get copies: the store's codes stay intact
    assert torch.equal(store.prompt_codes("zh"), first)
    restarted, counting_after = open_store()
    assert torch.equal(restarted.prompt_codes("zh"), first) and counting_after.encodes == 0


def test_a_changed_clip_is_encoded_again(open_store, reference_clips):
    english, chinese = reference_clips
    store, counting = open_store()
    clip = store.folder / "voice.wav"
    clip.write_bytes(chinese.read_bytes())
    chinese_codes = store.prompt_codes("voice")
    clip.write_bytes(english.read_bytes())  # changed in place, as another process or an operator would
    english_codes = store.prompt_codes("voice")
    assert counting.encodes == 2 and not torch.equal(english_codes, chinese_codes)
    restarted, counting_after = open_store()
    assert torch.equal(restarted.prompt_codes("voice"), english_codes) and counting_after.encodes == 0


def test_another_codec_encodes_again_and_the_fingerprint_follows_the_weights(open_store, reference_clips, codec):
    store, _ = open_store()
    store.add_voice("en", reference_clips[0].read_bytes())
    other, counting = open_store(codec_id="another-codec-revision")
    other.prompt_codes("en")
    assert counting.encodes == 1
    same_weights = copy.deepcopy(codec)
    assert voices.codec_fingerprint(same_weights) == store.codec_id
    with torch.no_grad():
        next(same_weights.parameters()).add_(1e-3)
    assert voices.codec_fingerprint(same_weights) != store.codec_id


def test_voices_added_or_deleted_by_another_store_are_seen_at_once(open_store, reference_clips):
    first, _ = open_store()
    second, _ = open_store()
    second.add_voice("zh", reference_clips[1].read_bytes())
    assert first.list_voices() == ["zh"]
    assert first.prompt_codes("zh").shape[1] == 16
    second.delete_voice("zh")
    assert first.list_voices() == [] and visible_files(first) == []
    with pytest.raises(voices.UnknownVoiceError, match="unknown voice 'zh'"):
        first.prompt_codes("zh")


def test_many_threads_asking_for_a_new_voice_encode_it_once(open_store, reference_clips):
    store, counting = open_store()
    (store.folder / "en.wav").write_bytes(reference_clips[0].read_bytes())
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: store.prompt_codes("en"), range(8)))
    assert counting.encodes == 1
    assert all(torch.equal(result, results[0]) for result in results)


def test_replacing_a_voice_needs_replace_and_removes_the_old_clip(open_store, reference_clips):
    store, _ = open_store()
    wav = reference_clips[0].read_bytes()
    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    wav_codes = store.add_voice("en", wav)
    with pytest.raises(voices.VoiceExistsError, match="voice 'en' already exists"):
        store.add_voice("en", wav)
    flac_codes = store.add_voice("en", audio_bytes(samples, rate, "FLAC"), replace=True)
    assert visible_files(store) == ["en.codes.safetensors", "en.flac"]
    assert torch.equal(flac_codes, wav_codes)  # lossless: the same samples give the same codes


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "Alice", "x.wav", ".hidden", "-dash", "a" * 65, None, 7])
def test_bad_names_are_refused_naming_the_pattern(open_store, name):
    store, _ = open_store()
    with pytest.raises(ValueError, match=r"is not allowed; expected 1 to 64 characters of a-z") as error:
        store.add_voice(name, b"RIFF")
    assert repr(name) in str(error.value)
    with pytest.raises(ValueError, match="is not allowed"):
        store.prompt_codes(name)
    assert visible_files(store) == []


@pytest.mark.parametrize("data, reason", [
    (b"certainly not audio " * 50, "could not read audio"),
    (audio_bytes(np.zeros(48000, np.float32)), "is silent"),
    (audio_bytes(tone(0.04)), "shorter than one codec frame"),
    (audio_bytes(tone(1.0), file_format="AIFF"), "is AIFF; expected a wav, flac, ogg or mp3"),
    (b"", "is empty"),
    ("a text", "must be bytes"),
])
def test_bad_clips_are_refused_with_the_reason_and_leave_nothing(open_store, data, reason):
    store, _ = open_store()
    with pytest.raises(ValueError, match=reason) as error:
        store.add_voice("bad", data)
    assert "'bad'" in str(error.value)
    assert visible_files(store) == [] and store.list_voices() == []


def test_an_oversized_upload_is_refused_before_decoding(open_store, reference_clips):
    store, counting = open_store(max_upload_bytes=1000)
    with pytest.raises(ValueError, match="expected at most 1000"):
        store.add_voice("big", reference_clips[1].read_bytes())
    assert counting.encodes == 0 and visible_files(store) == []


def test_other_files_in_the_folder_are_not_voices(open_store, reference_clips, caplog):
    store, _ = open_store()
    for name in ("Upper.wav", "notes.txt", ".hidden.wav", "ok.wav"):
        (store.folder / name).write_bytes(reference_clips[1].read_bytes())
    (store.folder / "folder.wav").mkdir()
    assert store.list_voices() == ["ok"]
    assert "Upper.wav" in caplog.text


def test_stale_temporaries_of_killed_writes_are_removed_at_start(open_store):
    store, _ = open_store()
    stale, fresh = store.folder / ".en.wav.abc.tmp", store.folder / ".zh.wav.def.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - 2 * voices.STALE_TEMPORARY_SECONDS
    os.utime(stale, (old, old))
    open_store()
    assert not stale.exists() and fresh.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a writer mid-way")
@pytest.mark.parametrize("call, number", [("fsync", 1), ("replace", 1), ("fsync", 2), ("replace", 2)])
def test_a_write_killed_at_any_step_leaves_no_half_voice(open_store, reference_clips, call, number):
    """A child process adding a voice is SIGKILLed just before the n-th fsync / rename of the add; afterwards the
    voice does not exist, only hidden temporaries or an unlisted cache remain, and adding it again works."""
    store, _ = open_store()
    data = reference_clips[1].read_bytes()
    status = _add_voice_in_a_child_killed_at(store, data, call, number)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child status {status}"

    survivor, counting = open_store()
    assert survivor.list_voices() == []
    assert set(visible_files(survivor)) <= {"victim.codes.safetensors"}
    codes = survivor.add_voice("victim", data)
    assert survivor.list_voices() == ["victim"] and counting.encodes == 1
    assert torch.equal(open_store()[0].prompt_codes("victim"), codes)


def _add_voice_in_a_child_killed_at(store, data, call, number):
    """Fork; the child adds voice 'victim' and SIGKILLs itself at the number-th os.<call>. Returns the wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            original, calls = getattr(os, call), []

            def dying(*arguments, **keywords):
                calls.append(1)
                if len(calls) == number:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(*arguments, **keywords)

            setattr(os, call, dying)
            store.add_voice("victim", data)
            code = 4  # the kill point was never reached
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def test_concurrent_adds_from_two_threads_keep_one_complete_voice(open_store, reference_clips):
    store, _ = open_store()
    english, chinese = (clip.read_bytes() for clip in reference_clips)
    barrier, errors = threading.Barrier(2), []

    def add(data):
        barrier.wait()
        try:
            store.add_voice("both", data)
        except voices.VoiceExistsError as error:
            errors.append(error)

    threads = [threading.Thread(target=add, args=(data,)) for data in (english, chinese)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 1  # exactly one add won
    (clip,) = [path for path in store.folder.glob("both.*") if not path.name.endswith(".codes.safetensors")]
    restarted, counting = open_store()
    expected = restarted.prompt_codes("both")
    assert counting.encodes == 0  # the cache written belongs to the clip that won
    assert clip.read_bytes() in (english, chinese) and expected.shape[1] == 16


# ----------------------------------------------------------------------------------------------------------------
# VoiceCatalog: which voice a name means (uploads, presets, OpenAI names, the default voice)

voice_catalog = import_module("voice_library.catalog")
voice_presets = import_module("voice_library.presets")
write_stand_in_presets = import_module("measurement.checkpoints").write_stand_in_presets


@pytest.fixture
def catalog(tmp_path, codec, config):
    """A catalog over an empty uploads folder and the stand-in presets (their caches kept in the uploads folder)."""
    write_stand_in_presets(tmp_path / "model")
    uploads = voices.VoiceStore(tmp_path / "uploads", codec, config)
    presets = voices.VoiceStore(voice_presets.preset_folder(tmp_path / "model"), codec, config,
                                codec_id=uploads.codec_id, cache_folder=tmp_path / "uploads" / ".presets")
    return voice_catalog.VoiceCatalog(uploads, presets)


def test_an_openai_name_speaks_its_preset_and_an_upload_of_that_name_replaces_it(catalog):
    used, codes = catalog.resolve("nova")
    assert used == voice_presets.OPENAI_VOICES["nova"] and torch.equal(codes, catalog.presets.prompt_codes(used))
    catalog.uploads.add_voice("nova", (catalog.presets.folder / "zh_1.wav").read_bytes())
    assert catalog.resolve("nova")[0] == "nova"
    (entry,) = [entry for entry in catalog.entries() if entry.name == "nova"]
    assert (entry.kind, entry.uses, entry.replaces) == ("upload", "nova", "openai")
    assert not list(catalog.presets.folder.glob("*.codes.safetensors"))  # caches live in the cache folder


def test_a_missing_preset_falls_back_to_the_default_voice_and_the_listing_says_so(catalog):
    (catalog.presets.folder / "zh_6.wav").unlink()
    assert catalog.resolve("nova")[0] == voice_presets.DEFAULT_VOICE
    assert catalog.resolve(None)[0] == voice_presets.DEFAULT_VOICE
    (entry,) = [entry for entry in catalog.entries() if entry.name == "nova"]
    assert entry.fallback and entry.uses == voice_presets.DEFAULT_VOICE
    with pytest.raises(voices.UnknownVoiceError, match="unknown voice 'zh_6'"):
        catalog.resolve("zh_6")


def test_without_the_default_voice_the_refusal_says_how_to_get_it(catalog):
    for clip in catalog.presets.folder.glob("*.wav"):
        clip.unlink()
    with pytest.raises(voices.UnknownVoiceError, match="infer_npu.py --download-only"):
        catalog.resolve("alloy")
    assert catalog.names() == []  # no OpenAI name is offered that nothing could answer
    with pytest.raises(ValueError, match="is not allowed"):
        catalog.resolve("Bad Name")
