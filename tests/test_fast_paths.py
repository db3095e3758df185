"""The decode-path shortcuts give the same numbers as the plain formulation they replace (tiny models, CPU, seconds).

Shortcuts checked here: RoPE with a signed sin table and one pair swap (bit-identical to rotate-every-two), queries and
keys rotated in one call, the fused tanh GELU for "gelu_new" (within 1 ulp), local decode steps without a mask
(bit-identical to an all-True mask), the appended row's embedding summed while its codes are sampled (bit-identical
to embedding the row), non-finite logits caught through float32 row sums, and bench.py's forced frames.
"""

import pytest
import torch
from transformers.activations import NewGELUActivation

from conftest import import_module

checkpoints = import_module("checkpoints")
decoder = import_module("gpt2_decoder")


def _prompt(length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((1, length, 17), 1024)
    ids[0, :, 0] = torch.randint(10, 16000, (length,), generator=generator)
    ids[0, -1, 0] = 6
    return ids


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
def test_local_step_without_mask_equals_all_true_mask(attention):
    model = checkpoints.random_tiny_model(seed=21)
    local = model.local_transformer
    inputs = torch.randn(2, 5, 64)
    outputs = []
    for mask in (None, torch.ones(1, 1, 1, 5, dtype=torch.bool)):
        cache = decoder.KVCache.for_decoder(local, 2, 5)
        cos, sin = local.rotary_emb(torch.arange(5), torch.float32)
        steps = []
        for slot in range(5):
            rope = (cos[:, :, slot:slot + 1], sin[:, :, slot:slot + 1])
            slot_mask = None if mask is None else mask[..., :slot + 1]
            fn = decoder.attention_function(attention)
            steps.append(local.step(inputs[:, slot:slot + 1], cache, rope, slot_mask, fn))
        outputs.append(torch.cat(steps, dim=1))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("nq", [16, 5])
def test_appended_row_embedding_is_bit_identical_to_embedding_the_row(nq):
    model = checkpoints.random_tiny_model(seed=26)  # a seed whose model keeps going for these 5 frames
    seen = []
    hook = model.transformer.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    try:
        events = list(model.generate_stream(_prompt(8, seed=1), max_new_frames=5, nq=nq))
    finally:
        hook.remove()
    frames = events[-1]["generation"].audio_token_ids  # [1, F, 16]
    assert frames.shape[1] >= 2, "the random model stopped too early for this check"
    for step in range(1, frames.shape[1]):
        row = torch.cat((torch.tensor([[[9]]]), frames[:, step - 1:step]), dim=-1)  # [9, codes of frame step-1]
        assert torch.equal(seen[step], model._embed_rows(row))


def test_non_finite_logits_of_the_last_channel_in_the_last_frame_raise():
    model = checkpoints.random_tiny_model(seed=23)
    with torch.no_grad():
        model.audio_embeddings[15].weight.fill_(float("inf"))  # the tied head of the last channel
    with pytest.raises(RuntimeError, match="Non-finite"):
        model.generate(_prompt(6, seed=2), max_new_frames=1)


def test_bench_forced_stop_runs_every_requested_frame():
    bench = import_module("bench")
    if not hasattr(bench, "force_continue"):
        pytest.skip("bench.py has no LM section yet (merged after the codec helper's bench.py is final)")
    model = checkpoints.random_tiny_model(seed=24)
    bench.force_continue(model)
    codes = model.generate(_prompt(6, seed=3), max_new_frames=40).audio_token_ids
    assert codes.shape[1] == 40
    for weight_format in ("bf16", "int8"):
        converted = import_module("weight_formats").apply_weight_format(
            checkpoints.random_tiny_model(seed=24), weight_format)
        bench.force_continue(converted)
        assert converted.generate(_prompt(6, seed=3), max_new_frames=12).audio_token_ids.shape[1] == 12
