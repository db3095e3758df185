"""A joining request's start-up work, spread over ticks while streams play: chunked prefill
(SpeechEngine(prefill_chunk_rows=...), SlotDecoder.begin / fill / join) and the codec prime (codec_prime, one pass
per tick).

The promises: where a prompt's chunks fall depends on the prompt alone, so a request's codes are the same whether its
chunks run in one tick or one per tick beside playing streams; a chunked prompt's keys and values match a whole
prefill to float rounding; while streams play, a tick runs at most one chunk, so a long prompt cannot stall them. A
prime streamed a pass at a time leaves the codec exactly where one call of it would.
"""

import pytest
import torch

from conftest import SAMPLED, import_module, shared_path

engine_module = import_module("engine")
generation = import_module("generation")
checkpoints = import_module("measurement.checkpoints")

VOICE_ROWS = 20


@pytest.fixture(scope="module")
def model():
    return checkpoints.always_continue_tiny_model(seed=51).eval()


@pytest.fixture(scope="module")
def codec():
    folder = shared_path("golden", "codec_tiny")
    return import_module("modeling_moss_audio_tokenizer").MossAudioTokenizerModel.from_pretrained(str(folder)).eval()


def _prompt(seed, length=30):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.full((length, 17), 1024)
    rows[:, 0] = torch.randint(10, 16000, (length,), generator=generator)
    audio = slice(4, min(VOICE_ROWS, length - 1))  # reference-audio rows
    rows[audio, 0] = 8
    rows[audio, 1:] = torch.randint(0, 1024, (len(range(length)[audio]), 16), generator=generator)
    rows[-1, 0] = 6  # audio_start
    return rows


def _request(seed, frames=6, length=30, shared=0):
    chunk = engine_module.ChunkPrompt(_prompt(seed, length), 0.0, shared_rows=shared)
    return engine_module.EngineRequest([chunk], generation.GenerationSettings(max_new_frames=frames, **SAMPLED),
                                       seed=seed, emit_codes=True)


def _settings(frames=6):
    return generation.GenerationSettings(max_new_frames=frames, **SAMPLED).checked(16)


def _final(handle):
    final = handle.pending()[-1]
    assert isinstance(final, engine_module.FinishedEvent), final
    return final.codes


@pytest.mark.parametrize("chunk_rows, stored, expected", [
    (8, False, [(0, 8), (8, 16), (16, 20), (20, 28), (28, 29)]),
    (8, True, [(20, 28), (28, 29)]),
    (None, False, [(0, 20), (20, 29)]),
    (64, False, [(0, 20), (20, 29)]),
])
def test_chunks_are_counted_from_each_part_of_the_prompt(model, chunk_rows, stored, expected):
    """Rows 0..28 run through the decoder (row 29 is fed by the first frame); the voice's 20 rows are one part, the
    rest another, and a stored voice is copied in, not run."""
    decoder = generation.SlotDecoder(model, 1, 64, ("sdpa", "sdpa"), prefixes=import_module("prefix_store")
                                     .PrefixStore(2**24))
    prompt = _prompt(1)
    if stored:
        decoder.start(generation.Group([0], _settings()), [prompt], "sdpa", VOICE_ROWS)
        decoder.finish(decoder.groups[0])
    fill, = decoder.begin(generation.Group([0], _settings()), [prompt], "sdpa", VOICE_ROWS, chunk_rows)
    assert fill.chunks == expected and fill.rows_left == sum(b - a for a, b in expected)


def test_a_chunked_prompt_matches_a_whole_prefill_to_float_rounding(model):
    prompt = _prompt(2)
    caches = []
    for chunk_rows in (None, 7):
        decoder = generation.SlotDecoder(model, 1, 64, ("sdpa", "sdpa"))
        fills = decoder.begin(generation.Group([0], _settings()), [prompt], "sdpa", chunk_rows=chunk_rows)
        assert decoder.fill(fills) == prompt.shape[0] - 1
        caches.append(decoder.global_cache)
    length = prompt.shape[0] - 1
    for whole, chunked in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        torch.testing.assert_close(whole[0, :, :length], chunked[0, :, :length], atol=1e-5, rtol=1e-5)
    assert torch.equal(caches[0].key_mask, caches[1].key_mask)


def test_chunks_run_between_other_slots_frames_give_the_codes_of_chunks_run_at_once(model):
    """A slot being prefilled is an empty row to the frames of the slots around it: the masked key a frame writes at
    its next position is overwritten by its next chunk."""
    target = generation.Group([0], _settings(), torch.Generator().manual_seed(3))
    alone = generation.SlotDecoder(model, 2, 64, ("sdpa", "sdpa"))
    fills = alone.begin(target, [_prompt(3)], "sdpa", chunk_rows=5)
    alone.fill(fills)
    alone.join(target, fills)
    expected = _frames(alone, target)

    beside = generation.SlotDecoder(model, 2, 64, ("sdpa", "sdpa"))
    other = generation.Group([1], _settings(frames=20), torch.Generator().manual_seed(4))
    beside.start(other, [_prompt(4, length=12)], "sdpa")
    target = generation.Group([0], _settings(), torch.Generator().manual_seed(3))
    fills = beside.begin(target, [_prompt(3)], "sdpa", chunk_rows=5)
    while fills[0].chunks:
        assert beside.fill(fills, 1) <= 5
        beside.frame()  # the other slot's frame, this slot empty
    beside.join(target, fills)
    assert all(torch.equal(a, b) for a, b in zip(_frames(beside, target), expected))


def _frames(decoder, group):
    codes = []
    while group in decoder.groups:
        codes += [output.codes for output in decoder.frame() if output.group is group and output.codes is not None]
    return codes


def test_a_request_gives_the_same_codes_whether_its_chunks_run_at_once_or_beside_a_playing_stream(model, codec):
    engine = engine_module.SpeechEngine(model, codec, num_slots=2, max_positions=96, prefill_chunk_rows=6)
    alone = engine.submit(_request(seed=7, frames=6))
    engine.run_until_idle()

    ran = []
    fill = engine.decoder.fill
    engine.decoder.fill = lambda fills, chunks=None: ran.append(fill(fills, chunks)) or ran[-1]
    playing = engine.submit(_request(seed=8, frames=40, length=8))
    for _ in range(200):
        engine.step()
        if engine._running and next(iter(engine._running.values())).first_emit_time is not None:
            break
    ran.clear()
    joining = engine.submit(_request(seed=7, frames=6))
    ticks = 0
    while not joining.admitted.is_set() or any(s.fill is not None for s in engine._running.values()):
        engine.step()
        ticks += 1
        assert ticks < 100
    engine.run_until_idle()
    assert isinstance(playing.pending()[-1], engine_module.FinishedEvent)
    assert max(ran) <= 6 and sum(ran) == 29 and ticks >= 5  # 29 rows in chunks of 6, one per tick
    assert all(torch.equal(a, b) for a, b in zip(_final(joining), _final(alone)))


def test_with_nothing_playing_a_prompt_is_prefilled_in_one_tick(model, caplog):
    with caplog.at_level("INFO", logger="moss_tts_nano.engine"):
        engine = engine_module.SpeechEngine(model, None, num_slots=1, max_positions=64, prefill_chunk_rows=4)
    assert "prefill in chunks of 4 rows" in caplog.text  # the load line says how prompts are prefilled
    handle = engine.submit(_request(seed=9))
    engine.step()
    assert engine.decoder.groups and all(s.fill is None for s in engine._running.values())
    engine.run_until_idle()
    assert len(_final(handle)[0]) == 6


@pytest.mark.parametrize("rows", [0, -3])
def test_a_chunk_must_hold_a_row(model, rows):
    with pytest.raises(ValueError, match=f"prefill_chunk_rows {rows}; expected"):
        engine_module.SpeechEngine(model, None, num_slots=1, max_positions=64, prefill_chunk_rows=rows)


def test_a_prime_streamed_a_pass_at_a_time_leaves_the_codec_where_one_call_leaves_it(codec):
    codec_streaming = import_module("codec_streaming")
    generator = torch.Generator().manual_seed(11)
    prime = torch.randint(0, 1024, (21, 16), generator=generator)  # 2 full passes and a part
    frames = torch.randint(0, 1024, (5, 16), generator=generator)
    audio = []
    for pieces in ([prime], list(prime.split(codec_streaming.CODEC_FRAMES_PER_PASS))):
        slots = codec_streaming.codec_slots(codec, 2, 16)
        for piece in pieces:
            slots.decode({1: (piece, 16)})
        audio.append(slots.decode({1: (frames, 16)})[1])
    assert torch.equal(audio[0], audio[1])


def test_a_primed_request_beside_a_playing_stream_is_primed_a_pass_per_tick_and_sounds_as_alone(model, codec):
    generator = torch.Generator().manual_seed(12)
    primed = _request(seed=13, frames=6, length=12)
    primed.codec_prime = torch.randint(0, 1024, (30, 16), generator=generator)  # 4 passes
    engine = engine_module.SpeechEngine(model, codec, num_slots=2, max_positions=96)
    alone = engine.submit(primed)
    engine.run_until_idle()

    calls = []
    decode = engine.codec.decode
    engine.codec.decode = lambda work: calls.append({slot: codes.shape[0] for slot, (codes, _) in work.items()}) \
        or decode(work)
    playing = engine.submit(_request(seed=14, frames=40, length=8))
    for _ in range(200):
        engine.step()
        if any(s.first_emit_time is not None for s in engine._running.values()):
            break
    calls.clear()
    beside = engine.submit(primed)
    engine.run_until_idle()
    slot = 1
    priming = [call for call in calls if call.get(slot) and len(call) == 1][:4]
    assert [call[slot] for call in priming] == [8, 8, 8, 6]
    assert isinstance(playing.pending()[-1], engine_module.FinishedEvent)
    events = [alone.pending(), beside.pending()]
    assert all(isinstance(run[-1], engine_module.FinishedEvent) for run in events)
    assert all(torch.equal(a, b) for a, b in zip(events[1][-1].codes, events[0][-1].codes))
    sound = [torch.cat([e.waveform for e in run if isinstance(e, engine_module.AudioEvent)], dim=-1) for run in events]
    torch.testing.assert_close(sound[1], sound[0], atol=2e-5, rtol=0)
