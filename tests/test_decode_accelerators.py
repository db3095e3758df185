"""The frame's two phases compiled or captured (generation.PhaseRunner) give the eager codes (CPU, tiny models).

A frame is two fixed-shape phases: the decision phase (global step, local step 0, text head and decision) and the
audio phase (local steps 1..nq with their heads and sampling, the next rows). What runs here: torch.compile of both
(a tiny 1-layer model with nq = 2, to keep compiling short on a 2-core machine), the graph path with a stand-in
capture that replays the recorded phase (so the buffer discipline of a replay is checked; real CUDA / NPU graph
capture needs hardware and is not exercised anywhere in this suite), and the fallbacks: graph capture unavailable,
capture raising, compile raising.
"""

import logging

import pytest
import torch

from conftest import import_module, text_prompt

checkpoints = import_module("measurement.checkpoints")
devices = import_module("devices")
generation = import_module("generation")


def _forced_tiny_model(seed=0, **overrides):
    """A random tiny model whose stop decision always continues, so frames are not cut short."""
    return checkpoints.always_continue_tiny_model(seed=seed, **overrides)


def _codes(model, mode, ids, **kwargs):
    model.enable_fast_decode(mode)
    torch.manual_seed(7)
    try:
        final = list(model.generate_stream(ids, **kwargs))[-1]
    finally:
        model.enable_fast_decode("none")
    return final["generation"].audio_token_ids, final["text_candidate_logits"]


def _assert_same_as_eager(model, mode, ids, **kwargs):
    codes, logits = _codes(model, "eager", ids, **kwargs)
    fast_codes, fast_logits = _codes(model, mode, ids, **kwargs)
    assert codes.shape[1] > 1, "the comparison needs several frames"
    assert torch.equal(fast_codes, codes)
    # Compiled / bucketed steps read a longer (masked) key range: a few ulp on logits of about 8.
    torch.testing.assert_close(fast_logits, logits, atol=1e-5, rtol=1e-5)


def test_unknown_fast_decode_mode_raises_value_error():
    model = checkpoints.random_tiny_model(seed=1)
    with pytest.raises(ValueError, match="fast decode mode 'static'"):
        model.enable_fast_decode("static")
    with pytest.raises(ValueError, match="step mode"):
        generation.PhaseRunner("audio phase", "turbo", torch.device("cpu"))


def test_graph_mode_on_cpu_logs_one_line_and_runs_the_eager_step(caplog):
    model = _forced_tiny_model(seed=9)
    with caplog.at_level(logging.WARNING):
        _assert_same_as_eager(model, "graph", text_prompt(10), max_new_frames=6)
    assert len([r for r in caplog.records if "graph capture is not available" in r.getMessage()]) == 1


def test_cpu_has_no_graph_capture_and_compiles_with_inductor():
    calls = []
    assert devices.graph_supported("cpu") is False
    assert devices.capture_graph("cpu", lambda: calls.append(1)) is None
    assert calls == [] and devices.compile_backend("cpu") == "inductor"


def _replaying_capture(recorded):
    """A stand-in for devices.capture_graph: runs the step once (the capture), then replays it on each call."""

    def capture(device, fn):
        fn()
        recorded.append(fn)
        return fn

    return capture


def test_captured_steps_replayed_on_their_buffers_give_the_eager_codes(monkeypatch):
    recorded = []
    monkeypatch.setattr(generation, "graph_supported", lambda device: True)
    monkeypatch.setattr(generation, "capture_graph", _replaying_capture(recorded))
    model = _forced_tiny_model(seed=4)
    ids = torch.cat([text_prompt(12, seed=1), text_prompt(12, seed=2)])
    _assert_same_as_eager(model, "graph", ids, max_new_frames=6, do_sample=True, audio_repetition_penalty=1.2)
    assert len(recorded) == 2  # the decision phase (one read-length bucket) and the audio phase, replayed per frame


@pytest.mark.parametrize("failure", ["unsupported", "capture error"])
def test_failed_capture_falls_back_to_the_eager_step_with_one_log_line(monkeypatch, caplog, failure):
    def capture(device, fn):
        if failure == "capture error":
            raise RuntimeError("operation not permitted when stream is capturing\ndetails")
        return None

    monkeypatch.setattr(generation, "graph_supported", lambda device: True)
    monkeypatch.setattr(generation, "capture_graph", capture)
    model = _forced_tiny_model(seed=12)
    with caplog.at_level(logging.WARNING):
        _assert_same_as_eager(model, "graph", text_prompt(8), max_new_frames=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = "operation not permitted" if failure == "capture error" else "no graph capture"
    assert len(warnings) == 2 and all(expected in w and "\n" not in w for w in warnings)  # both phases


def test_failing_compile_falls_back_to_the_eager_step_with_one_log_line(monkeypatch, caplog):
    def broken_compile(fn, **options):
        def run():
            raise RuntimeError("backend exploded\nsecond line of a long report")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = _forced_tiny_model(seed=10)
    with caplog.at_level(logging.WARNING):
        _assert_same_as_eager(model, "compile", text_prompt(8), max_new_frames=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("backend exploded" in w and "\n" not in w for w in warnings)


def test_compiled_phases_give_the_eager_codes(caplog):
    """torch.compile of both phases, each one call per frame (tiny model, 1 layer, nq 1 to keep compiling short);
    greedy and sampled rows together; no fallback allowed."""
    model = _forced_tiny_model(seed=11, n_layer=1)
    with caplog.at_level(logging.WARNING):
        _assert_same_as_eager(model, "compile", torch.cat([text_prompt(10), text_prompt(10, seed=1)]),
                              max_new_frames=4, nq=1, do_sample=True, audio_repetition_penalty=1.2)
    assert not [r for r in caplog.records if "compile of the" in r.getMessage()]
