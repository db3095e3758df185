"""Decoder, cache, attention-table and generation-loop behaviour on tiny random models (CPU, seconds)."""

import pytest
import torch

from child_process import run_child
from conftest import import_module
from reference_generation import reference_generate

checkpoints = import_module("measurement.checkpoints")
decoder = import_module("gpt2_decoder")
devices = import_module("devices")
sampling = import_module("sampling")

SAMPLED = dict(do_sample=True, audio_temperature=0.8, audio_top_p=0.95, audio_top_k=25,
               audio_repetition_penalty=1.2, text_temperature=1.0)


@pytest.fixture(scope="module")
def model():
    return checkpoints.random_tiny_model(seed=11)


def _prompt(length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1024, (1, length, 17), generator=generator)
    ids[..., 0] = torch.randint(10, 16384, (1, length), generator=generator)
    ids[0, : length // 2, 1:] = 1024  # text rows, then audio rows
    return ids


def _batch(model, rows):
    masks = [torch.ones(1, row.shape[1], dtype=torch.bool) for row in rows]
    return model._left_pad_inference_batch(rows, masks, device="cpu")


def test_rope_rotates_adjacent_pairs_not_halves():
    x = torch.randn(1, 1, 1, 8)
    rotary = decoder.MossTTSNanoGPT2RotaryEmbedding(8, base=10000.0)
    cos, sin = rotary(torch.tensor([[5]]), torch.float32)
    out = decoder.apply_rotary(x, cos, sin)[0, 0, 0]
    angles = 5.0 * rotary.inv_freq(torch.device("cpu"))
    for i, angle in enumerate(angles):
        x0, x1 = x[0, 0, 0, 2 * i], x[0, 0, 0, 2 * i + 1]
        torch.testing.assert_close(out[2 * i], x0 * angle.cos() - x1 * angle.sin())
        torch.testing.assert_close(out[2 * i + 1], x1 * angle.cos() + x0 * angle.sin())


def test_positions_start_at_zero_after_left_padding():
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    assert decoder.position_ids_from_mask(mask, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert decoder.position_ids_from_mask(mask, 1).tolist() == [[2], [4]]


def test_attention_mask_is_causal_and_never_fully_closed():
    mask = decoder.build_attention_mask(torch.tensor([[False, True, True]]), 3)[0, 0]
    assert mask.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


@pytest.mark.parametrize("name", [n for n in decoder.ATTENTION_FUNCTIONS if n != "eager"])
def test_each_available_backend_equals_eager(model, name):
    if devices.resolve_attention(name, "cpu", torch.float32) != name:
        pytest.skip(f"{name} cannot run on this machine's CPU")
    rows = [_prompt(9, seed=1), _prompt(6, seed=2)]
    ids, mask = _batch(model, rows)
    eager = model(ids, mask, attn_implementation="eager").global_hidden_states
    other = model(ids, mask, attn_implementation=name).global_hidden_states
    torch.testing.assert_close(other, eager, atol=1e-5, rtol=1e-5)
    generated = model.generate(ids, mask, max_new_frames=4, attn_implementation=name).audio_token_ids
    assert torch.equal(generated, model.generate(ids, mask, max_new_frames=4, attn_implementation="eager")
                       .audio_token_ids)


def test_pad_positions_come_out_exactly_zero(model):
    ids, mask = _batch(model, [_prompt(8, seed=3), _prompt(5, seed=4)])
    hidden = model(ids, mask).global_hidden_states
    assert torch.count_nonzero(hidden[1, :3]) == 0


def test_cached_forward_equals_full_recomputation(model):
    ids, mask = _batch(model, [_prompt(10, seed=5), _prompt(7, seed=6)])
    full = model(ids, mask).global_hidden_states
    first = model(ids[:, :6], mask[:, :6], use_cache=True, max_cache_length=10)
    cache = first.past_key_values
    rest = model(ids[:, 6:8], mask[:, :8], past_key_values=cache).global_hidden_states
    last = model(ids[:, 8:], mask, past_key_values=cache).global_hidden_states
    torch.testing.assert_close(torch.cat([first.global_hidden_states, rest, last], 1), full, atol=1e-5, rtol=1e-5)


def test_legacy_cache_tuples_round_trip(model):
    ids = _prompt(7, seed=7)
    cache = model(ids[:, :5], use_cache=True).past_key_values
    legacy = cache.to_legacy()
    assert legacy[0][0].shape == (1, 5, 4, 16)  # upstream layout [B, T, H, D]
    continued = model(ids[:, 5:], past_key_values=legacy).global_hidden_states
    torch.testing.assert_close(continued, model(ids).global_hidden_states[:, 5:], atol=1e-5, rtol=1e-5)


def test_cache_overflow_raises_value_error():
    cache = decoder.KVCache(1, 1, 2, 3, 4, torch.float32, "cpu")
    cache.sequence_write(slice(None), 0, 3)
    with pytest.raises(ValueError, match="overflow"):
        cache.sequence_write(slice(None), 3, 1)


def test_cache_writes_in_place_into_preallocated_buffers():
    cache = decoder.KVCache(2, 3, 2, 8, 4, torch.float32, "cpu")
    pointer = cache.keys[1].data_ptr()
    keys, _ = cache.sequence_write(slice(1, 2), 0, 3).update(1, torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    assert cache.keys[1].data_ptr() == pointer and keys.untyped_storage().data_ptr() == pointer
    assert keys.shape == (1, 2, 3, 4) and cache.keys[1][1, :, :3].eq(1).all() and cache.keys[1][0].eq(0).all()
    assert cache.positions.tolist() == [0, 3, 0] and cache.key_mask[1].tolist() == [True] * 3 + [False] * 5


def test_decode_step_writes_each_slot_at_its_own_position():
    model = checkpoints.random_tiny_model(seed=3)
    cache = decoder.KVCache.for_decoder(model.transformer, 2, 8)
    cache.positions.copy_(torch.tensor([2, 5]))
    cache.key_mask[0, :2] = True
    cache.key_mask[1, :5] = True
    model.transformer.decode_step(torch.randn(2, 1, 64), torch.tensor([True, False]), cache, 6,
                                  decoder.attention_function("sdpa"))
    assert cache.positions.tolist() == [3, 5]  # a masked row (False) does not advance
    assert cache.key_mask.sum(-1).tolist() == [3, 5] and not cache.key_mask[1, 5]


@pytest.mark.parametrize("options", [dict(do_sample=False, audio_repetition_penalty=1.3), SAMPLED,
                                     dict(SAMPLED, nq=5, audio_top_k=0, text_top_p=0.7)])
def test_generation_equals_upstreams_algorithm_recomputed_from_scratch(model, options):
    ids, mask = _batch(model, [_prompt(9, seed=8), _prompt(6, seed=9)])
    torch.manual_seed(5)
    ours = model.generate(ids, mask, max_new_frames=5, **options).audio_token_ids
    torch.manual_seed(5)
    reference = reference_generate(model, ids, mask, 5, **options)
    assert torch.equal(ours, reference)


def test_batch_of_two_equals_each_row_alone(model):
    rows = [_prompt(9, seed=10), _prompt(6, seed=11)]
    ids, mask = _batch(model, rows)
    batch = model.generate(ids, mask, max_new_frames=5, audio_repetition_penalty=1.2).audio_token_ids
    for index, row in enumerate(rows):
        alone = model.generate(row, max_new_frames=5, audio_repetition_penalty=1.2).audio_token_ids[0]
        assert torch.equal(batch[index, : alone.shape[0]], alone)


def test_nq_pads_the_other_channels(model):
    codes = model.generate(_prompt(6), max_new_frames=3, nq=3).audio_token_ids
    assert (codes[..., 3:] == 1024).all() and (codes[..., :3] < 1024).all()


def test_stream_events_describe_each_frame_then_the_result(model):
    events = list(model.generate_stream(_prompt(6), max_new_frames=3))
    frames, final = events[:-1], events[-1]
    assert [event["type"] for event in frames] == ["frame"] * len(frames) and final["type"] == "final"
    codes = final["generation"].audio_token_ids
    assert codes.shape == (1, len(frames), 16)
    for event in frames:
        assert torch.equal(event["audio_token_ids"], codes[:, event["step_index"]])
        assert event["active_mask"].dtype == torch.bool and event["finished_mask"].shape == (1,)


def _settings(rows, vocab, **values):
    row = (values.get("do_sample", False), values.get("temperature", 1.0), values.get("top_k", 0),
           values.get("top_p", 1.0), values.get("repetition_penalty", 1.0))
    return sampling.RowSettings.build([row] * rows, vocab, "cpu")


def test_stop_decision_picks_continue_on_a_tie(model):
    state_logits = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    assert sampling.sample_rows(state_logits, _settings(2, 2)).tolist() == [0, 1]


def test_non_finite_logits_raise_runtime_error():
    broken = checkpoints.random_tiny_model(seed=12)
    with torch.no_grad():
        broken.audio_embeddings[0].weight.fill_(float("nan"))  # the tied head of channel 0 -> nan logits
    with pytest.raises(RuntimeError, match="Non-finite"):
        broken.generate(_prompt(6, seed=13), max_new_frames=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(nq=0), "nq"), (dict(nq=17), "nq"), (dict(do_sample=True, audio_temperature=0.0), "temperature"),
    (dict(audio_repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_generation_arguments_raise_value_error(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(_prompt(4), max_new_frames=1, **kwargs)


def test_out_of_range_codes_raise_value_error(model):
    ids = _prompt(4)
    ids[0, 3, 5] = 2000
    with pytest.raises(ValueError, match="codebook"):
        model(ids)


def test_labels_are_not_supported(model):
    with pytest.raises(NotImplementedError):
        model(_prompt(4), labels=torch.zeros(1, 4, dtype=torch.long))


def test_unknown_attention_request_raises_value_error(model):
    with pytest.raises(ValueError, match="unknown attention"):
        model._set_attention_implementation("paged_attention")


def test_repetition_penalty_applies_once_per_seen_id_also_in_greedy():
    logits = torch.tensor([[2.0, -2.0, 1.9, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    penalised = sampling.apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(penalised, torch.tensor([[1.0, -4.0, 1.9, 0.0]]))
    assert sampling.sample_rows(logits, _settings(1, 4, repetition_penalty=2.0), seen=seen).tolist() == [2]


def test_top_k_keeps_ties_and_top_p_keeps_the_crossing_token():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(sampling.top_k_filter(logits, 2)).tolist() == [[True, True, True, False]]
    probs_logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(sampling.top_p_filter(probs_logits, 0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(sampling.top_p_filter(probs_logits, 0.1)).tolist() == [[True, False, False, False]]


def test_sampling_with_drawn_noise_is_torch_multinomial_bit_for_bit():
    for seed in range(200):
        logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(seed)) * 3
        torch.manual_seed(seed)
        noise = sampling.draw_noise(3, 50, None, "cpu")
        ours = sampling.sample_rows(logits, _settings(3, 50, do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
                                    noise)
        torch.manual_seed(seed)
        filtered = sampling.top_p_filter(sampling.top_k_filter(logits / 0.7, 20), 0.9)
        reference = torch.multinomial(torch.softmax(filtered, -1), 1).squeeze(-1)
        assert torch.equal(ours, reference), seed


def test_top_k_candidates_sample_exactly_what_the_whole_row_filters_sample(monkeypatch):
    """float32 rows that all use top-k are filtered on their k best logits: the same tokens, draw for draw, as
    filtering the whole 1024-wide row (upstream's way), for mixed per-row settings."""
    generator, candidates_max = torch.Generator().manual_seed(5), sampling.CANDIDATES_MAX
    rows = [(True, 0.8, 25, 0.95, 1.2), (True, 1.7, 25, 0.8, 1.0), (False, 1.0, 25, 1.0, 1.2), (True, 1.0, 7, 1.0, 1.5)]
    for settings in (sampling.RowSettings.build(rows, 1024, "cpu"), _settings(4, 1024, do_sample=True, top_k=25,
                                                                               temperature=0.8, top_p=0.95)):
        tokens = {}
        for width in (candidates_max, 0):  # 0: every row through the whole-row filters
            monkeypatch.setattr(sampling, "CANDIDATES_MAX", width)
            draws = torch.Generator().manual_seed(6)
            tokens[width] = [
                sampling.sample_rows(torch.randn(4, 1024, generator=generator) * scale, settings,
                                     sampling.draw_noise(4, 1024, draws, "cpu"),
                                     torch.rand(4, 1024, generator=generator) < 0.05)
                for scale in [1.0, 3.0, 8.0] * 100
            ]
            generator.manual_seed(5)
        assert all(torch.equal(a, b) for a, b in zip(*tokens.values()))


def test_16_bit_logits_keep_the_top_k_ties():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]], dtype=torch.bfloat16)  # a tie at the 2nd best value
    noise = torch.tensor([[100.0, 100.0, 1e-3, 100.0]])  # favours index 2, which only a tie-keeping filter keeps
    assert sampling.sample_rows(logits, _settings(1, 4, do_sample=True, top_k=2), noise).tolist() == [2]


def test_rows_with_different_settings_sample_as_if_alone():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 2
    rows = [(True, 0.7, 10, 0.9, 1.0), (False, 1.0, 0, 1.0, 1.3), (True, 1.3, 0, 0.5, 1.2)]
    seen = torch.rand(3, 64, generator=torch.Generator().manual_seed(2)) < 0.2
    noise = sampling.draw_noise(3, 64, torch.Generator().manual_seed(3), "cpu")
    together = sampling.sample_rows(logits, sampling.RowSettings.build(rows, 64, "cpu"), noise, seen)
    for index, row in enumerate(rows):
        alone = sampling.sample_rows(logits[index:index + 1], sampling.RowSettings.build([row], 64, "cpu"),
                                     noise[index:index + 1], seen[index:index + 1])
        assert together[index] == alone[0]


def test_generation_syncs_with_the_host_once_per_frame(fake_npu_path):
    output = run_child(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import fake_npu
        state = fake_npu.install(level=2)  # before transformers and the model are imported
        import torch
        from local_package import import_module
        checkpoints = import_module("measurement.checkpoints")
        model = checkpoints.random_tiny_model(seed=11)
        ids = torch.full((1, 6, 17), 1024); ids[..., 0] = 20
        torch.manual_seed(1)
        reference = model.generate(ids, max_new_frames=4, do_sample=True, audio_repetition_penalty=1.2).audio_token_ids
        model.to("npu:0")
        state.reset_counters()
        torch.manual_seed(1)
        codes = model.generate(ids.to("npu:0"), max_new_frames=4, do_sample=True, audio_repetition_penalty=1.2)
        frames = codes.audio_token_ids.shape[1]
        syncs = state.syncs
        same = torch.equal(codes.audio_token_ids.cpu(), reference)
        print(frames, syncs, same, sorted(set(state.sdpa_paths)))
        """,
        str(fake_npu_path.parent),
    )
    frames, syncs, same = output.split()[:3]
    frames, syncs = int(frames), int(syncs)
    assert same == "True", output
    # prompt validation (1) + one stop check per text decision (frames, +1 if it stopped) + final check (1)
    assert syncs <= frames + 3, output


def test_trim_drops_only_trailing_all_pad_frames(model):
    codes = torch.tensor([[[1] * 16, [1024] * 16, [2] * 16, [1024] * 16], [[3] * 16] + [[1024] * 16] * 3])
    trimmed = model._trim_generated_audio_token_ids(codes)
    assert [sample.shape[0] for sample in trimmed] == [3, 1]


def test_one_cpu_draw_equals_upstreams_consecutive_per_channel_draws():
    """Upstream draws [B, V] once per channel; on the CPU one [channels * B, V] draw gives the same numbers and
    leaves the generator in the same state (that is what lets a frame's audio noise be one call per request)."""
    for channels, rows in [(16, 1), (5, 3)]:
        first = torch.Generator().manual_seed(7)
        apart = torch.stack([sampling.draw_noise(rows, 1024, first, "cpu") for _ in range(channels)])
        second = torch.Generator().manual_seed(7)
        together = sampling.draw_channel_noise(channels, rows, 1024, second, "cpu")
        assert torch.equal(together, apart) and torch.equal(first.get_state(), second.get_state())
