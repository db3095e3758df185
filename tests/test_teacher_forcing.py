"""Teacher forcing (measurement/teacher_forcing.py) gives the logits generation computes, and its metrics say what they measure."""

import pytest
import torch

from conftest import audio_head_outputs, import_module, text_prompt

checkpoints = import_module("measurement.checkpoints")
teacher_forcing = import_module("measurement.teacher_forcing")


def test_teacher_forced_logits_equal_the_first_generated_frame():
    model = checkpoints.always_continue_tiny_model(seed=4)
    ids, generated = text_prompt(10, seed=2), []
    recorded = audio_head_outputs(model, lambda: generated.append(model.generate(ids, max_new_frames=1)))
    frames = generated[0].audio_token_ids
    logits = teacher_forcing.teacher_forced(model, ids, frames).audio  # [1, 1, 16, 1024]
    torch.testing.assert_close(logits[0, 0], torch.cat(recorded).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_teacher_forcing_reproduces_greedy_codes_and_stop_decisions(attention):
    model = checkpoints.always_continue_tiny_model(seed=5)
    ids = text_prompt(10, seed=3)
    codes = model.generate(ids, max_new_frames=6, attn_implementation=attention).audio_token_ids  # [1, 6, 16]
    forced = teacher_forcing.teacher_forced(model, ids, codes, attention)
    assert forced.hidden.shape == (1, 10 + 6, 64) and forced.text.shape == (1, 7, 2)
    assert forced.audio.shape == (1, 6, 16, 1024)
    assert teacher_forcing.reproduces_greedy(forced, codes[0], requested=6)
    assert not teacher_forcing.reproduces_greedy(forced, (codes[0] + 1) % 1024, requested=6)


def test_identical_runs_compare_as_exact_and_a_changed_head_is_named():
    model = checkpoints.random_tiny_model(seed=6)
    ids = text_prompt(10, seed=4)
    frames = torch.randint(0, 1024, (1, 3, 16), generator=torch.Generator().manual_seed(4))
    reference = teacher_forcing.teacher_forced(model, ids, frames)
    same = teacher_forcing.compare(reference, teacher_forcing.teacher_forced(model, ids, frames))
    assert same["hidden"]["rel_error"] == 0.0 and same["stop"]["agree"] == 1.0
    assert same["audio"]["cosine_min"] == pytest.approx(1.0) and same["audio"]["top1"] == 1.0
    with torch.no_grad():
        model.audio_embeddings[11].weight.mul_(-1.0)  # audio head 11 (tied) now points the other way
    changed = teacher_forcing.compare(reference, teacher_forcing.teacher_forced(model, ids, frames))
    assert changed["audio"]["worst_head"] == 11 and changed["audio"]["cosine_min"] < 0
