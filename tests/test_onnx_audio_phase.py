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


def test_graph_codes_equal_the_torch_phase_row_by_row_for_every_kind_of_pick():
    """The graph's products round their 8-bit activations as ONNX Runtime does, not as fbgemm does, so a logit can
    differ in its last bits and a sampled pick at a near-tie can go the other way; from then on that row (and, through
    the shared activation range of int8, its neighbours) decodes another path. So: every frame equal until the first
    such split, which comes late and in one row only (on an AVX2 CPU none came in 12 frames; on a Zen 4 with VNNI,
    row 2 at frame 7 of 12). A wrong pick rule splits every sampled row at frame 0."""
    model = int8_tiny()
    graph = onnx_audio_phase.AudioPhaseGraph(model)
    torch_codes, torch_sums, _ = decode(model, None, GROUPS)
    graph_codes, graph_sums, calls = decode(model, graph, GROUPS)
    assert calls == 12  # every frame's audio phase ran in the graph
    assert len(torch_codes) == len(graph_codes) == 12
    split = len(torch_codes)
    for frame, (expected, got) in enumerate(zip(torch_codes, graph_codes)):
        assert len(expected) == len(got) == len(GROUPS)
        differ = [group for group, (row_expected, row_got) in enumerate(zip(expected, got))
                  if not torch.equal(row_expected, row_got)]
        if differ:
            assert len(differ) == 1 and frame >= 4, (frame, differ)
            split = frame
            break
    # Each channel's logit sum (the non-finite check) from another int8 kernel, while the paths are the same: equal up
    # to the rounding of its 8-bit activations (measured: 2.6e-5 on average, at most 0.024 where the sums reach 19).
    expected, got = torch.stack(torch_sums[:split]), torch.stack(graph_sums[:split])
    assert (got - expected).abs().max() <= 5e-3 * expected.abs().max()


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
