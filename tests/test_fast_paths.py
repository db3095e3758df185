"""The decode-path shortcuts give the same numbers as the plain formulation they replace (tiny models, CPU, seconds).

Shortcuts checked here: RoPE with a signed sin table and one pair swap (bit-identical to rotate-every-two), queries and
keys rotated in one call, the fused tanh GELU for "gelu_new" (within 1 ulp), local decode steps with a cache (equal to
recomputing the local decoder), the appended row's embedding summed while its codes are sampled (bit-identical
to embedding the row), non-finite logits caught through float32 row sums, and checkpoints.force_continue's forced
frames (what bench.py times).
"""

import pytest
import torch
from transformers.activations import NewGELUActivation

from conftest import import_module, text_prompt

checkpoints = import_module("measurement.checkpoints")
decoder = import_module("gpt2_decoder")


def test_signed_sin_rotation_is_bit_identical_to_rotate_every_two():
    rotary = decoder.MossTTSNanoGPT2RotaryEmbedding(64)
    positions = torch.arange(37)[None]
    cos, signed_sin = rotary(positions, torch.float32)
    angles = (positions.float()[..., None] * rotary.inv_freq(torch.device("cpu"))).repeat_interleave(2, dim=-1)
    sin = angles.sin()[:, None]  # the plain table, [1, 1, T, D]
    x = torch.randn(2, 1, 3, 37, 64)  # queries and keys together: [2, B, H, T, D]
    reference = x * cos + decoder.rotate_every_two(x) * sin
    assert torch.equal(decoder.apply_rotary(x, cos, signed_sin), reference)


def test_fused_gelu_matches_gelu_new_within_one_ulp():
    mlp = decoder.MossTTSNanoGPT2MLP(checkpoints.tiny_config().gpt2_config)
    x = torch.randn(4096) * 4
    torch.testing.assert_close(mlp.act(x), NewGELUActivation()(x), atol=5e-7, rtol=2.5e-7)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_local_decode_steps_equal_recomputing_the_local_decoder(attention):
    model = checkpoints.random_tiny_model(seed=21)
    local = model.local_transformer
    inputs = torch.randn(3, 17, 64)
    cache = decoder.KVCache.for_decoder(local, 3, 17)
    fn = decoder.attention_function(attention)
    steps = [local.decode_step(inputs[:, slot:slot + 1], None, cache, 17, fn)
             for slot in range(17)]
    full, _ = local(inputs, attention=attention)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("nq", [16, 5])
def test_appended_row_embedding_is_bit_identical_to_embedding_the_row(nq):
    generation = import_module("generation")
    model = checkpoints.random_tiny_model(seed=26)
    slots = generation.SlotDecoder(model, 2, 32, ("sdpa", "sdpa"))
    settings = generation.GenerationSettings(nq=nq, max_new_frames=5).checked(16)
    slots.start(generation.Group([0], settings), [text_prompt(8, seed=1)[0]], "sdpa")
    for _ in range(3):
        (output, *_) = slots.frame()
        if output.codes is None:
            break
        row = torch.cat((torch.tensor([[[9]]]), output.codes[:, None]), dim=-1)  # [9, this frame's codes]
        assert torch.equal(slots.next_input[0], model._embed_rows(row)[0])


def test_non_finite_logits_of_the_last_channel_in_the_last_frame_raise():
    model = checkpoints.random_tiny_model(seed=23)
    with torch.no_grad():
        model.audio_embeddings[15].weight.fill_(float("inf"))  # the tied head of the last channel
    with pytest.raises(RuntimeError, match="Non-finite"):
        model.generate(text_prompt(6, seed=2), max_new_frames=1)


def test_forced_continue_runs_every_requested_frame():
    model = checkpoints.random_tiny_model(seed=24)
    checkpoints.force_continue(model)
    codes = model.generate(text_prompt(6, seed=3), max_new_frames=40).audio_token_ids
    assert codes.shape[1] == 40
    for weight_format in ("bf16", "int8"):
        converted = import_module("weight_formats").apply_weight_format(
            checkpoints.random_tiny_model(seed=24), weight_format)
        checkpoints.force_continue(converted)
        assert converted.generate(text_prompt(6, seed=3), max_new_frames=12).audio_token_ids.shape[1] == 12
