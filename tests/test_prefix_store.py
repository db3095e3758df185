"""The voice prefix store (prefix_store.py): a voice's shared prompt rows prefilled once, then copied into slots.

The promise: a request whose prefix comes from the store makes the same codes, bit for bit, as the same request in a
cold engine (both prefill the prefix apart from the rest), in float32 and in the quantized formats; what differs is
how many rows run through the decoder.
"""

import pytest
import torch

from conftest import SAMPLED, import_module

engine_module = import_module("engine")
generation = import_module("generation")
gpt2_decoder = import_module("gpt2_decoder")
prompting = import_module("prompting")
prefix_store = import_module("prefix_store")
synthesis_streaming = import_module("synthesis_streaming")
weight_formats = import_module("weight_formats")
checkpoints = import_module("measurement.checkpoints")

VOICE_ROWS = 20  # the shared prefix of the test prompts


@pytest.fixture(scope="module")
def model():
    return checkpoints.always_continue_tiny_model(seed=41).eval()


def _voice(seed):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.full((VOICE_ROWS, 17), 1024)
    rows[:, 0] = 8
    rows[:, 1:] = torch.randint(0, 1024, (VOICE_ROWS, 16), generator=generator)
    rows[:4, 0] = torch.randint(10, 16000, (4,), generator=generator)  # the template head
    rows[:4, 1:] = 1024
    return rows


def _text(seed, length=7):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.full((length, 17), 1024)
    rows[:, 0] = torch.randint(10, 16000, (length,), generator=generator)
    rows[-1, 0] = 6  # audio_start
    return rows


def _request(voice, texts, seed, frames=5, shared=True):
    chunks = [engine_module.ChunkPrompt(torch.cat([voice, text]), 0.0, shared_rows=VOICE_ROWS if shared else 0)
              for text in texts]
    return engine_module.EngineRequest(chunks, generation.GenerationSettings(max_new_frames=frames, **SAMPLED),
                                       seed=seed, emit_codes=True)


def _codes(engine, request):
    handle = engine.submit(request)
    engine.run_until_idle()
    final = handle.pending()[-1]
    assert isinstance(final, engine_module.FinishedEvent), final
    return final.codes


def _engine(model, store_bytes=2**24, slots=2):
    return engine_module.SpeechEngine(model, None, num_slots=slots, max_positions=64, prefix_store_bytes=store_bytes)


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_stored_voice_gives_the_codes_of_a_cold_prefill_bit_for_bit(model):
    voice = _voice(1)
    warm = _engine(model)
    _codes(warm, _request(voice, [_text(2)], seed=5))  # stores the voice
    assert (warm.prefixes.hits, warm.prefixes.misses, len(warm.prefixes)) == (0, 1, 1)
    reused = _codes(warm, _request(voice, [_text(3)], seed=7))
    assert warm.prefixes.hits == 1
    cold = _codes(_engine(model), _request(voice, [_text(3)], seed=7))
    assert _same(reused, cold)


def test_the_chunks_of_one_request_share_its_voice(model):
    engine = _engine(model)
    texts = [_text(4), _text(5, length=9), _text(6, length=5)]
    codes = _codes(engine, _request(_voice(2), texts, seed=11))
    assert (engine.prefixes.misses, engine.prefixes.hits) == (1, 2)
    unshared = _codes(_engine(model, store_bytes=0), _request(_voice(2), texts, seed=11))
    assert _same(codes, unshared)  # a store that keeps nothing prefills in the same two parts every time


def test_voices_are_told_apart_by_their_rows(model):
    engine = _engine(model)
    _codes(engine, _request(_voice(3), [_text(8)], seed=13))
    other_voice = _voice(3)
    other_voice[10, 5] += 1  # one code differs
    second = _codes(engine, _request(other_voice, [_text(8)], seed=13))
    assert (engine.prefixes.misses, engine.prefixes.hits, len(engine.prefixes)) == (2, 0, 2)
    assert _same(second, _codes(_engine(model), _request(other_voice, [_text(8)], seed=13)))


def test_a_stored_prefix_matches_a_whole_prompt_prefill_to_float_rounding(model):
    """The two-part prefill attends as the whole one does (same positions, causal over the prefix): keys, values and
    hidden states agree to float rounding, and a second request's copied prefix is exactly the first's."""
    decoder = model.transformer
    rows = torch.cat([_voice(4), _text(9)])
    embedded = model._embed_rows(rows[None])
    attention = gpt2_decoder.attention_function("sdpa")
    whole, split = (gpt2_decoder.KVCache.for_decoder(decoder, 1, 64) for _ in range(2))
    with torch.no_grad():
        hidden = decoder.prefill(embedded, whole, 0, attention)
        decoder.prefill(embedded[:, :VOICE_ROWS], split, 0, attention)
        keys, values = split.prefix(0, VOICE_ROWS)
        copied = gpt2_decoder.KVCache.for_decoder(decoder, 1, 64)
        copied.write_prefix(0, [k.clone() for k in keys], [v.clone() for v in values])
        rest = decoder.prefill(embedded[:, VOICE_ROWS:], copied, 0, attention, start=VOICE_ROWS)
    length = rows.shape[0]
    assert int(copied.positions[0]) == length and bool(copied.key_mask[0, :length].all())
    assert not bool(copied.key_mask[0, length:].any())
    for a, b in zip(whole.keys + whole.values, copied.keys + copied.values):
        torch.testing.assert_close(a[0, :, :length], b[0, :, :length], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[:, VOICE_ROWS:], rest, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight_format", ["int8", "bf16"])
def test_reuse_is_exact_in_the_quantized_formats_too(weight_format):
    """int8 quantizes each call's activations with one scale: the prefix alone is quantized the same way whether its
    keys were stored or are being computed, so reuse stays exact."""
    model = checkpoints.always_continue_tiny_model(seed=42).eval()
    weight_formats.apply_weight_format(model, weight_format)
    voice = _voice(5)
    warm = _engine(model)
    _codes(warm, _request(voice, [_text(10)], seed=17))
    reused = _codes(warm, _request(voice, [_text(11)], seed=19))
    assert warm.prefixes.hits == 1
    assert _same(reused, _codes(_engine(model), _request(voice, [_text(11)], seed=19)))


def test_without_a_store_prompts_are_prefilled_whole():
    model = checkpoints.always_continue_tiny_model(seed=43).eval()
    engine = engine_module.SpeechEngine(model, None, num_slots=1, max_positions=64)
    assert engine.prefixes is None
    prompt = torch.cat([_voice(6), _text(12)])
    assert engine.decoder.rows_to_prefill(prompt, VOICE_ROWS) == prompt.shape[0] - 1
    _codes(engine, _request(_voice(6), [_text(12)], seed=3))
    stored = _engine(model)
    assert stored.decoder.rows_to_prefill(prompt, VOICE_ROWS) == prompt.shape[0] - 1
    _codes(stored, _request(_voice(6), [_text(13)], seed=3))
    assert stored.decoder.rows_to_prefill(prompt, VOICE_ROWS) == prompt.shape[0] - 1 - VOICE_ROWS


def test_the_store_keeps_within_its_budget_dropping_the_least_recently_used():
    def entry(seed):
        return [torch.full((2, 10, 4), float(seed))], [torch.full((2, 10, 4), -float(seed))]  # 640 bytes

    store = prefix_store.PrefixStore(budget_bytes=1300)  # two entries
    voices = [_voice(seed) for seed in range(3)]
    store.add(voices[0], *entry(0))
    store.add(voices[1], *entry(1))
    assert store.find(voices[0]) is not None  # now the most recently used
    store.add(voices[2], *entry(2))
    assert len(store) == 2 and store.nbytes <= 1300
    assert store.peek(voices[0]) and store.peek(voices[2]) and not store.peek(voices[1])
    assert torch.equal(store.find(voices[2]).keys[0], entry(2)[0][0])
    assert (store.hits, store.misses) == (2, 0)
    assert store.find(voices[1]) is None and store.misses == 1
    store.add(_voice(9), [torch.full((2, 10, 4), float("nan"))], entry(0)[1])
    assert not store.peek(_voice(9))  # a non-finite prefix is never stored
    too_big = prefix_store.PrefixStore(budget_bytes=100)
    too_big.add(voices[0], *entry(0))
    assert len(too_big) == 0
    with pytest.raises(ValueError, match="budget_bytes=-1"):
        prefix_store.PrefixStore(budget_bytes=-1)


def test_the_stored_copy_is_not_the_slot(model):
    """A later owner of the slot writes its own keys; the stored prefix keeps the first request's values."""
    engine = _engine(model, slots=1)
    voice = _voice(7)
    _codes(engine, _request(voice, [_text(14)], seed=1))
    stored = engine.prefixes.find(voice)
    before = [k.clone() for k in stored.keys]
    _codes(engine, _request(_voice(8), [_text(15)], seed=2))  # same slot, other voice
    assert all(torch.equal(a, b) for a, b in zip(before, stored.keys))


def test_voice_clone_prompts_share_exactly_the_voice_rows(tokenizer):
    config = checkpoints.tiny_config()
    codes = torch.randint(0, 1024, (6, config.n_vq), generator=torch.Generator().manual_seed(0))
    shared = prompting.shared_prefix_rows(tokenizer, config, "voice_clone", codes)
    assert shared == 13 + 1 + 6 + 1 + 56  # spec tts.md §5.2: user prefix, audio_start, codes, audio_end, template
    first, _ = prompting.build_prompt_rows(tokenizer, config, "voice_clone", "Hello there.", None, codes)
    second, _ = prompting.build_prompt_rows(tokenizer, config, "voice_clone", "Good morning!", None, codes)
    assert torch.equal(first[0, :shared], second[0, :shared])
    assert not torch.equal(first[0, shared], second[0, shared])  # the texts start right after
    text_only = prompting.shared_prefix_rows(tokenizer, config, "continuation")
    a, _ = prompting.build_prompt_rows(tokenizer, config, "continuation", "Hello there.")
    b, _ = prompting.build_prompt_rows(tokenizer, config, "continuation", "Good morning!")
    assert text_only == 71 and torch.equal(a[0, :text_only], b[0, :text_only])


def test_engine_requests_carry_the_shared_rows(tokenizer):
    model = checkpoints.always_continue_tiny_model(seed=44).eval()
    codes = torch.randint(0, 1024, (5, model.config.n_vq), generator=torch.Generator().manual_seed(1))
    request = synthesis_streaming.engine_request(model, tokenizer, "One sentence here. And another one there.",
                                                 "voice_clone", codes, voice_clone_max_text_tokens=5)
    assert len(request.chunks) >= 2
    assert {chunk.shared_rows for chunk in request.chunks} == {13 + 1 + 5 + 1 + 56}
