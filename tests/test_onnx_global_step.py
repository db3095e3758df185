"""The int8 global step through ONNX Runtime (onnx_global_step.py) computes and writes what the torch step does."""

import pytest
import torch

from conftest import import_module, int8_tiny, optional_module, text_prompt

optional_module("onnxruntime", "pip install -r requirements.txt")
optional_module("onnx", "pip install -r requirements.txt")

generation = import_module("generation")
gpt2_decoder = import_module("gpt2_decoder")
onnx_global_step = import_module("onnx_global_step")


def prefilled_cache(model, lengths: list[int], capacity: int = 32):
    """A global cache whose slot n holds a prefilled prompt of lengths[n] rows (0: an empty slot)."""
    decoder, attention = model.transformer, gpt2_decoder.attention_function("sdpa")
    cache = gpt2_decoder.KVCache.for_decoder(decoder, len(lengths), capacity)
    for slot, length in enumerate(lengths):
        if length:
            embedded = model._embed_rows(text_prompt(length, seed=slot))
            decoder.prefill(embedded, cache, slot, attention)
    return cache


def copy_of(cache):
    return cache.grow(cache.capacity)


@pytest.mark.parametrize("valid", [None, [True, False, True, True]], ids=["all rows real", "a stopped row"])
def test_one_step_writes_and_returns_what_the_torch_step_does(valid):
    model = int8_tiny()
    graph = onnx_global_step.GlobalStepGraph(model)
    expected_cache = prefilled_cache(model, [5, 9, 3, 0])  # rows of different lengths and an empty slot
    cache = copy_of(expected_cache)
    embeds = torch.randn(4, 1, model.transformer.ln_f.weight.shape[0], generator=torch.Generator().manual_seed(4))
    valid = None if valid is None else torch.tensor(valid)
    with torch.inference_mode():
        expected = model.transformer.decode_step(embeds, valid, expected_cache, 10, gpt2_decoder.attention_function("sdpa"))
        hidden = graph.run(embeds, valid, cache)
    assert torch.equal(cache.positions, expected_cache.positions)  # [6, 9, 4, 1] or the stopped row kept at 9
    assert torch.equal(cache.key_mask, expected_cache.key_mask)
    real = torch.ones(4, dtype=torch.bool) if valid is None else valid
    assert torch.equal(hidden[~real], torch.zeros_like(hidden[~real]))  # a row that is not real comes out as zeros
    # Another int8 kernel: the same up to the rounding of 8-bit activations (measured cosine >= 0.9999 here).
    assert torch.nn.functional.cosine_similarity(hidden[real], expected[real], dim=-1).min() > 0.999
    written = torch.zeros_like(cache.key_mask)
    written.scatter_(1, expected_cache.positions[:, None] - real.long()[:, None], True)  # where this step wrote
    for got, want in zip(cache.keys + cache.values, expected_cache.keys + expected_cache.values):
        untouched = ~written[:, None, :, None].expand_as(got)
        assert torch.equal(got[untouched], want[untouched])  # the rest of the cache is left as it was, bit for bit
        assert (got - want).abs().max() <= 0.05 * want.abs().max()


class CheckingGraph:
    """Stands in for the decoder's GlobalStepGraph: each frame runs the graph on copies of the caches and the torch
    steps (the global step, then local step 0) on the caches themselves, records how they compare, and returns
    torch's (so decoding follows torch: teacher forced, whatever a near tie between two int8 kernels would pick)."""

    def __init__(self, model) -> None:
        self.model, self.graph = model, onnx_global_step.GlobalStepGraph(model)
        self.cosines, self.local_cosines, self.same_bookkeeping, self.zero_rows = [], [], [], []
        self.local_keys_close = []

    def step(self, embeds, valid, cache, local_cache):
        copy, local_copy = cache.grow(cache.capacity), local_cache.grow(local_cache.capacity)
        got, got_local = self.graph.step(embeds, valid, copy, local_copy)
        attention, rows = gpt2_decoder.attention_function("sdpa"), embeds.shape[0]
        read_length = int(cache.positions[:rows].max()) + 1
        expected = self.model.transformer.decode_step(embeds, valid, cache, read_length, attention)
        expected_local = self.model.local_transformer.lockstep_step(expected[:, None], local_cache, 0, attention)
        cosine = torch.nn.functional.cosine_similarity
        self.cosines.append(cosine(got[valid], expected[valid], dim=-1).min())
        self.local_cosines.append(cosine(got_local[valid], expected_local[valid], dim=-1).min())
        self.local_keys_close.append(all(
            torch.allclose(a[:rows, :, 0][valid], b[:rows, :, 0][valid], atol=0.05 * float(b[:rows, :, 0].abs().max()))
            for a, b in zip(local_copy.keys + local_copy.values, local_cache.keys + local_cache.values)))
        self.same_bookkeeping.append(torch.equal(copy.positions, cache.positions)
                                     and torch.equal(copy.key_mask, cache.key_mask))
        self.zero_rows.append(bool((got[~valid] == 0).all()))
        return expected, expected_local


def test_every_frame_of_a_slot_decoder_matches_the_torch_step():
    """Three slots with prompts of different lengths and limits, leaving one by one (later frames run stopped rows
    and free slots), the graph checked against torch on every frame."""
    model = int8_tiny()
    decoder = generation.SlotDecoder(model, 3, 64, ("sdpa", "sdpa"))
    decoder.global_graph = checking = CheckingGraph(model)
    for slot in range(3):
        settings = generation.GenerationSettings(max_new_frames=6 + 3 * slot).checked(16)
        decoder.start(generation.Group([slot], settings, torch.Generator().manual_seed(slot)),
                      [text_prompt(6 + 4 * slot, seed=slot)[0]], "sdpa")
    frames = 0
    with torch.inference_mode():
        while decoder.groups and frames < 20:
            decoder.frame()
            frames += 1
    assert frames == len(checking.cosines) == 12  # every frame's global step went through the graph
    assert all(checking.same_bookkeeping) and all(checking.zero_rows) and all(checking.local_keys_close)
    assert min(checking.cosines) > 0.999  # measured: 0.99999 or closer
    # Local step 0's hidden state is mostly its residual input: measured 0.99991 here, and 0.99919 when its attention
    # returns the key instead of the value; hence the tighter bound.
    assert min(checking.local_cosines) > 0.9997


def test_a_row_holding_nan_fails_alone_in_the_graph():
    """The graph quantises each row's activations alone (onnx_graph.py): a row fed NaN comes out NaN, and the other
    rows exactly as beside a row of zeros."""
    model = int8_tiny()
    graph = onnx_global_step.GlobalStepGraph(model)
    embeds = torch.randn(3, 1, model.transformer.ln_f.weight.shape[0], generator=torch.Generator().manual_seed(6))
    zeroed, broken = embeds.clone(), embeds.clone()
    zeroed[1], broken[1, 0, 3] = 0.0, float("nan")
    expected = graph.run(zeroed, None, prefilled_cache(model, [5, 7, 2]))
    got = graph.run(broken, None, prefilled_cache(model, [5, 7, 2]))
    assert torch.isnan(got[1]).all()
    assert torch.equal(got[[0, 2]], expected[[0, 2]])


def test_a_row_comes_out_the_same_whatever_its_neighbours_hold():
    """Batch invariance in the graph (fbgemm's int8 shares one range over all rows): a row beside one loud neighbour
    and beside a quiet one, in batches of 2 and 4, is the same bit for bit."""
    model = int8_tiny()
    graph = onnx_global_step.GlobalStepGraph(model)
    width = model.transformer.ln_f.weight.shape[0]
    embeds = torch.randn(4, 1, width, generator=torch.Generator().manual_seed(8))
    loud = embeds.clone()
    loud[1:] *= 50.0
    outputs = [graph.run(batch[:rows], None, prefilled_cache(model, [5, 7, 2, 4][:rows]))[0]
               for batch in (embeds, loud) for rows in (2, 4)]
    assert all(torch.equal(output, outputs[0]) for output in outputs[1:])


def test_the_graph_rounds_like_int8_against_the_float32_step():
    """Against the float32 step of the model the int8 weights came from, the graph's hidden states are within int8's
    rounding, as torch's int8 step's are (measured here: relative error 3.8-5.7e-4 for the graph, 3.9-4.3e-4 for
    torch)."""
    float_model = import_module("measurement.checkpoints").random_tiny_model(seed=31)
    model = int8_tiny()
    graph = onnx_global_step.GlobalStepGraph(model)
    embeds = torch.randn(4, 1, model.transformer.ln_f.weight.shape[0], generator=torch.Generator().manual_seed(9))
    attention = gpt2_decoder.attention_function("sdpa")
    lengths = [5, 9, 3, 6]
    with torch.inference_mode():
        reference = float_model.transformer.decode_step(embeds, None, prefilled_cache(float_model, lengths), 10,
                                                        attention)
        got = graph.run(embeds, None, prefilled_cache(model, lengths))
    assert ((got - reference).norm(dim=-1) / reference.norm(dim=-1)).max() <= 2e-3


def test_a_step_past_the_capacity_is_refused_before_the_runtime_writes():
    model = int8_tiny()
    cache = prefilled_cache(model, [4], capacity=4)
    embeds = torch.zeros(1, 1, model.transformer.ln_f.weight.shape[0])
    with pytest.raises(ValueError, match="KV cache overflow: position 4 written, capacity is 4"):
        onnx_global_step.GlobalStepGraph(model).run(embeds, None, cache)


def test_a_decoder_without_rope_is_refused_by_name():
    model = int8_tiny()
    model.transformer.rotary_emb = None
    with pytest.raises(ValueError, match="expects decoders with RoPE"):
        onnx_global_step.GlobalStepGraph(model)
    model = int8_tiny()
    model.local_transformer.rotary_emb = None  # local step 0 would add a learned position, not rotate
    with pytest.raises(ValueError, match="expects decoders with RoPE"):
        onnx_global_step.GlobalStepGraph(model)
