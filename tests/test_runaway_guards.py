"""Runaway guards: the frame cap from the text, loop and silence detection over code sequences, and the guard
ending a chunk of the tiny model (which never stops by itself) long before max_new_frames."""

import random

import pytest
import torch

from conftest import import_module

guards = import_module("runaway_guards")
checkpoints = import_module("measurement.checkpoints")
generation = import_module("generation")


def _speech_like(frames: int, seed: int = 0) -> list:
    """Codebook-0 codes that vary like speech: a fresh code nearly every frame."""
    draw = random.Random(seed)
    return [draw.randrange(1024) for _ in range(frames)]


@pytest.mark.parametrize("text, syllables", [
    ("Hello world.", 3), ("The quick brown fox jumps.", 5), ("你好世界", 4), ("こんにちは", 5), ("안녕하세요", 5),
    ("Es kostet 25 Euro.", 2 + 4 + 3), ("Привет, как дела?", 5),
])
def test_syllables_are_counted_per_script(text, syllables):
    assert guards.syllable_count(text) == syllables


def test_frame_cap_is_the_slowest_duration_of_the_text_within_max_new_frames():
    # 3 syllables at 2 per second plus 3 s: 4.5 s = 56.25 -> 57 frames.
    assert guards.frame_cap("Hello world.", 375) == 57
    assert guards.frame_cap("Hello world.", 40) == 40
    long_text = " ".join(["word"] * 400)
    assert guards.frame_cap(long_text, 375) == 375


def test_speech_like_codes_are_neither_a_loop_nor_silence():
    codes = _speech_like(375)
    for end in range(1, 376):
        assert guards.loop_period(codes[:end]) is None and not guards.is_silent(codes[:end])


@pytest.mark.parametrize("period", [3, 5, 12, 30, 38])
def test_a_repeated_pattern_is_found_with_its_period(period):
    pattern = _speech_like(period, seed=period)
    codes = _speech_like(40, seed=99) + pattern * (guards.LOOP_MIN_REPEATS + 30 // period + 1)
    assert guards.loop_period(codes) in {period, *range(period, guards.LOOP_MAX_PERIOD + 1, period)}
    assert guards.loop_period(codes) == period


def test_a_loop_with_a_few_varied_codes_is_still_a_loop():
    pattern = _speech_like(8, seed=3)
    codes = pattern * 6
    codes[40] = 1023 - codes[40]  # one varied code spoils 2 of the 24 comparisons: 92% match
    assert guards.loop_period(codes) == 8


def test_a_short_stutter_is_not_a_loop():
    pattern = _speech_like(3, seed=5)
    codes = _speech_like(60, seed=6) + pattern * 4  # 12 frames < LOOP_MIN_FRAMES
    assert guards.loop_period(codes) is None


def test_three_seconds_of_one_or_two_codes_is_silence():
    speech = _speech_like(50)
    assert guards.is_silent(speech + [7] * guards.SILENCE_FRAMES)
    assert guards.is_silent(speech + [7, 7, 9] * 13)
    assert not guards.is_silent(speech + [7] * (guards.SILENCE_FRAMES - 2))  # two speech codes still in view


def test_a_short_pause_is_not_silence():
    assert not guards.is_silent(_speech_like(40) + [7] * 20 + _speech_like(40, seed=1))


def test_a_cap_that_max_new_frames_already_enforces_is_left_out():
    assert guards.RunawayGuard.for_texts(["Hello world.", "Hello world."], 57).caps == [None, None]
    assert guards.RunawayGuard.for_texts(["Hello world."], 58).caps == [57]


def test_guard_ends_each_row_once_with_its_reason():
    guard = guards.RunawayGuard(caps=[375, 375, 10])
    speech, loop = _speech_like(200, seed=1), _speech_like(4, seed=2) * 50
    stopped = {}
    for frame in range(200):
        silent = 5 if frame >= 20 else speech[frame]
        for row in guard.observe([loop[frame], silent, speech[frame]], [True, True, row_active(stopped)]):
            stopped[row] = frame + 1
    assert {row: stop.reason for row, stop in guard.stops.items()} == {
        0: guards.LOOP, 1: guards.SILENCE, 2: guards.FRAME_CAP}
    assert guard.stops[2].frames == 10 and guard.stops[1].frames == 19 + guards.SILENCE_FRAMES  # the last speech code is the 2nd value
    assert guard.stops[0].frames == 28  # period 4: 7 periods make the 2 s span


def row_active(stopped):
    return 2 not in stopped


def test_guard_ends_a_tiny_model_chunk_long_before_max_new_frames():
    model = checkpoints.always_continue_tiny_model(seed=3).eval()
    rows = torch.full((6, model.config.n_vq + 1), model.config.audio_pad_token_id, dtype=torch.long)
    rows[:, 0] = torch.arange(6) + 10
    settings = generation.GenerationSettings(max_new_frames=375).checked(model.config.n_vq)
    decoder = generation.SlotDecoder(model, 1, 6 + 375, ("eager", "eager"))
    guard = guards.RunawayGuard.for_texts(["Hello world."], 375)
    group = generation.Group([0], settings, guard=guard)
    decoder.start(group, [rows], "eager")
    frames = 0
    while decoder.groups:
        frames += sum(output.codes is not None for output in decoder.frame())
    assert frames == guard.stops[0].frames <= guards.frame_cap("Hello world.", 375) == 57
    assert guard.stops[0].reason in (guards.FRAME_CAP, guards.LOOP, guards.SILENCE)


def test_unguarded_tiny_model_runs_to_max_new_frames():
    model = checkpoints.always_continue_tiny_model(seed=3).eval()
    rows = torch.full((6, model.config.n_vq + 1), model.config.audio_pad_token_id, dtype=torch.long)
    rows[:, 0] = torch.arange(6) + 10
    output = model.generate(rows, max_new_frames=80)
    assert output.audio_token_ids.shape[1] == 80


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest import shared_path
    from tiny_repository import write_tiny_repository

    modeling = import_module("modeling_moss_tts_nano")
    repo = write_tiny_repository(tmp_path_factory.mktemp("guard_repo"), shared_path("assets", "tokenizer.model"))
    return modeling.MossTTSNanoForCausalLM.from_pretrained(str(repo)).eval()


GUARDED = dict(mode="voice_clone", voice_clone_max_text_tokens=5, do_sample=True, max_new_frames=375, progress=False,
               runaway_guards=True)


def test_inference_ends_runaway_chunks_and_reports_them(tiny_model, prompt_wav, caplog):
    torch.manual_seed(0)
    with caplog.at_level("WARNING"):
        result = tiny_model.inference("Hello world. This is a test.", None, prompt_audio_path=str(prompt_wav), **GUARDED)
    chunks, stops = result["voice_clone_text_chunks"], result["runaway_stops"]
    assert [stop["chunk"] for stop in stops] == [0, 1] and [stop["text"] for stop in stops] == chunks
    assert all(stop["frames"] <= guards.frame_cap(chunk, 375) < 100 for stop, chunk in zip(stops, chunks))
    assert result["audio_token_ids"].shape[0] == sum(stop["frames"] for stop in stops)
    assert "ended early by a runaway guard" in caplog.text
    assert "reached max_new_frames" not in caplog.text


def test_streamed_inference_ends_runaway_chunks_the_same_way(tiny_model, prompt_wav):
    torch.manual_seed(0)
    events = list(tiny_model.inference_stream("Hello world. This is a test.", None, prompt_audio_path=str(prompt_wav),
                                              **GUARDED))
    stops = events[-1]["runaway_stops"]
    assert [stop["chunk"] for stop in stops] == [0, 1]
    assert events[-1]["audio_token_ids"].shape[0] == sum(stop["frames"] for stop in stops) < 200


def test_without_guards_inference_keeps_upstreams_frames(tiny_model, prompt_wav):
    result = tiny_model.inference("Hello world.", None, prompt_audio_path=str(prompt_wav),
                                  **{**GUARDED, "runaway_guards": False, "max_new_frames": 90, "do_sample": False})
    assert "runaway_stops" not in result and result["audio_token_ids"].shape[0] == 90


def test_the_engine_guards_only_the_requests_that_ask_beside_others():
    engine_module = import_module("engine")
    model = checkpoints.always_continue_tiny_model(seed=31).eval()
    rows = torch.full((8, 17), 1024)
    rows[:, 0] = torch.arange(8) + 10
    rows[-1, 0] = 6

    def request(guarded):
        settings = generation.GenerationSettings(max_new_frames=80, do_sample=True)
        return engine_module.EngineRequest([engine_module.ChunkPrompt(rows, 0.0, "Hi.")], settings, seed=1,
                                           decode_audio=False, runaway_guards=guarded)

    engine = engine_module.SpeechEngine(model, None, num_slots=2, max_positions=96)
    guarded, free = engine.submit(request(True)), engine.submit(request(False))
    for _ in range(200):
        if not engine.step():
            break
    (guarded_end,), (free_end,) = guarded.pending()[-1:], free.pending()[-1:]
    assert guarded_end.stops[0].reason == guards.FRAME_CAP and guarded_end.codes[0].shape[0] == 44
    assert free_end.stops == [None] and free_end.codes[0].shape[0] == 80 and free_end.truncated == [True]
