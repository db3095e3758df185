"""The int8 audio phase through ONNX Runtime (onnx_audio_phase.py) decodes what the torch phase decodes."""

import logging

import pytest
import torch

from conftest import import_module, int8_tiny, optional_module, text_prompt

optional_module("onnxruntime", "pip install -r requirements.txt")
optional_module("onnx", "pip install -r requirements.txt")

generation = import_module("generation")
onnx_audio_phase = import_module("onnx_audio_phase")

# One group per slot, each with its own pick: greedy, the CLI's sampled settings, a narrow top-k and top-p with a
# strong penalty, a top-k beyond the others', and a row that stops at 5 channels.
GROUPS = [
    generation.GenerationSettings(max_new_frames=12),
    generation.GenerationSettings(max_new_frames=12, do_sample=True, audio_temperature=0.8, audio_top_p=0.95,
                                  audio_top_k=25, audio_repetition_penalty=1.2),
    generation.GenerationSettings(max_new_frames=12, do_sample=True, audio_temperature=1.3, audio_top_p=0.5,
                                  audio_top_k=5, audio_repetition_penalty=1.5),
    generation.GenerationSettings(max_new_frames=12, do_sample=True, audio_temperature=1.0, audio_top_p=1.0,
                                  audio_top_k=60),
    generation.GenerationSettings(max_new_frames=12, nq=5, do_sample=True),
]


class CountingGraph:
    """An AudioPhaseGraph that counts its runs."""

    def __init__(self, graph) -> None:
        self.graph, self.calls = graph, 0

    def run(self, inputs):
        self.calls += 1
        return self.graph.run(inputs)


def decode(model, graph, groups, frames: int = 12):
    """Each frame's codes and logit sums of slots decoding `groups` (one slot each, seeded generators), with the
    audio phase in `graph` (None: torch); and how many frames the graph ran."""
    decoder = generation.SlotDecoder(model, len(groups), 64, ("sdpa", "sdpa"))
    decoder.audio_graph = None if graph is None else CountingGraph(graph)
    for slot, settings in enumerate(groups):
        group = generation.Group([slot], settings.checked(16), torch.Generator().manual_seed(slot))
        decoder.start(group, [text_prompt(6 + slot, seed=slot)[0]], "sdpa")
    codes, sums = [], []
    with torch.inference_mode():
        for _ in range(frames):
            outputs = decoder.frame()
            codes.append([output.codes.clone() for output in outputs if output.codes is not None])
            sums.append(decoder.logit_sums[1:, :len(groups)].clone())
    return codes, sums, 0 if graph is None else decoder.audio_graph.calls


def exact_head_inputs(model, seed: int = 5):
    """Make every head's input a fixed vector of 0s and `c`s (the local ln_f's weight zeroed, its bias that vector),
    so that both int8 kernels quantise it exactly (fbgemm's per-tensor range [0, c]: 0 and 255; the graph's per-row
    blocks: 0 and 127) and compute the same integer sums: each channel's logits then agree up to the float rounding
    of their scales (~1e-7), whatever the local steps compute, and no near-tie can split the two."""
    norm = model.local_transformer.ln_f
    ones = torch.randint(0, 2, norm.bias.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.copy_(0.75 * ones)


def test_graph_picks_what_the_torch_phase_picks_for_every_kind_of_pick():
    """Greedy, sampled with the CLI's settings, narrow top-k and top-p with a strong penalty, a top-k beyond the others'
    and a row stopping at 5 channels: the same codes in every row and frame, on logits both kernels compute alike
    (`exact_head_inputs`; the repetition history still changes them frame by frame). A wrong pick rule splits a
    sampled row at frame 0."""
    model = int8_tiny()
    exact_head_inputs(model)
    graph = onnx_audio_phase.AudioPhaseGraph(model)
    torch_codes, torch_sums, _ = decode(model, None, GROUPS)
    graph_codes, graph_sums, calls = decode(model, graph, GROUPS)
    assert calls == 12  # every frame's audio phase ran in the graph
    assert len(torch_codes) == len(graph_codes) == 12
    for frame, (expected, got) in enumerate(zip(torch_codes, graph_codes)):
        assert len(expected) == len(got) == len(GROUPS)
        assert all(torch.equal(row_expected, row_got) for row_expected, row_got in zip(expected, got)), frame
    expected, got = torch.stack(torch_sums), torch.stack(graph_sums)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_graph_logits_follow_the_torch_phase_until_a_pick_splits_them():
    """On the model as it is, the graph's products round their activations per row and block (onnx_graph.py), fbgemm
    per call, so a sampled pick at a near-tie can go either way and the rows' paths then part (here row 3 at frame 1).
    Until the first channel where any row's pick differs, each channel's logit sum (the non-finite check) agrees up
    to that rounding (measured: at most 1.9% of the largest sum); a wrong local step (RoPE, attention, norm) is off
    at frame 0."""
    model = int8_tiny()
    graph = onnx_audio_phase.AudioPhaseGraph(model)
    torch_codes, torch_sums, _ = decode(model, None, GROUPS)
    graph_codes, graph_sums, _ = decode(model, graph, GROUPS)
    compared = []  # (frame, channels): every channel of the frames before the split, then those up to and
    for frame, (expected, got) in enumerate(zip(torch_codes, graph_codes)):  # including the first that differs
        differ = [int((a != b).nonzero()[0, -1]) for a, b in zip(expected, got) if not torch.equal(a, b)]
        compared.append((frame, min(differ) + 1 if differ else len(torch_sums[frame])))
        if differ:
            break
    for frame, channels in compared:
        expected, got = torch_sums[frame][:channels], graph_sums[frame][:channels]
        assert (got - expected).abs().max() <= 0.05 * expected.abs().max(), (frame, channels)


def test_a_sampled_row_without_top_k_runs_the_torch_phase():
    model = int8_tiny()
    graph = onnx_audio_phase.AudioPhaseGraph(model)
    whole_row = [generation.GenerationSettings(max_new_frames=4, do_sample=True, audio_top_k=0)]
    torch_codes, _, _ = decode(model, None, whole_row, frames=4)
    codes, _, calls = decode(model, graph, whole_row, frames=4)
    assert calls == 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(torch_codes, codes))


def test_a_model_the_graph_cannot_serve_runs_in_torch_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(import_module("cpu_choices").CACHE_DIR_ENV, str(tmp_path))
    model = int8_tiny()
    model.local_transformer.h.append(model.local_transformer.h[0])
    with pytest.raises(ValueError, match="one-layer local decoder"):
        onnx_audio_phase.AudioPhaseGraph(model)
    with caplog.at_level(logging.WARNING):
        assert onnx_audio_phase.audio_phase_graph(model) is None
    assert any("int8 audio_phase: torch (the ONNX graph failed: ValueError" in line for line in caplog.messages)
