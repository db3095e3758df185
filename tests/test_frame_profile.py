"""frame_profile: the bytes a frame must read per weight format, the floor they give, and the profile's split."""

import pytest
import torch

from conftest import import_module, int8_tiny, optional_module, text_prompt

checkpoints = import_module("measurement.checkpoints")
frame_profile = import_module("measurement.frame_profile")
host = import_module("host")
weight_formats = import_module("weight_formats")


def _bytes_in(weight_format):
    model = checkpoints.random_tiny_model(seed=5)
    if weight_format != "plain":
        weight_formats.apply_weight_format(model, weight_format)
    return frame_profile.frame_weight_bytes(model)


def test_frame_bytes_follow_the_stored_width_of_each_format():
    plain, bf16 = _bytes_in("plain"), _bytes_in("bf16")
    assert set(plain) == {"global", "local", "heads", "text head"}
    assert bf16["heads"] * 2 == plain["heads"]
    for part in ("global", "local"):  # every Linear in half the bytes; norms stay float32 where oneDNN cannot pack
        assert plain[part] / 2 <= bf16[part] < 0.51 * plain[part], part
    if weight_formats.int8_kernels_available():
        int8 = _bytes_in("int8")
        assert plain["heads"] / 4 < int8["heads"] < plain["heads"] / 3  # int8 weights plus float32 scales and bias


def test_packed_and_int8_layers_report_their_stored_bytes():
    linear = torch.nn.Linear(32, 16)
    assert weight_formats.stored_weight_bytes(linear) == (32 * 16 + 16) * 4
    assert weight_formats.stored_weight_bytes(torch.nn.LayerNorm(8)) is None
    if weight_formats.int8_kernels_available():
        assert weight_formats.stored_weight_bytes(weight_formats.Int8DynamicLinear(linear, 63)) == 32 * 16 + 8 * 16


def test_floor_is_the_bytes_over_the_measured_bandwidth():
    model = checkpoints.random_tiny_model(seed=5)
    floor = frame_profile.frame_floor(model, torch.get_num_threads())
    assert floor["bandwidth"] == host.read_bandwidth(torch.get_num_threads()) > 1e8  # any machine reads 100 MB/s
    assert floor["floor_ms"] == pytest.approx(1000 * floor["bytes"] / floor["bandwidth"])
    assert floor["bytes"] == sum(floor["parts"].values())


def test_profile_splits_decoded_frames_into_the_frame_parts():
    model = checkpoints.random_tiny_model(seed=5)
    checkpoints.force_continue(model)
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        profile = frame_profile.profile_frames(model, text_prompt(6, generator=generator), 3, do_sample=True,
                                               audio_top_k=25, audio_top_p=0.95, audio_repetition_penalty=1.2)
    assert profile["frames"] == 3
    torch_parts = [part for part in frame_profile.PARTS if "graph" not in part]
    assert all(profile["parts"][part] > 0 for part in torch_parts), profile
    assert all(profile["parts"][part] == 0 for part in frame_profile.PARTS if part not in torch_parts)  # fp32
    assert sum(profile["parts"].values()) + profile["host_ms"] == pytest.approx(profile["ms_per_frame"])
    assert profile["aten_calls"] > 100


def test_an_int8_frame_is_split_into_its_two_graphs():
    """The ONNX graphs are opaque to torch.profiler; each opens its own span, so an int8 frame is not all host."""
    optional_module("onnxruntime", "pip install -r requirements.txt")
    optional_module("onnx", "pip install -r requirements.txt")
    model = int8_tiny()
    import_module("onnx_graph").set_phases(model, "onnxruntime")
    with torch.inference_mode():
        profile = frame_profile.profile_frames(model, text_prompt(6, generator=torch.Generator().manual_seed(1)), 3,
                                               do_sample=True, audio_top_k=25, audio_top_p=0.95)
    graphs = [part for part in frame_profile.PARTS if "graph" in part]
    assert len(graphs) == 2 and all(profile["parts"][part] > 0 for part in graphs), profile
    assert profile["parts"]["global step"] == profile["parts"]["local steps"] == 0  # in the graphs, not torch
