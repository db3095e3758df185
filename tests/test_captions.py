"""Captions: per-chunk timestamps from audio pieces, WebVTT, and `inference(captions=True)` on the tiny model."""

import pytest
import torch

from conftest import import_module, shared_path
from tiny_repository import HOP, SAMPLE_RATE, write_tiny_repository

captions = import_module("captions")
modeling = import_module("modeling_moss_tts_nano")
text_chunking = import_module("text_chunking")

TEXT = "Hello world. This is a test. And the end."
RUN = dict(mode="voice_clone", voice_clone_max_text_tokens=5, do_sample=False, max_new_frames=3, progress=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    repo = write_tiny_repository(tmp_path_factory.mktemp("tiny_repo"), shared_path("assets", "tokenizer.model"))
    return modeling.MossTTSNanoForCausalLM.from_pretrained(str(repo)).eval()


def test_timeline_starts_each_caption_with_its_audio_and_skips_pauses():
    timeline = captions.CaptionTimeline(["one", "two"], sample_rate=100)
    assert timeline.add(0, 50) is None
    assert timeline.add(0, 25) is None
    first = timeline.add(0, 40, is_pause=True)
    assert first == captions.Caption(0, "one", 0.0, 0.75)
    assert timeline.add(1, 100) is None
    assert timeline.finish() == captions.Caption(1, "two", 1.15, 2.15)
    assert timeline.finish() is None


def test_speed_divides_the_times():
    timeline = captions.CaptionTimeline(["one"], sample_rate=100, speed=2.0)
    timeline.add(0, 100)
    assert timeline.finish().end == 0.5


def test_webvtt_has_one_cue_per_chunk_with_millisecond_times():
    cues = [captions.Caption(0, "Hello.", 0.0, 1.5), captions.Caption(1, "A --> B", 3661.25, 3662.0),
            captions.Caption(2, "empty", 4.0, 4.0)]
    assert captions.to_webvtt(cues) == ("WEBVTT\n\n1\n00:00:00.000 --> 00:00:01.500\nHello.\n\n"
                                        "2\n01:01:01.250 --> 01:01:02.000\nA -> B\n")


def test_offline_captions_cover_the_waveform_chunk_by_chunk(model, prompt_wav):
    result = model.inference(TEXT, None, prompt_audio_path=str(prompt_wav), captions=True, **RUN)
    chunks = result["voice_clone_text_chunks"]
    cues = result["captions"]
    assert [cue["text"] for cue in cues] == chunks and len(chunks) == 3
    assert cues[0]["start"] == 0.0
    assert cues[-1]["end"] == pytest.approx(result["waveform"].shape[-1] / SAMPLE_RATE, abs=1e-3)
    pause = text_chunking.pause_samples(chunks[0], SAMPLE_RATE) / SAMPLE_RATE
    assert cues[1]["start"] == pytest.approx(cues[0]["end"] + pause, abs=1e-3)
    assert cues[0]["end"] == pytest.approx(3 * HOP / SAMPLE_RATE, abs=1e-3)


def test_streamed_captions_equal_the_offline_ones(model, prompt_wav):
    offline = model.inference(TEXT, None, prompt_audio_path=str(prompt_wav), captions=True, **RUN)
    events = list(model.inference_stream(TEXT, None, prompt_audio_path=str(prompt_wav), captions=True, **RUN))
    assert events[-1]["captions"] == offline["captions"]


def test_captions_are_not_in_the_result_unless_asked(model, prompt_wav):
    result = model.inference(TEXT, None, prompt_audio_path=str(prompt_wav), **RUN)
    assert "captions" not in result
    assert torch.is_tensor(result["waveform"])


def test_a_failed_webvtt_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.vtt"
    captions.write_webvtt(target, [captions.Caption(0, "Hello.", 0.0, 1.0)])
    before = target.read_text(encoding="utf-8")
    unencodable = captions.Caption(0, "\ud800", 0.0, 1.0)  # a lone surrogate: UTF-8 cannot write it
    with pytest.raises(UnicodeEncodeError):
        captions.write_webvtt(target, [unencodable])
    assert target.read_text(encoding="utf-8") == before
    assert [path.name for path in tmp_path.iterdir()] == ["out.vtt"]


def test_a_vtt_path_writes_the_captions_file(model, prompt_wav, tmp_path):
    target = tmp_path / "sub" / "out.vtt"
    result = model.inference(TEXT, None, prompt_audio_path=str(prompt_wav), captions=str(target), **RUN)
    text = target.read_text(encoding="utf-8")
    assert text.startswith("WEBVTT\n\n1\n00:00:00.000 --> 00:00:00.240\nHello world.\n")
    assert text.count(" --> ") == len(result["captions"]) == 3


def test_a_captions_target_that_is_not_vtt_is_refused(model, prompt_wav, tmp_path):
    with pytest.raises(ValueError, match="captions=.*expected True, False or a path ending in .vtt"):
        model.inference(TEXT, None, prompt_audio_path=str(prompt_wav), captions=str(tmp_path / "x.srt"), **RUN)
