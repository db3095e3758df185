"""Deadline scheduling (engine_schedule.py): codec calls by playback slack, admission by measured capacity."""

import time

import pytest
import torch

from conftest import import_module

engine_module = import_module("engine")
schedule = import_module("engine_schedule")
generation = import_module("generation")
checkpoints = import_module("measurement.checkpoints")

FRAME = 0.08


def _costs(lm=0.03, codec_per_row_frame=0.008, codec_call=0.02, prefill_per_row=0.001):
    """Costs as measured from calls of several sizes (so the fits know intercept and slope)."""
    costs = schedule.EngineCosts()
    for rows in (1, 2, 4, 8):
        costs.lm.add(rows, lm + 0.005 * rows)
        costs.codec.add(rows * 4, codec_call + codec_per_row_frame * rows * 4)
        costs.prefill.add(20 * rows, prefill_per_row * 20 * rows)
    return costs


def test_the_linear_cost_fit_recovers_intercept_and_slope_and_splits_a_single_size_by_its_share():
    fit = schedule.LinearCost(fixed_share=0.5)
    assert fit.predict(3) == 0.0  # nothing measured: no cost known
    fit.add(2, 0.04)
    assert fit.predict(2) == pytest.approx(0.04) and fit.predict(4) == pytest.approx(0.06)
    fit = schedule.LinearCost(fixed_share=0.5)
    for size in (1, 2, 4, 8, 1, 8):
        fit.add(size, 0.01 + 0.002 * size)
    assert fit.predict(16) == pytest.approx(0.01 + 0.032, rel=1e-3)


def test_a_new_stream_gets_its_first_frame_decoded_at_once_where_a_few_more_frames_and_their_call_fit_in_a_frame():
    policy, fast = schedule.DEADLINE_POLICY, _costs(lm=0.002, codec_per_row_frame=0.0005, codec_call=0.002)
    assert policy.first_frames(fast, 1, FRAME) == 1
    assert policy.frames_wanted(1, None, fast, 1, FRAME) == 1
    assert policy.first_frames(schedule.EngineCosts(), 4, FRAME) == 1  # nothing measured yet: at once


def test_on_a_slow_machine_the_first_audio_carries_the_frames_that_let_the_stream_wait_for_fuller_calls():
    policy, slow = schedule.DEADLINE_POLICY, _costs(lm=0.02)
    first = policy.first_frames(slow, 4, FRAME)
    assert 1 < first < policy.max_frames
    catch_up = schedule.CATCH_UP_FRAMES  # the LM steps of a few more frames and their codec call, on a slower host
    cycle = schedule.HOST_SLOWDOWN * (catch_up * slow.lm.predict(4) + slow.codec_now(4 * catch_up))
    assert (first - 1) * FRAME < cycle + policy.margin_seconds <= first * FRAME
    assert policy.frames_wanted(first - 1, None, slow, 4, FRAME) == 0
    assert policy.frames_wanted(first, None, slow, 4, FRAME) == first


def test_full_calls_go_out_however_much_slack():
    policy, costs = schedule.DEADLINE_POLICY, _costs()
    assert policy.frames_wanted(8, 5.0, costs, 4, FRAME) == 8
    assert policy.frames_wanted(11, 5.0, costs, 4, FRAME) == 8


def test_a_stream_with_slack_waits_for_a_fuller_call_and_one_near_underrun_is_decoded_now():
    policy, costs = schedule.DEADLINE_POLICY, _costs()
    rows = 4
    waiting_costs = costs.lm.predict(rows) + costs.codec.predict(rows * 3)  # its audio if it waited one more tick
    needed = schedule.HOST_SLOWDOWN * waiting_costs + policy.margin_seconds  # on a host that turned slower
    assert policy.frames_wanted(2, needed + 0.01, costs, rows, FRAME) == 0
    assert policy.frames_wanted(2, needed - 0.01, costs, rows, FRAME) == 2
    catch_up = schedule.CATCH_UP_FRAMES  # already behind: calls of a few frames, not one frame a tick
    assert policy.frames_wanted(catch_up - 1, -0.2, costs, rows, FRAME) == 0
    assert policy.frames_wanted(catch_up, -0.2, costs, rows, FRAME) == catch_up


def test_upstream_policy_keeps_its_lead_table_through_the_same_question():
    policy, costs = schedule.UPSTREAM_STREAM_POLICY, _costs()
    assert policy.frames_wanted(3, None, costs, 1, FRAME) == 1
    assert policy.frames_wanted(3, 0.1, costs, 1, FRAME) == 1  # behind upstream's 0.2 s: one frame per call
    assert policy.frames_wanted(3, 2.0, costs, 1, FRAME) == 0  # ahead, budget 8 not reached yet


def test_admission_names_why_a_request_waits():
    costs = _costs()
    refuse = schedule.admission_refusal
    assert refuse(costs, [], 16, 20, True, FRAME) is None  # nothing runs: nobody to protect
    assert refuse(costs, [None], 2, 20, True, FRAME) is None  # the only stream does not play yet
    assert refuse(_costs(lm=0.2), [None], 2, 20, False, FRAME) == schedule.KEEPING_STREAMS_AHEAD
    assert refuse(costs, [2.0], 2, 20, True, FRAME) == schedule.PREFILL_BUDGET
    assert refuse(costs, [2.0], 2, 20, False, FRAME) is None
    assert refuse(costs, [0.05], 2, 20, False, FRAME) == schedule.PROTECTING_SLACK
    slow = _costs(lm=0.2)
    assert refuse(slow, [2.0], 2, 20, False, FRAME) == schedule.KEEPING_STREAMS_AHEAD


def test_after_a_join_the_next_waits_until_codec_calls_with_the_new_rows_are_measured():
    costs, refuse = _costs(lm=0.01, codec_call=0.01, codec_per_row_frame=0.002), schedule.admission_refusal
    assert refuse(costs, [2.0, 2.0], 3, 20, False, FRAME) is None
    costs.joined()
    assert refuse(costs, [None], 2, 20, False, FRAME) is None  # nothing plays yet: nobody to protect
    for _ in range(schedule.SETTLE_CODEC_CALLS):
        assert refuse(costs, [2.0, 2.0], 3, 20, False, FRAME) == schedule.KEEPING_STREAMS_AHEAD
        costs.add_codec_call(8, costs.codec.predict(8))
    assert refuse(costs, [2.0, 2.0], 3, 20, False, FRAME) is None


def test_admission_counts_the_small_codec_calls_a_newcomer_needs_until_it_has_slack():
    """Full 8-frame calls would fit two streams in a frame, 4-frame calls would not: the newcomer waits, since it
    asks for a call every few ticks until it has slack and the playing stream's frames ride along in those calls."""
    costs = _costs(lm=0.03, codec_call=0.12, codec_per_row_frame=0.002)
    assert costs.steady_tick(2) < schedule.REALTIME_SHARE * FRAME < costs.steady_tick(2, schedule.CATCH_UP_FRAMES)
    assert schedule.admission_refusal(costs, [2.0], 2, 20, False, FRAME) == schedule.KEEPING_STREAMS_AHEAD
    cheap_calls = _costs(lm=0.03, codec_call=0.02, codec_per_row_frame=0.002)
    assert schedule.admission_refusal(cheap_calls, [2.0], 2, 20, False, FRAME) is None


def test_the_measured_excess_follows_the_rows_that_run_when_streams_leave():
    """Each tick is measured against the prediction for the rows it ran, so ticks of five streams say nothing about
    one stream: the stream that waits behind them joins once four have left. A plain mean of the ticks still held
    the five-stream ticks ~40 ticks later."""
    costs = _costs(lm=0.01, codec_call=0.005, codec_per_row_frame=0.002)
    for _ in range(40):
        costs.add_tick(costs.steady_tick(5) + 0.004, 5)
    assert costs.excess == pytest.approx(0.004)
    assert costs.tick_after_join(5) == pytest.approx(max(costs.steady_tick(5, schedule.CATCH_UP_FRAMES),
                                                         costs.steady_tick(5) + 0.004))
    assert costs.tick_after_join(2) == pytest.approx(max(costs.steady_tick(2, schedule.CATCH_UP_FRAMES),
                                                         costs.steady_tick(2) + 0.004))
    assert costs.tick_after_join(2) < costs.steady_tick(5)  # a plain mean tick said steady_tick(5) + 0.004 here
    unmeasured = schedule.EngineCosts()
    unmeasured.add_tick(1.0, 1)  # a tick before any LM step or codec call was measured counts for nothing
    assert unmeasured.excess is None and unmeasured.tick_after_join(1) == 0.0


def test_decode_timing_uses_what_a_codec_call_costs_now_and_admission_what_it_will_cost_at_full_windows():
    costs, policy = _costs(), schedule.DEADLINE_POLICY
    full_wait, full_tick = policy.wait_cost(costs, 4, 2), costs.steady_tick(4)
    costs.codec_share = 0.5  # young streams: a call attends half of what it will
    assert policy.wait_cost(costs, 4, 2) == pytest.approx(costs.lm.predict(4) + costs.codec.predict(4 * 3 * 0.5))
    assert policy.wait_cost(costs, 4, 2) < full_wait and costs.steady_tick(4) == full_tick


def test_a_young_stream_costs_less_per_codec_frame_and_the_share_reaches_one_at_full_windows(codec):
    """Young streams attend a short history; the codec's window share says how much cheaper their frames are, so
    that the engine fits what a frame costs once the windows are full."""
    slots = import_module("codec_streaming").codec_slots(codec, 2, 16)
    shares = []
    for _ in range(12):  # one frame per call: the tiny codec's rings fill after 8
        slots.decode({0: (torch.randint(0, 8, (1, 16)), 16)})
        shares.append(slots.window_share(1))
    assert 0 < shares[0] < shares[4] < 1
    assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0)
    slots.reset(0)
    assert slots.window_share(1) < shares[0]


def test_the_engine_fits_codec_calls_at_full_windows_and_leaves_prefill_out_of_its_ticks(codec, monkeypatch):
    model = checkpoints.always_continue_tiny_model(seed=4).eval()
    engine = engine_module.SpeechEngine(model, codec, num_slots=2, max_positions=64)
    spans, shares, sizes = [], [], []  # per codec call: rows x frames, the window share after it, the fitted size
    decode, add = engine.codec.decode, engine.costs.codec.add

    def recorded_decode(work):
        audio = decode(work)
        spans.append((max(work) + 1) * max(codes.shape[0] for codes, _ in work.values()))
        shares.append(engine.codec.window_share(max(work) + 1))
        return audio

    monkeypatch.setattr(engine.codec, "decode", recorded_decode)
    monkeypatch.setattr(engine.costs.codec, "add", lambda size, seconds: (sizes.append(size), add(size, seconds)))
    fill = engine.decoder.fill

    def slow_fill(*args, **kwargs):
        time.sleep(0.3)  # a prompt's prefill far longer than any tick of this tiny model
        return fill(*args, **kwargs)

    monkeypatch.setattr(engine.decoder, "fill", slow_fill)
    handle = engine.submit(_request(3, frames=20))
    engine.run_until_idle()
    assert isinstance(handle.pending()[-1], engine_module.FinishedEvent)
    assert sizes == pytest.approx([span * part for span, part in zip(spans, shares)]) and len(sizes) == len(spans)
    assert shares[0] < shares[-1] and shares[0] < 1  # the first call is counted at its share of a full window
    assert engine.costs.excess is not None and engine.costs.excess < 0.1


def _request(seed, frames, realtime=True):
    rows = torch.full((6, 17), 1024)
    rows[:, 0] = torch.arange(100, 106) + seed
    rows[-1, 0] = 6
    settings = generation.GenerationSettings(max_new_frames=frames, do_sample=True)
    return engine_module.EngineRequest([engine_module.ChunkPrompt(rows)], settings, seed=seed, realtime=realtime)


@pytest.fixture(scope="module")
def codec():
    from conftest import shared_path

    folder = shared_path("golden", "codec_tiny")
    return import_module("modeling_moss_audio_tokenizer").MossAudioTokenizerModel.from_pretrained(str(folder)).eval()


def test_a_request_waits_while_the_machine_cannot_keep_the_playing_streams_ahead_and_joins_once_it_can(codec):
    """A machine measured too slow for one more stream holds the newcomer in the queue with its reason; once the
    costs say it fits, it joins and both finish."""
    model = checkpoints.always_continue_tiny_model(seed=5).eval()
    engine = engine_module.SpeechEngine(model, codec, num_slots=2, max_positions=64)
    heard = []
    engine.submit(_request(1, frames=30), listener=heard.append)
    while not any(isinstance(event, engine_module.AudioEvent) for event in heard):  # the first stream plays
        engine.step()
        assert engine.ticks < 10
    slow = schedule.LinearCost(fixed_share=0.7, weight=0.0)  # weight 0: later measurements do not move it
    slow.add(1, 1.0)  # one LM step of 1 s: no stream could stay ahead of playback with a second one
    engine.costs.lm = slow
    second = engine.submit(_request(2, frames=4))
    for _ in range(3):
        engine.step()
    assert not second.admitted.is_set() and engine.waiting == 1
    assert engine.wait_reason == schedule.KEEPING_STREAMS_AHEAD
    assert engine.waiting_by_reason() == {"no_free_slot": 0, "prefill_budget": 0, "keeping_streams_ahead": 1,
                                          "protecting_slack": 0}
    engine.costs.lm = schedule.LinearCost(fixed_share=0.7)
    engine.run_until_idle()
    assert second.admitted.is_set() and engine.waiting_by_reason()["keeping_streams_ahead"] == 0
    assert isinstance(heard[-1], engine_module.FinishedEvent) and heard[-1].codes[0].shape[0] == 30
    assert isinstance(second.pending()[-1], engine_module.FinishedEvent)


def test_whole_file_requests_take_free_slots_while_no_real_time_stream_plays_and_wait_while_one_does(codec):
    """Work read when complete (the server's stream=false) keeps batch throughput: on a machine measured too slow for
    real time it still joins a free slot beside other whole-file work, but not beside a real-time stream."""
    model = checkpoints.always_continue_tiny_model(seed=6).eval()
    engine = engine_module.SpeechEngine(model, codec, num_slots=3, max_positions=64)
    slow = schedule.LinearCost(fixed_share=0.7, weight=0.0)
    slow.add(1, 1.0)
    engine.costs.lm = slow
    batch = [engine.submit(_request(20 + index, frames=20, realtime=False)) for index in range(2)]
    for _ in range(4):
        engine.step()
    assert all(handle.admitted.is_set() for handle in batch) and engine.waiting == 0
    heard = []
    live = engine.submit(_request(30, frames=4), listener=heard.append)  # real-time, joins: only whole-file work runs
    engine.step()
    assert live.admitted.is_set()
    engine.run_until_idle()
    assert any(isinstance(event, engine_module.AudioEvent) for event in heard)
    assert isinstance(heard[-1], engine_module.FinishedEvent)
    assert all(isinstance(handle.pending()[-1], engine_module.FinishedEvent) for handle in batch)
    blocked_engine = engine_module.SpeechEngine(model, codec, num_slots=2, max_positions=64)
    playing = blocked_engine.submit(_request(40, frames=30))
    while not any(isinstance(event, engine_module.AudioEvent) for event in playing.pending()):
        blocked_engine.step()
        assert blocked_engine.ticks < 10
    blocked_engine.costs.lm = slow
    later = blocked_engine.submit(_request(41, frames=4, realtime=False))
    for _ in range(3):
        blocked_engine.step()
    assert not later.admitted.is_set() and blocked_engine.wait_reason == schedule.KEEPING_STREAMS_AHEAD
    blocked_engine.close()


def test_upstream_policies_admit_whenever_a_slot_is_free(codec):
    """--stream-policy upstream / throughput / every-frame keep upstream's engine: no admission by capacity, so a
    machine measured too slow for real time still runs a second live stream beside a playing one."""
    model = checkpoints.always_continue_tiny_model(seed=7).eval()
    engine = engine_module.SpeechEngine(model, codec, num_slots=2, max_positions=64,
                                        policy=schedule.EVERY_FRAME_STREAM_POLICY)
    playing = engine.submit(_request(50, frames=30))
    while not any(isinstance(event, engine_module.AudioEvent) for event in playing.pending()):
        engine.step()
        assert engine.ticks < 10
    slow = schedule.LinearCost(fixed_share=0.7, weight=0.0)
    slow.add(1, 1.0)
    engine.costs.lm = slow
    second = engine.submit(_request(51, frames=4))
    engine.step()
    assert second.admitted.is_set() and engine.wait_reason is None
    engine.close()


def test_captured_engine_steps_run_power_of_two_rows_and_give_the_eager_codes(monkeypatch):
    """Graph mode (a stand-in capture that replays the recorded phase): three streams joining at different ticks make
    the eager codes, and the frame step is built for 1, 2 and 4 rows only (never 3)."""
    model = checkpoints.always_continue_tiny_model(seed=8).eval()

    def run(mode):
        engine = engine_module.SpeechEngine(model, None, num_slots=4, max_positions=64, step_mode=mode)
        handles = []
        for tick in range(30):
            if tick in (0, 2, 4):
                handles.append(engine.submit(_request(10 + tick, frames=6)))
            if not engine.step() and tick > 4:
                break
        return engine, [handle.pending()[-1].codes[0] for handle in handles]

    _, eager = run("eager")
    monkeypatch.setattr(generation, "graph_supported", lambda device: True)
    monkeypatch.setattr(generation, "capture_graph", lambda device, fn: (fn(), fn)[1])
    engine, captured = run("graph")
    assert all(torch.equal(a, b) for a, b in zip(captured, eager))
    assert {key[0] for key in engine.decoder.decision_phase._built} == {1, 2, 4}
