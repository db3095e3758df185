"""How an int8 model decides where its graph phases run (onnx_graph.py), for the global step and the audio phase."""

import json
import logging

import pytest
import torch

from conftest import import_module, int8_tiny, optional_module

optional_module("onnxruntime", "pip install -r requirements.txt")
optional_module("onnx", "pip install -r requirements.txt")

checkpoints = import_module("measurement.checkpoints")
onnx_graph = import_module("onnx_graph")
PHASES = [import_module("onnx_global_step").GLOBAL_STEP, import_module("onnx_audio_phase").AUDIO_PHASE]


def test_both_phases_are_registered_and_named_in_the_summary():
    assert {phase.name for phase in onnx_graph.PHASES} == {"global_step", "audio_phase"}
    assert onnx_graph.phases_of(checkpoints.random_tiny_model(seed=31)) is None  # fp32 runs in torch throughout
    model = int8_tiny()
    onnx_graph.set_phase(model, PHASES[0], "onnxruntime")
    onnx_graph.set_phase(model, PHASES[1], "torch")
    assert onnx_graph.phases_of(model) == "audio_phase=torch global_step=onnxruntime"
    onnx_graph.set_phases(model, "onnxruntime")
    assert onnx_graph.phases_of(model) == "audio_phase=onnxruntime global_step=onnxruntime"


@pytest.mark.parametrize("phase", PHASES, ids=lambda phase: phase.name)
def test_only_an_int8_model_gets_a_graph_and_the_choice_is_probed_once_per_cpu(phase, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(import_module("cpu_choices").CACHE_DIR_ENV, str(tmp_path))
    assert onnx_graph.phase_graph(checkpoints.random_tiny_model(seed=31), phase) is None  # fp32
    with caplog.at_level(logging.INFO):
        first = onnx_graph.phase_graph(int8_tiny(), phase)
        second = onnx_graph.phase_graph(int8_tiny(), phase)
    lines = [line for line in caplog.messages if line.startswith(f"int8 {phase.name}: ")]
    assert len(lines) == 2 and "probe at 1 row: torch" in lines[0] and "remembered for this CPU" in lines[1]
    choice = lines[0].split()[2]
    assert choice in ("onnxruntime", "torch") and (first is not None) == (choice == "onnxruntime")
    assert (second is not None) == (first is not None)
    stored = json.loads((tmp_path / "cpu_kernel_choices.json").read_text())
    width = checkpoints.random_tiny_model(seed=31).local_transformer.ln_f.weight.shape[0]
    assert [entry[onnx_graph.decision_name(phase, width)][0] for entry in stored.values()] == [choice]


@pytest.mark.parametrize("phase", PHASES, ids=lambda phase: phase.name)
def test_a_model_loaded_under_inference_mode_is_probed_from_a_thread_with_autograd_on(phase, tmp_path, monkeypatch,
                                                                                      caplog):
    """bench.py builds its models under torch.inference_mode() and runs the engine with it off: the audio phase's
    probe then ran torch's local step with autograd recording on inference tensors, failed, and int8 ran in torch."""
    monkeypatch.setenv(import_module("cpu_choices").CACHE_DIR_ENV, str(tmp_path))
    with torch.inference_mode():
        model = int8_tiny()
    assert torch.is_grad_enabled()
    with caplog.at_level(logging.INFO):
        onnx_graph.phase_graph(model, phase)
    lines = [line for line in caplog.messages if line.startswith(f"int8 {phase.name}: ")]
    assert len(lines) == 1 and "probe at 1 row: torch" in lines[0], lines


@pytest.mark.parametrize("phase", PHASES, ids=lambda phase: phase.name)
def test_without_onnxruntime_the_phase_runs_in_torch(phase, monkeypatch, caplog):
    monkeypatch.setattr(onnx_graph, "onnxruntime_available", lambda: False)
    with caplog.at_level(logging.INFO):
        assert onnx_graph.phase_graph(int8_tiny(), phase) is None
    assert f"int8 {phase.name}: torch (onnxruntime and onnx are not installed)" in caplog.messages


@pytest.mark.parametrize("phase", PHASES, ids=lambda phase: phase.name)
def test_a_graph_that_fails_to_build_costs_speed_never_the_load(phase, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(import_module("cpu_choices").CACHE_DIR_ENV, str(tmp_path))

    def fail(model):
        raise RuntimeError("no kernel for this operator")

    broken = type(phase)(phase.name, fail, phase.probe)
    model = int8_tiny()
    with caplog.at_level(logging.WARNING):
        assert onnx_graph.phase_graph(model, broken) is None
    assert f"int8 {phase.name}: torch (the ONNX graph failed: RuntimeError: no kernel for this operator)" in \
        caplog.messages
    assert onnx_graph.phase_graph(model, phase) is None  # decided once per model: it stays in torch


def test_the_product_kernel_computes_what_the_int8_values_mean_here():
    """check_products on this CPU: the graphs' product against float64 on the same int8 weights, 1 and 3 rows."""
    onnx_graph.check_products.cache_clear()
    onnx_graph.check_products(64)  # raises where the kernel is off
    onnx_graph.check_products(768)


@pytest.mark.parametrize("phase", PHASES, ids=lambda phase: phase.name)
def test_a_product_kernel_that_computes_something_else_leaves_the_phase_in_torch(phase, tmp_path, monkeypatch,
                                                                                 caplog):
    """A kernel reading the weights in another order (what an overflowing or misread kernel looks like to the
    check) is caught before the probe times anything, and the phase runs in torch with a warning."""
    monkeypatch.setenv(import_module("cpu_choices").CACHE_DIR_ENV, str(tmp_path))
    store = onnx_graph.GraphBuilder._store

    class Reversed:
        def __init__(self, layer) -> None:
            self.layer = layer

        def int8_weight(self):
            weight, scales, bias = self.layer.int8_weight()
            return weight.flip(1), scales, bias

    monkeypatch.setattr(onnx_graph.GraphBuilder, "_store", lambda builder, key, layer: store(builder, key,
                                                                                              Reversed(layer)))
    onnx_graph.check_products.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert onnx_graph.phase_graph(int8_tiny(), phase) is None
    finally:
        onnx_graph.check_products.cache_clear()
    assert any(f"int8 {phase.name}: torch (the ONNX graph failed: ValueError: MatMulNBits computes something else"
               in line for line in caplog.messages)


def test_a_runtime_is_named_and_onnxruntime_needs_int8():
    with pytest.raises(ValueError, match="runtime 'tensorrt'; expected one of torch, onnxruntime"):
        onnx_graph.set_phase(int8_tiny(), PHASES[0], "tensorrt")
    with pytest.raises(ValueError, match="runs int8 models; this one is fp32"):
        onnx_graph.set_phase(checkpoints.random_tiny_model(seed=31), PHASES[1], "onnxruntime")
