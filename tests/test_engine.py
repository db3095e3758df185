"""The speech engine (engine.py): many requests in one batch, each isolated from the others (tiny models, CPU).

Isolation in float32 on CPU: a request's codes are identical whether it runs alone or beside others, in any slot,
joining at any frame, greedy or seeded-sampled; its audio equals the alone run's to float rounding (the batched codec
and decoder matmuls are not bit-invariant to the batch size; about 1e-6 on audio of amplitude ~1).
"""

import copy
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SAMPLED, import_module

engine_module = import_module("engine")
generation = import_module("generation")
checkpoints = import_module("measurement.checkpoints")
FILLED_GRANULE = import_module("codec_streaming").FILLED_GRANULE
always_continue_tiny_tts = checkpoints.always_continue_tiny_model

AUDIO_TOLERANCE = dict(atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def model():
    """A random tiny TTS that always continues, so a request makes exactly max_new_frames frames."""
    return always_continue_tiny_tts(seed=31).eval()


@pytest.fixture(scope="module")
def codec():
    """The golden tiny codec: random weights scaled to unit gain (decoded audio rms ~1.5), so audio compares."""
    from conftest import shared_path

    folder = shared_path("golden", "codec_tiny")
    return import_module("modeling_moss_audio_tokenizer").MossAudioTokenizerModel.from_pretrained(str(folder)).eval()


def _rows(length, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.full((length, 17), 1024)
    rows[:, 0] = torch.randint(10, 16000, (length,), generator=generator)
    audio = torch.arange(length) >= length // 2  # text rows, then reference-audio rows
    rows[audio, 1:] = torch.randint(0, 1024, (int(audio.sum()), 16), generator=generator)
    rows[audio, 0] = 8
    rows[-1, 0] = 6
    return rows


def _request(seed, frames=6, length=10, chunks=1, **settings):
    prompts = [engine_module.ChunkPrompt(_rows(length + 2 * k, seed * 10 + k), 0.24 if k < chunks - 1 else 0.0)
               for k in range(chunks)]
    options = dict(SAMPLED)
    options.update(settings)
    return engine_module.EngineRequest(prompts, generation.GenerationSettings(max_new_frames=frames, **options),
                                       seed=seed)


def _collect(handle):
    events = handle.pending()
    audio = [e.waveform for e in events if isinstance(e, engine_module.AudioEvent)]
    final = events[-1]
    return final, (torch.cat(audio, dim=-1) if audio else None)


def _run(model, codec, requests, slots=4, joins=None):
    """Run requests in one engine; joins[i] = the tick at which request i is submitted (default all at once)."""
    engine = engine_module.SpeechEngine(model, codec, num_slots=slots, max_positions=64)
    joins = joins or [0] * len(requests)
    handles = [None] * len(requests)
    tick = 0
    while tick <= max(joins) or any(not h.done.is_set() for h in handles if h is not None):
        for index, when in enumerate(joins):
            if when == tick:
                handles[index] = engine.submit(requests[index])
        engine.step()
        tick += 1
        assert tick < 500, "the engine did not finish"
    return [_collect(handle) for handle in handles]


def test_a_request_alone_equals_the_same_request_beside_others_in_any_slot_joining_late(model, codec):
    target = _request(seed=5, frames=8)
    (alone, alone_audio), = _run(model, codec, [target])
    others = [_request(seed=s, frames=f, **extra) for s, f, extra in
              [(7, 5, {}), (8, 9, dict(do_sample=False)), (9, 7, dict(audio_top_k=5, nq=6))]]
    # the target joins third, two frames late, into slot 2 (slots 0 and 1 are busy)
    results = _run(model, codec, [others[0], others[1], target, others[2]], joins=[0, 0, 2, 3])
    together, together_audio = results[2]
    assert isinstance(together, engine_module.FinishedEvent)
    assert len(together.codes) == 1 and together.codes[0].shape[0] == 8
    assert torch.equal(together.codes[0], alone.codes[0])
    torch.testing.assert_close(together_audio, alone_audio, **AUDIO_TOLERANCE)


def test_greedy_requests_are_isolated_too(model, codec):
    greedy = _request(seed=11, frames=7, do_sample=False, audio_repetition_penalty=1.3)
    (alone, _), = _run(model, codec, [greedy], slots=2)
    results = _run(model, codec, [_request(seed=12, frames=9), greedy], slots=2, joins=[0, 1])
    assert torch.equal(results[1][0].codes[0], alone.codes[0])


def test_each_request_keeps_its_own_settings_in_a_mixed_batch(model, codec):
    requests = [_request(seed=21, frames=4, nq=3), _request(seed=22, frames=7, do_sample=False),
                _request(seed=23, frames=5, audio_temperature=1.5, audio_top_p=0.5, audio_repetition_penalty=1.0)]
    together = _run(model, codec, requests)
    for request, (final, audio) in zip(requests, together):
        (alone, alone_audio), = _run(model, codec, [request])
        assert torch.equal(final.codes[0], alone.codes[0])
        torch.testing.assert_close(audio, alone_audio, **AUDIO_TOLERANCE)
        assert final.codes[0].shape[0] == request.settings.max_new_frames
    nq3 = together[0][0].codes[0]
    assert (nq3[:, 3:] == 1024).all() and (nq3[:, :3] < 1024).all()


def test_seeded_request_with_the_global_generator_draws_what_generate_draws(model):
    request = _request(seed=0, frames=6)
    request.global_random = True
    torch.manual_seed(123)
    (final, _), = _run(model, None, [request])
    torch.manual_seed(123)
    expected = model.generate(request.chunks[0].rows, max_new_frames=6, **SAMPLED).audio_token_ids[0]
    assert torch.equal(final.codes[0], expected)


def test_chunks_run_one_after_another_in_one_slot_with_pauses(codec):
    model = always_continue_tiny_tts(seed=2)
    request = _request(seed=3, frames=3, chunks=3, do_sample=False)
    (final, audio), = _run(model, codec, [request], slots=2)
    assert [codes.shape[0] for codes in final.codes] == [3, 3, 3]
    pause = round(0.24 * 48000)
    assert audio.shape == (2, 9 * 3840 + 2 * pause)
    for index, codes in enumerate(final.codes):  # each chunk's audio is the offline decode of its codes
        start = index * (3 * 3840 + pause)
        offline = codec.batch_decode([codes.t()]).audio[0]
        torch.testing.assert_close(audio[:, start:start + 3 * 3840], offline, atol=1e-4, rtol=1e-5)
        if index < 2:
            assert audio[:, start + 3 * 3840:start + 3 * 3840 + pause].abs().max() == 0


def test_cancel_frees_the_slot_and_a_reused_slot_starts_clean(model, codec):
    engine = engine_module.SpeechEngine(model, codec, num_slots=1, max_positions=64)
    first = engine.submit(_request(seed=41, frames=20))
    for _ in range(3):
        engine.step()
    first.cancel()
    second = engine.submit(_request(seed=42, frames=6))
    engine.step()  # the cancel is applied and the newcomer takes the freed slot in the same tick
    assert first.done.is_set() and engine.active == 1
    engine.run_until_idle()
    final, _ = _collect(first)
    assert isinstance(final, engine_module.ErrorEvent) and final.cancelled
    (fresh, _), = _run(model, codec, [_request(seed=42, frames=6)], slots=1)
    assert torch.equal(_collect(second)[0].codes[0], fresh.codes[0])


def test_a_finished_request_no_longer_widens_the_codec_prefix_of_the_others(model, codec):
    """A stream's codec history is forgotten when it ends, so the ring prefix that a later, shorter stream in a higher
    slot attends follows that stream's own writes (codec_streaming: the prefix bounds every stepped row's writes).
    One frame per codec call, so that the calls do not depend on timing."""
    engine = engine_module.SpeechEngine(model, codec, num_slots=2, max_positions=64,
                                        policy=engine_module.EVERY_FRAME_STREAM_POLICY)
    last = [state for _, state in engine.codec.session._stream.stages if state is not None][-1]
    steps = []  # (filled, written per row) of the last codec stage, per codec call
    begin_step = last.begin_step

    def recording(*args):
        step = begin_step(*args)
        steps.append((step.filled, list(last.written)))
        return step

    last.begin_step = recording
    first = engine.submit(_request(seed=43, frames=9))  # fills slot 0's ring: 9 frames of 32 tokens > capacity
    for _ in range(5):
        engine.step()
    second = engine.submit(_request(seed=44, frames=9))  # slot 1, five frames behind
    while not first.done.is_set():
        engine.step()
    before = len(steps)
    engine.run_until_idle()
    assert second.done.is_set() and len(steps) > before
    for filled, written in steps[before:]:  # row 0 is stepped idle: it rewrites only slots below row 1's end
        assert written[0] <= written[1]
        assert filled == min(last.capacity, -(-written[1] // FILLED_GRANULE) * FILLED_GRANULE)
    assert steps[before][0] < steps[before - 1][0] == last.capacity


def test_an_error_in_one_request_ends_that_request_only(codec):
    model = always_continue_tiny_tts(seed=31).eval()
    with torch.no_grad():
        model.transformer.wte.weight[777] = float("nan")  # any prompt holding text id 777 gives nan logits
    poisoned = _request(seed=51, frames=5)
    poisoned.chunks[0].rows[2, 0] = 777
    healthy = _request(seed=52, frames=5)
    (alone, alone_audio), = _run(model, codec, [healthy])
    results = _run(model, codec, [poisoned, healthy])
    assert isinstance(results[0][0], engine_module.ErrorEvent) and "Non-finite" in results[0][0].message
    assert torch.equal(results[1][0].codes[0], alone.codes[0])
    torch.testing.assert_close(results[1][1], alone_audio, **AUDIO_TOLERANCE)


def test_bad_requests_are_refused_at_submit_and_a_full_queue_says_so(model):
    engine = engine_module.SpeechEngine(model, None, num_slots=1, max_positions=32, max_queue=1)
    with pytest.raises(ValueError, match="needs 50 positions"):
        engine.submit(_request(seed=1, frames=40))
    with pytest.raises(ValueError, match="nq=0"):
        engine.submit(_request(seed=1, frames=4, nq=0))
    engine.submit(_request(seed=1, frames=4))
    with pytest.raises(engine_module.QueueFullError, match="max_queue=1"):
        engine.submit(_request(seed=2, frames=4))


def test_the_engine_thread_serves_concurrent_submitters_and_drains_on_stop(model, codec):
    engine = engine_module.SpeechEngine(model, codec, num_slots=3, max_positions=64)
    engine.start()
    handles, errors = [], []

    def submit(seed):
        try:
            handles.append(engine.submit(_request(seed=seed, frames=5)))
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=submit, args=(seed,)) for seed in range(60, 65)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.stop(drain=True, timeout=60)
    assert not errors and len(handles) == 5
    for handle in handles:
        final = list(handle.events(timeout=1))[-1]
        assert isinstance(final, engine_module.FinishedEvent) and final.codes[0].shape[0] == 5


def test_serve_runs_the_engine_in_the_calling_thread_until_another_thread_stops_it(model, codec):
    engine = engine_module.SpeechEngine(model, codec, num_slots=2, max_positions=64)
    seen = {}

    def drive():
        handle = engine.submit(_request(seed=70, frames=4))
        seen["final"] = list(handle.events(timeout=60))[-1]
        seen["stopped"] = engine.stop(drain=True, timeout=60)

    helper = threading.Thread(target=drive)
    helper.start()
    engine.serve()  # returns once the helper has stopped it
    helper.join(60)
    assert seen["stopped"] and not engine.running
    assert isinstance(seen["final"], engine_module.FinishedEvent) and seen["final"].codes[0].shape[0] == 4
    (alone, _), = _run(model, codec, [_request(seed=70, frames=4)])
    assert torch.equal(seen["final"].codes[0], alone.codes[0])


def test_in_16_bits_streams_beside_others_complete_and_mostly_match_their_alone_runs(codec):
    """What holds in bfloat16 (measured: 13 of 14 streams bit-identical; a near-tie in 16-bit logits can flip one
    token, after which that stream continues differently): every stream completes with all its frames and finite
    audio, and most are bit-identical to their alone run."""
    model = always_continue_tiny_tts(seed=31).eval().to(torch.bfloat16)
    identical = 0
    for seed in range(5, 11):
        target = _request(seed=seed, frames=8, do_sample=seed % 2 == 0)
        (alone, _), = _run(model, codec, [target])
        others = [_request(seed=seed + 100 * k, frames=5 + k) for k in (1, 2, 3)]
        results = _run(model, codec, [others[0], others[1], target, others[2]], joins=[0, 0, 2, 3])
        for final, audio in results:
            assert isinstance(final, engine_module.FinishedEvent) and torch.isfinite(audio).all()
        assert results[2][0].codes[0].shape == (8, 16)
        identical += torch.equal(results[2][0].codes[0], alone.codes[0])
    assert identical >= 4


def test_one_kv_cache_class_serves_both_decoders():
    """The decoders' caches are gpt2_decoder.KVCache only (the codec's sliding-window ring is its own class)."""
    import ast

    root = checkpoints.REPO_ROOT
    caches = set()
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Cache"):
                caches.add(f"{path.stem}.{node.name}")
    assert caches == {"gpt2_decoder.KVCache", "codec_streaming.RingKVCache"}
    slots = generation.SlotDecoder(always_continue_tiny_tts(seed=1), 2, 16, ("sdpa", "sdpa"))
    assert type(slots.global_cache) is type(slots.local_cache) is import_module("gpt2_decoder").KVCache


# ----------------------------------------------------------------------------------------------------------------
# A slot forgets its previous occupant (issue 21)


def _doomed():
    """A greedy request that, on the poisoned model, makes one frame whose audio logits are NaN and fails at the next
    frame's sync (it has then written NaN keys and values into its slot's caches)."""
    return _request(seed=80, frames=6, do_sample=False)


@pytest.fixture(scope="module")
def poisoned(model):
    """A copy of the tiny model where the channel-0 embedding of the code that `_doomed` samples first is NaN.

    The embedding is untied first (channel 0's audio head shares it), so only a request that samples that code is
    hit: its next local steps, then its next global row, go NaN."""
    (healthy, _), = _run(model, None, [_doomed()], slots=1)
    code = int(healthy.codes[0][0, 0])
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        weight = poisoned.audio_embeddings[0].weight.detach().clone()
        weight[code] = float("nan")
        poisoned.audio_embeddings[0].weight = torch.nn.Parameter(weight)
    return poisoned


def test_a_request_after_one_whose_logits_went_non_finite_in_its_slot_equals_itself_alone(poisoned, codec):
    after = lambda: _request(seed=82, frames=6)  # noqa: E731 (a fresh request per run)
    (alone, alone_audio), = _run(poisoned, codec, [after()], slots=1)
    assert isinstance(alone, engine_module.FinishedEvent)  # alone, it never meets the NaN row
    (failed, _), (final, audio) = _run(poisoned, codec, [_doomed(), after()], slots=1)
    assert isinstance(failed, engine_module.ErrorEvent) and not failed.cancelled
    assert failed.code == "non_finite_logits" and "Non-finite" in failed.message
    assert isinstance(final, engine_module.FinishedEvent)
    assert torch.equal(final.codes[0], alone.codes[0])
    torch.testing.assert_close(audio, alone_audio, **AUDIO_TOLERANCE)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_in_int8_a_request_going_non_finite_ends_alone(poisoned, runtime):
    """int8 quantises each call's activations over all rows, so a NaN row used to end its neighbours too (fbgemm
    refused the call: decode_step_failed for every request). Now only the request that went non-finite ends."""
    if not import_module("weight_formats").int8_kernels_available():
        pytest.skip("this torch build has no fbgemm/oneDNN int8 kernels")
    onnx_graph = import_module("onnx_graph")
    if runtime == "onnxruntime" and not onnx_graph.onnxruntime_available():
        pytest.skip("onnxruntime and onnx are not installed (pip install -r requirements.txt)")
    int8 = import_module("weight_formats").apply_weight_format(copy.deepcopy(poisoned), "int8")
    onnx_graph.set_phases(int8, runtime)
    (failed, _), (neighbour, _) = _run(int8, None, [_doomed(), _request(seed=82, frames=6)], slots=2)
    assert isinstance(failed, engine_module.ErrorEvent) and failed.code == "non_finite_logits"
    assert isinstance(neighbour, engine_module.FinishedEvent) and neighbour.codes[0].shape[0] == 6


def test_a_stale_nan_under_the_key_mask_of_a_reused_slot_cannot_reach_the_newcomer(poisoned):
    """The newcomer's prompt is shorter than its neighbour's, so the decode step reads its slot past its own rows,
    where the failed request left NaN values (masked keys get weight 0, and 0 x NaN would be NaN)."""
    short = lambda: _request(seed=82, frames=6, length=6)  # noqa: E731
    long = lambda: _request(seed=90, frames=12, length=30)  # noqa: E731
    (short_alone, _), (long_alone, _) = _run(poisoned, None, [short(), long()], slots=2)
    engine = engine_module.SpeechEngine(poisoned, None, num_slots=2, max_positions=64)
    doomed = engine.submit(_doomed())
    engine.run_until_idle()
    assert _collect(doomed)[0].code == "non_finite_logits"
    stale = engine.decoder.global_cache.values[-1][0, :, :30]
    assert torch.isnan(stale).any()  # slot 0 really holds NaN values where the newcomer's reads will reach
    handles = [engine.submit(short()), engine.submit(long())]
    engine.run_until_idle()
    finals = [_collect(handle)[0] for handle in handles]
    assert torch.equal(finals[0].codes[0], short_alone.codes[0])
    assert torch.equal(finals[1].codes[0], long_alone.codes[0])


# ----------------------------------------------------------------------------------------------------------------
# A failure ends its own request only (issue 21)


@pytest.mark.parametrize("raises_on", ["AudioEvent", "CodesEvent", "FinishedEvent"])
def test_a_listener_that_raises_ends_its_own_request_and_the_others_keep_every_frame(model, codec, raises_on):
    """Both streams' first frames go to the codec in one call; the first stream's listener raises on its event. The
    tick goes on: the other stream gets all its audio and equals its alone run."""
    (alone, alone_audio), = _run(model, codec, [_request(seed=92, frames=5)])
    engine = engine_module.SpeechEngine(model, codec, num_slots=2, max_positions=64)
    received = []

    def listener(event):
        received.append(event)
        if type(event).__name__ == raises_on:
            raise RuntimeError("a broken client callback")

    faulty = _request(seed=91, frames=5)
    faulty.emit_codes = True
    broken = engine.submit(faulty, listener=listener)
    healthy = engine.submit(_request(seed=92, frames=5))
    for _ in range(50):  # step() itself must never raise
        if not engine.step():
            break
    assert broken.done.is_set() and healthy.done.is_set() and engine.active == 0
    final, audio = _collect(healthy)
    assert isinstance(final, engine_module.FinishedEvent)
    assert torch.equal(final.codes[0], alone.codes[0])
    torch.testing.assert_close(audio, alone_audio, **AUDIO_TOLERANCE)
    if raises_on == "FinishedEvent":
        assert isinstance(received[-1], engine_module.FinishedEvent)
    else:
        assert isinstance(received[-1], engine_module.ErrorEvent) and received[-1].code == "listener_failed"
        assert sum(type(event).__name__ == raises_on for event in received) == 1


def test_a_stop_without_drain_cancels_the_requests_it_found_and_a_restarted_engine_serves_new_ones(model):
    engine = engine_module.SpeechEngine(model, None, num_slots=1, max_positions=64)
    engine.start()
    running = engine.submit(_request(seed=93, frames=40, length=6))
    waiting = engine.submit(_request(seed=94, frames=4))
    assert engine.stop(drain=False, timeout=60)
    for handle in (running, waiting):
        final = list(handle.events(timeout=5))[-1]
        assert isinstance(final, engine_module.ErrorEvent) and final.cancelled and final.code == "cancelled"
    engine.start()
    try:
        later = engine.submit(_request(seed=95, frames=4))
        final = list(later.events(timeout=60))[-1]
    finally:
        assert engine.stop(drain=True, timeout=60)
    (alone, _), = _run(model, None, [_request(seed=95, frames=4)], slots=1)
    assert isinstance(final, engine_module.FinishedEvent) and torch.equal(final.codes[0], alone.codes[0])


# ----------------------------------------------------------------------------------------------------------------
# Property: any interleaving of submit / cancel / finish / fail across slots leaves each request equal to itself alone

NAN_TEXT_ID = 777  # in the property test's model, wte[777] is NaN: a prompt holding it fails at its first decision


def _prompt_poisoned():
    request = _request(seed=86, frames=4)
    request.chunks[0].rows[2, 0] = NAN_TEXT_ID
    return request


# What the interleavings draw from: requests that finish (sampled, greedy, nq < 16, two chunks, long and short
# prompts) and requests that fail (NaN audio logits mid-stream, NaN logits at the first decision).
POOL = (
    lambda: _request(seed=82, frames=4),
    lambda: _request(seed=83, frames=3, length=16, nq=5),
    lambda: _request(seed=84, frames=5, length=8, do_sample=False, audio_repetition_penalty=1.3),
    lambda: _request(seed=85, frames=2, length=24, audio_top_k=5),
    lambda: _request(seed=87, frames=3, chunks=2),
    _doomed,
    _prompt_poisoned,
)
ALONE: dict = {}  # (pool index, with codec) -> (frames, audio, final) of the request alone in a one-slot engine


@pytest.fixture(scope="module")
def interleaving_model(poisoned):
    model = copy.deepcopy(poisoned)
    with torch.no_grad():
        model.transformer.wte.weight[NAN_TEXT_ID] = float("nan")
    return model


def _codes_request(index):
    request = POOL[index]()
    request.emit_codes = True
    return request


def _outcome(handle):
    """(frames [(chunk, frame, codes)], audio [C, n] or None, final event) of a finished handle."""
    events = handle.pending()
    frames = [(e.chunk_index, e.frame_index, e.codes) for e in events if isinstance(e, engine_module.CodesEvent)]
    audio = [e.waveform for e in events if isinstance(e, engine_module.AudioEvent)]
    return frames, torch.cat(audio, dim=-1) if audio else None, events[-1]


def _alone(model, codec, index):
    """The request alone; its codec decodes each frame in the tick that makes it, so that the audio is the longest
    any run emits (under deadline scheduling how many frames wait for a fuller call depends on the clock)."""
    key = (index, codec is not None)
    if key not in ALONE:
        engine = engine_module.SpeechEngine(model, codec, num_slots=1, max_positions=64,
                                            policy=engine_module.EVERY_FRAME_STREAM_POLICY)
        handle = engine.submit(_codes_request(index))
        engine.run_until_idle()
        ALONE[key] = _outcome(handle)
    return ALONE[key]


def _same_frames(frames, expected) -> bool:
    return len(frames) == len(expected) and all(
        a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(frames, expected))


def _check_interleaving(model, codec, slots, operations):
    """Run `operations` on one engine, then check every request against its alone run: a request that finished or
    failed made the same frames (and audio, to float rounding) with the same outcome; a cancelled one a prefix."""
    engine = engine_module.SpeechEngine(model, codec, num_slots=slots, max_positions=64)
    submitted = []  # (pool index, handle)
    for operation, argument in operations:
        if operation == "submit":
            submitted.append((argument, engine.submit(_codes_request(argument))))
        elif operation == "cancel" and submitted:
            submitted[argument % len(submitted)][1].cancel()
        else:
            for _ in range(argument):
                engine.step()
    for _ in range(400):
        if not engine.step():
            break
    assert engine.active == 0 and engine.waiting == 0
    for index, handle in submitted:
        frames, audio, final = _outcome(handle)
        expected_frames, expected_audio, expected = _alone(model, codec, index)
        cut = isinstance(final, engine_module.ErrorEvent) and final.cancelled
        if cut:
            assert _same_frames(frames, expected_frames[:len(frames)])
        else:
            assert type(final) is type(expected) and getattr(final, "code", None) == getattr(expected, "code", None)
            assert _same_frames(frames, expected_frames)
        if isinstance(final, engine_module.FinishedEvent):
            assert all(torch.equal(a, b) for a, b in zip(final.codes, expected.codes))
            assert codec is None or audio.shape == expected_audio.shape
        if audio is not None:  # a request cut short (or failed) emitted a prefix; how long depends on the clock
            assert expected_audio is not None and audio.shape[-1] <= expected_audio.shape[-1]
            length = min(audio.shape[-1], expected_audio.shape[-1])
            torch.testing.assert_close(audio[:, :length], expected_audio[:, :length], **AUDIO_TOLERANCE)


OPERATIONS = st.lists(st.one_of(st.tuples(st.just("submit"), st.integers(0, len(POOL) - 1)),
                                st.tuples(st.just("cancel"), st.integers(0, 15)),
                                st.tuples(st.just("tick"), st.integers(1, 4))), min_size=1, max_size=14)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.integers(1, 3), operations=OPERATIONS)
def test_any_interleaving_of_submit_cancel_finish_and_fail_leaves_each_request_equal_to_itself_alone(
        interleaving_model, slots, operations):
    _check_interleaving(interleaving_model, None, slots, operations)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.integers(1, 3), operations=OPERATIONS)
def test_with_the_codec_any_interleaving_leaves_each_request_equal_to_itself_alone_audio_included(
        interleaving_model, codec, slots, operations):
    """The same property with the codec's slot streams (its rings are reset, values too, when a slot changes hands)."""
    _check_interleaving(interleaving_model, codec, slots, operations)


def test_the_interleavings_draw_requests_that_finish_and_requests_that_fail(interleaving_model):
    """The property above covers both outcomes: the pool's alone runs finish, except the two poisoned ones."""
    finals = [_alone(interleaving_model, None, index)[-1] for index in range(len(POOL))]
    codes = [getattr(final, "code", None) for final in finals]
    assert codes == [None] * (len(POOL) - 2) + ["non_finite_logits"] * 2
    assert all(isinstance(final, engine_module.FinishedEvent) for final in finals[:-2])


def test_cancelling_a_request_queued_behind_an_equal_one_leaves_the_others_waiting(model):
    """The waiting queue removes a cancelled request by identity (before: `==` compared two equal requests' prompt
    tensors and the tick raised)."""
    engine = engine_module.SpeechEngine(model, None, num_slots=1, max_positions=64)
    handles = [engine.submit(_request(seed=96, frames=3)) for _ in range(3)]
    handles[2].cancel()
    engine.run_until_idle()
    finals = [_collect(handle)[0] for handle in handles]
    assert finals[2].cancelled and finals[2].code == "cancelled"
    assert all(isinstance(final, engine_module.FinishedEvent) for final in finals[:2])
    assert torch.equal(finals[0].codes[0], finals[1].codes[0])


def test_a_freed_slot_keeps_no_say_in_the_sampling_path_of_the_requests_beside_it(model):
    """Sampling picks its code path from the rows' settings (e.g. the top-k candidates path when every row has a
    top-k, which differs from the whole-row path on exact ties only). A freed slot's settings are cleared and left
    out, so the request beside it samples with the flags it has alone."""
    engine = engine_module.SpeechEngine(model, None, num_slots=2, max_positions=64)
    left = engine.submit(_request(seed=97, frames=2, audio_top_k=0, audio_top_p=1.0))  # slot 0: no top-k filter
    stays = engine.submit(_request(seed=98, frames=8))  # slot 1: top-k 25
    while not left.done.is_set():
        engine.step()
    assert engine.active == 1 and not stays.done.is_set()
    decoder = engine.decoder
    beside = decoder.audio_settings.rows(2, decoder._live(2))
    alone = engine_module.SpeechEngine(model, None, num_slots=1, max_positions=64).decoder
    alone.start(generation.Group([0], _request(seed=98, frames=8).settings.checked(16)), [_rows(10, 980)], "sdpa")
    expected = alone.audio_settings.rows(1, alone._live(1))
    flags = ("max_top_k", "any_sample", "all_sample", "any_top_p", "all_top_p", "all_top_k", "same_top_k",
             "any_penalty")
    assert [getattr(beside, name) for name in flags] == [getattr(expected, name) for name in flags]
    assert beside.all_top_k  # the candidates path, as alone (before: the freed slot's top-k 0 turned it off)
    engine.run_until_idle()


@pytest.mark.parametrize("part, method, code", [("decoder", "begin", "prefill_failed"),
                                                ("decoder", "fill", "prefill_failed"),
                                                ("decoder", "frame", "decode_step_failed"),
                                                ("codec", "decode", "codec_failed")])
def test_each_failure_names_its_cause_in_a_stable_code_and_the_engine_serves_the_next_request(
        model, codec, part, method, code):
    engine = engine_module.SpeechEngine(model, codec, num_slots=1, max_positions=64)
    owner = getattr(engine, part)

    def broken(*args, **kwargs):
        raise RuntimeError(f"simulated failure of {method}")

    setattr(owner, method, broken)
    failed = engine.submit(_request(seed=99, frames=3))
    engine.run_until_idle()
    delattr(owner, method)  # the class's method again
    final, _ = _collect(failed)
    assert isinstance(final, engine_module.ErrorEvent) and not final.cancelled
    assert final.code == code and code in engine_module.ERROR_CODES and "simulated" in final.message
    later = engine.submit(_request(seed=99, frames=3))
    engine.run_until_idle()
    (alone, _), = _run(model, codec, [_request(seed=99, frames=3)], slots=1)
    assert torch.equal(_collect(later)[0].codes[0], alone.codes[0])
