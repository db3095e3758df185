"""`enable_fast_decode` (decode_graphs.py): the fixed-shape decode steps give the default path's codes (CPU, tiny).

What runs here: the static steps in eager ("static"), torch.compile of them ("compile", tiny model, ~10-20 s of
compiling on a 2-core machine the first time; inductor caches it on disk afterwards), the CPU fallback of "graph"
(one log line, default path) and the fallback of a failing compile. Graph capture itself needs CUDA/NPU hardware
and is not exercised anywhere in this suite.
"""

import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import import_module

checkpoints = import_module("checkpoints")
decode_graphs = import_module("decode_graphs")
decoder = import_module("gpt2_decoder")
devices = import_module("devices")

GREEDY_CASES = {
    "greedy_voice_clone": dict(max_new_frames=24),
    "batch_left_pad": dict(max_new_frames=16),
    "nq8": dict(max_new_frames=12, nq=8),
}
# Text logits of the tiny models are ~8; the static global step reorders two reductions (a few ulp).
LOGIT_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def golden():
    from conftest import shared_path

    folder = shared_path("golden", "tts_tiny")
    return checkpoints.load_safetensors_model(folder), load_file(folder / "expected.safetensors")


def _forced_tiny_model(seed=0, **overrides):
    """A random tiny model whose stop decision always continues (bench.py's edit), so frames are not cut short."""
    model = checkpoints.random_tiny_model(seed=seed, **overrides)
    import_module("bench").force_continue(model)
    return model


def _prompt(batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length, 17), 1024)
    ids[:, :, 0] = torch.randint(10, 16000, (batch, length), generator=generator)
    ids[:, -1, 0] = 6  # audio_start
    return ids


def _final(model, mode, input_ids, attention_mask=None, **kwargs):
    model.enable_fast_decode(mode)
    try:
        events = list(model.generate_stream(input_ids, attention_mask, **kwargs))
    finally:
        model.enable_fast_decode("none")
    return events[-1]["generation"].audio_token_ids, events[-1]["text_candidate_logits"]


def _assert_same_as_default(model, mode, input_ids, attention_mask=None, **kwargs):
    codes, logits = _final(model, "none", input_ids, attention_mask, **kwargs)
    fast_codes, fast_logits = _final(model, mode, input_ids, attention_mask, **kwargs)
    assert codes.shape[1] > 1, "the comparison needs several frames"
    assert torch.equal(fast_codes, codes)
    torch.testing.assert_close(fast_logits, logits, **LOGIT_TOLERANCE)


def test_fast_decode_is_off_by_default():
    model = checkpoints.random_tiny_model(seed=3)
    assert model._fast_decode is None
    model.enable_fast_decode("none")
    assert model._fast_decode is None


def test_unknown_fast_decode_mode_raises_value_error():
    model = checkpoints.random_tiny_model(seed=3)
    with pytest.raises(ValueError, match="warp"):
        model.enable_fast_decode("warp")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_static_local_step_matches_the_default_local_step_to_1e_6(attention):
    model = checkpoints.random_tiny_model(seed=5)
    local = model.local_transformer
    runner = decode_graphs.LocalStepRunner(model, 2, attention, "static")
    cache = decoder.KVCache.for_decoder(local, 2, 17)
    cos, sin = local.rotary_emb(torch.arange(17), torch.float32)
    inputs = torch.randn(2, 17, 64)
    for frame in range(2):  # the second frame runs over the first frame's stale cache entries
        cache.reset()
        for slot in range(17):
            rope = (cos[:, :, slot:slot + 1], sin[:, :, slot:slot + 1])
            expected = local.step(inputs[:, slot:slot + 1] + frame, cache, rope, None,
                                  decoder.attention_function(attention))[:, -1]
            # Not bit-identical in general: softmax and weights·V reduce over 17 keys (zeros past the slot).
            torch.testing.assert_close(runner(inputs[:, slot] + frame, slot), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("case", sorted(GREEDY_CASES))
def test_static_steps_give_the_default_greedy_codes_on_the_golden_model(golden, case, attention):
    model, expected = golden
    _assert_same_as_default(model, "static", expected[f"{case}.input_ids"], expected[f"{case}.attention_mask"],
                            attn_implementation=attention, **GREEDY_CASES[case])


def test_static_steps_give_the_default_seeded_samples_on_the_golden_model(golden):
    model, expected = golden
    kwargs = dict(do_sample=True, audio_temperature=0.8, audio_top_p=0.95, audio_top_k=25,
                  audio_repetition_penalty=1.2, max_new_frames=16)
    results = []
    for mode in ("none", "static"):
        torch.manual_seed(1234)
        results.append(_final(model, mode, expected["sampled_seeded.input_ids"],
                              expected["sampled_seeded.attention_mask"], **kwargs)[0])
    assert torch.equal(results[1], results[0])


@pytest.mark.parametrize("overrides", [{}, {"position_embedding_type": "absolute"}], ids=["rope", "absolute"])
def test_static_steps_give_the_default_greedy_codes_on_a_random_tiny_model(overrides):
    model = _forced_tiny_model(seed=7, **overrides)
    prompt = _prompt(2, 12, seed=1)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False  # left padding in the second row
    _assert_same_as_default(model, "static", prompt, mask, max_new_frames=10)


def test_runners_are_reused_across_calls_without_stale_state():
    model = _forced_tiny_model(seed=8)
    model.enable_fast_decode("static")
    fast = model._fast_decode
    outputs = [model.generate(_prompt(1, length, seed=length), max_new_frames=8).audio_token_ids for length in (20, 9)]
    assert len(fast._runners) == 2  # one local + one global runner served both calls (same capacity bucket)
    model.enable_fast_decode("none")
    for length, fast_codes in zip((20, 9), outputs):
        assert torch.equal(fast_codes, model.generate(_prompt(1, length, seed=length), max_new_frames=8).audio_token_ids)


def test_graph_mode_on_cpu_logs_one_line_and_keeps_the_default_path(caplog):
    model = _forced_tiny_model(seed=9)
    with caplog.at_level(logging.WARNING):
        model.enable_fast_decode("graph")
    assert model._fast_decode is None
    assert len([r for r in caplog.records if "graph capture is not supported" in r.getMessage()]) == 1
    _assert_same_as_default(model, "graph", _prompt(1, 10), max_new_frames=6)


def test_cpu_has_no_graph_capture():
    calls = []
    assert devices.graph_supported("cpu") is False
    assert devices.capture_graph("cpu", lambda: calls.append(1)) is None
    assert calls == []


@torch.no_grad()
def test_failing_compile_falls_back_to_the_eager_step_with_one_log_line(caplog):
    model = checkpoints.random_tiny_model(seed=10)
    runner = decode_graphs.LocalStepRunner(model, 1, "sdpa", "static")
    reference = decode_graphs.LocalStepRunner(model, 1, "sdpa", "static")

    def broken_compile():
        raise RuntimeError("backend exploded\nsecond line of a long report")

    runner._run = runner._first_compiled_call(broken_compile)
    inputs = torch.randn(3, 1, 64)
    with caplog.at_level(logging.WARNING):
        outputs = [runner(inputs[slot], slot).clone() for slot in range(3)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "backend exploded" in warnings[0] and "\n" not in warnings[0]
    assert runner._run == runner._step
    for slot in range(3):
        assert torch.equal(outputs[slot], reference(inputs[slot], slot))


def test_compiled_steps_give_the_default_greedy_codes(caplog):
    """torch.compile of both static steps (tiny model, 1 layer to keep compiling short); no fallback allowed."""
    model = _forced_tiny_model(seed=11, n_layer=1)
    with caplog.at_level(logging.WARNING):
        _assert_same_as_default(model, "compile", _prompt(1, 10), max_new_frames=6)
    assert not [r for r in caplog.records if "torch.compile" in r.getMessage()], "compile fell back to eager"


@torch.no_grad()
@pytest.mark.parametrize("failure", ["unsupported", "capture error"])
def test_graph_runner_falls_back_to_the_eager_step_with_one_log_line(monkeypatch, caplog, failure):
    """The runner-level safety net (enable_fast_decode already refuses "graph" on CPU): capture_graph returning None
    or raising leaves a working eager step. Devices' capture_graph is replaced because CPU has no graphs."""

    def capture(device, fn):
        if failure == "capture error":
            raise RuntimeError("operation not permitted when stream is capturing\ndetails")
        return None

    monkeypatch.setattr(devices, "capture_graph", capture)
    model = checkpoints.random_tiny_model(seed=12)
    with caplog.at_level(logging.WARNING):
        runner = decode_graphs.LocalStepRunner(model, 1, "sdpa", "graph")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = "operation not permitted" if failure == "capture error" else "graph capture unavailable"
    assert len(warnings) == 1 and expected in warnings[0] and "\n" not in warnings[0]
    assert runner._run == runner._step
    reference = decode_graphs.LocalStepRunner(model, 1, "sdpa", "static")
    inputs = torch.randn(1, 64)
    assert torch.equal(runner(inputs, 0), reference(inputs, 0))


def test_cpu_compiles_with_inductor():
    assert devices.compile_backend("cpu") == "inductor"
