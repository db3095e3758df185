"""Weight formats: each is an explicit, logged load-time choice whose audio logits stay close to fp32.

Quality is the teacher-forced audio-logit cosine vs fp32 (issue 7): >= 0.999 for bf16/fp16, >= 0.995 for int8, on the
golden tiny model and on a full-size random model. The full-size cases build a 117 M-parameter model once (about 2 s)
and feed 2 frames, so they stay cheap (a few seconds); `-k "not full_size"` skips them.
"""

import copy
import logging

import pytest
import torch

from conftest import REPO_ROOT, import_module, text_prompt

checkpoints = import_module("measurement.checkpoints")
weight_formats = import_module("weight_formats")
modeling = import_module("modeling_moss_tts_nano")
teacher_forcing = import_module("measurement.teacher_forcing")

# Issue 7's promise: the worst teacher-forced audio-logit cosine of each format against fp32.
MIN_AUDIO_COSINE = {"bf16": 0.999, "fp16": 0.999, "int8": 0.995}

needs_int8 = pytest.mark.skipif(not weight_formats.int8_kernels_available(),
                                reason="this torch build has no fbgemm/oneDNN int8 linear kernels")


def _prompt_and_frames(seed: int, prompt_rows: int, num_frames: int):
    generator = torch.Generator().manual_seed(seed)
    ids = text_prompt(prompt_rows, generator=generator)
    frames = torch.randint(0, 1024, (1, num_frames, 16), generator=generator)
    return ids, frames


def _audio_metrics_vs_fp32(model, weight_format, prompt_rows=12, num_frames=4):
    ids, frames = _prompt_and_frames(0, prompt_rows, num_frames)
    reference = teacher_forcing.teacher_forced(model, ids, frames)
    converted = weight_formats.apply_weight_format(copy.deepcopy(model), weight_format)
    return teacher_forcing.compare(reference, teacher_forcing.teacher_forced(converted, ids, frames))["audio"]


@pytest.fixture(scope="module")
def tiny_model():
    from conftest import shared_path

    folder = shared_path("golden", "tts_tiny")
    return checkpoints.load_safetensors_model(folder)


@pytest.fixture(scope="module")
def full_size_model():
    config = modeling.MossTTSNanoConfig.from_json_file(str(REPO_ROOT / "config.json"))
    torch.manual_seed(0)
    return modeling.MossTTSNanoForCausalLM(config).eval()


def _formats_to_check():
    return [pytest.param("bf16"), pytest.param("fp16"), pytest.param("int8", marks=needs_int8)]


@pytest.mark.parametrize("weight_format", _formats_to_check())
def test_tiny_model_audio_logits_stay_close_to_fp32(tiny_model, weight_format):
    audio = _audio_metrics_vs_fp32(tiny_model, weight_format, num_frames=8)
    assert audio["cosine_min"] >= MIN_AUDIO_COSINE[weight_format], audio


@pytest.mark.parametrize("weight_format", _formats_to_check())
def test_full_size_random_model_audio_logits_stay_close_to_fp32(full_size_model, weight_format):
    audio = _audio_metrics_vs_fp32(full_size_model, weight_format, prompt_rows=8, num_frames=2)
    assert audio["cosine_min"] >= MIN_AUDIO_COSINE[weight_format], audio


def test_fp32_format_keeps_greedy_codes_exact():
    model = checkpoints.random_tiny_model(seed=3)
    ids, _ = _prompt_and_frames(1, 10, 0)
    before = model.generate(ids, max_new_frames=6).audio_token_ids
    after = weight_formats.apply_weight_format(model, "fp32").generate(ids, max_new_frames=6).audio_token_ids
    assert torch.equal(before, after)


@pytest.mark.parametrize("weight_format", _formats_to_check())
def test_converted_model_generates_and_keeps_embeddings_float(weight_format):
    model = weight_formats.apply_weight_format(checkpoints.random_tiny_model(seed=5), weight_format)
    ids, _ = _prompt_and_frames(3, 10, 0)
    codes = model.generate(ids, max_new_frames=4).audio_token_ids
    assert codes.shape[0] == 1 and codes.shape[2] == 16
    embedding_dtype = model.audio_embeddings[0].weight.dtype
    assert embedding_dtype == weight_formats.compute_dtype("cpu", weight_format)
    assert model.text_lm_head.weight is model.transformer.wte.weight  # the text head is never converted
    assert weight_formats.weight_format_of(model) == weight_format


@needs_int8
def test_int8_heads_are_copies_and_embeddings_stay_float32():
    model = checkpoints.random_tiny_model(seed=6)
    table = model.audio_embeddings[2].weight
    weight_formats.apply_weight_format(model, "int8")
    assert isinstance(model.audio_lm_heads[2], weight_formats.Int8DynamicLinear)
    assert model.audio_embeddings[2].weight is table and table.dtype == torch.float32
    assert isinstance(model.transformer.h[0].mlp.fc_in, weight_formats.Int8DynamicLinear)
    assert isinstance(model.local_transformer.h[0].attn.c_attn, weight_formats.Int8DynamicLinear)


def _format_log_line(caplog, model, weight_format):
    with caplog.at_level(logging.INFO, logger=weight_formats.__name__):
        weight_formats.apply_weight_format(model, weight_format)
    (line,) = [record.getMessage() for record in caplog.records if "weight format" in record.getMessage()]
    return line


def test_format_choice_is_logged_with_the_kernel_the_probe_chose(caplog):
    line = _format_log_line(caplog, checkpoints.random_tiny_model(seed=7), "bfloat16")
    assert line.startswith("weight format bf16 on cpu")
    assert ("oneDNN's packed layout" in line) == weight_formats.onednn_packing_available(), line
    assert ("bf16 weights and float32 activations" in line) != weight_formats.onednn_packing_available(), line


def test_bf16_keeps_bf16_weights_in_a_float32_model_where_packing_does_not_run(caplog, monkeypatch):
    monkeypatch.setattr(weight_formats, "onednn_packing_available", lambda: False)
    model = checkpoints.random_tiny_model(seed=7)
    line = _format_log_line(caplog, model, "bf16")
    assert "bf16 weights and float32 activations" in line and "does not run on this CPU" in line
    assert not any(isinstance(module, weight_formats.PackedLinear) for module in model.modules())
    fc_in = model.transformer.h[0].mlp.fc_in
    assert isinstance(fc_in, weight_formats.Bf16WeightLinear) and fc_in.weight.dtype == torch.bfloat16
    assert model.transformer.ln_f.weight.dtype == torch.float32
    assert weight_formats.weight_format_of(model) == "bf16"
    assert weight_formats.linear_kernel_of(model) == "bf16-weights"
    assert "bf16-weight" in weight_formats.dtype_change_unavailable_reason(model)
    hidden = torch.randn(2, 3, fc_in.in_features)
    assert fc_in(hidden).dtype == torch.float32
    ids, _ = _prompt_and_frames(3, 10, 0)
    assert model.generate(ids, max_new_frames=2).audio_token_ids.shape[2] == 16


def test_packing_probe_agrees_with_a_real_packed_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    if weight_formats.onednn_packing_available():
        weight_formats.PackedLinear(linear)(torch.randn(1, 64).to(torch.bfloat16))
    else:  # the probe said no: so does the op (e.g. an AVX2-only CPU)
        with pytest.raises(RuntimeError):
            weight_formats.PackedLinear(linear)(torch.randn(1, 64).to(torch.bfloat16))


@needs_int8
def test_int8_layer_with_8_bit_activations_does_not_saturate_on_extreme_inputs():
    """fbgemm without VNNI adds pairs of uint8 x int8 products in int16; the weight range keeps them below 32767."""
    linear = torch.nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.bias.zero_()
    hidden = torch.full((2, 64), 3.0)
    hidden[1, ::2] = 0.0  # a second row with half the products
    output = weight_formats.Int8DynamicLinear(linear)(hidden)
    torch.testing.assert_close(output, linear(hidden).detach(), rtol=1e-3, atol=1e-3)


@needs_int8
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_an_int8_row_holding_nan_or_inf_fails_alone(bad):
    """Activations are quantised with one range over all rows (the engine's rows are different requests): a row
    holding NaN or inf comes out NaN and leaves the other rows exactly as if it held zeros."""
    layer = weight_formats.Int8DynamicLinear(torch.nn.Linear(64, 16))
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    zeroed, broken = hidden.clone(), hidden.clone()
    zeroed[1], broken[1, 5] = 0.0, bad
    expected, got = layer(zeroed), layer(broken)
    assert torch.isnan(got[1]).all()
    assert torch.equal(got[[0, 2]], expected[[0, 2]])
    assert torch.equal(layer(hidden), layer(hidden.clone()))  # finite rows take the plain call


@pytest.mark.parametrize("name, expected", [(None, "fp32"), ("float32", "fp32"), ("BF16", "bf16"),
                                            ("torch.float16", "fp16"), ("int8", "int8")])
def test_format_names_are_normalised(name, expected):
    assert weight_formats.normalize_weight_format(name) == expected


def test_unknown_format_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="int4"):
        weight_formats.normalize_weight_format("int4")


@needs_int8
def test_switching_an_int8_model_to_another_format_raises():
    model = weight_formats.apply_weight_format(checkpoints.random_tiny_model(seed=8), "int8")
    with pytest.raises(ValueError, match="reload"):
        weight_formats.apply_weight_format(model, "fp32")


@pytest.mark.skipif(not weight_formats.onednn_packing_available(),
                    reason="oneDNN's packed bf16 linear does not run on this CPU or torch build")
def test_packed_linear_equals_plain_bf16_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    packed = weight_formats.PackedLinear(linear)
    for shape in [(1, 1, 64), (2, 7, 64)]:
        hidden = torch.randn(shape).to(torch.bfloat16)
        torch.testing.assert_close(packed(hidden).float(), linear(hidden).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kernel", ["packed", "plain"])
def test_fp32_keeps_upstreams_golden_codes_with_either_cpu_kernel(monkeypatch, kernel):
    """fp32 picks F.linear or oneDNN's packed linear per CPU (a timing probe); both must give upstream's greedy and
    seeded-sampled codes on the golden model, so the choice only changes speed."""
    from conftest import shared_path
    from safetensors.torch import load_file

    if kernel == "packed" and weight_formats.fp32_linear_kernel()[1].startswith("oneDNN"):
        pytest.skip(weight_formats.fp32_linear_kernel()[1])
    folder = shared_path("golden", "tts_tiny")
    expected = load_file(folder / "expected.safetensors")
    monkeypatch.setattr(weight_formats, "fp32_linear_kernel", lambda: (kernel, "forced by the test"))
    model = weight_formats.apply_weight_format(checkpoints.load_safetensors_model(folder), "fp32")
    assert weight_formats.linear_kernel_of(model) == ("onednn-packed" if kernel == "packed" else "plain")
    for case, frames in (("greedy_voice_clone", 24), ("batch_left_pad", 16)):
        codes = model.generate(expected[f"{case}.input_ids"], expected[f"{case}.attention_mask"],
                               max_new_frames=frames).audio_token_ids
        assert torch.equal(codes, expected[f"{case}.audio_token_ids"]), case
    torch.manual_seed(2024)
    sampled = model.generate(expected["sampled_seeded.input_ids"], expected["sampled_seeded.attention_mask"],
                             max_new_frames=16, do_sample=True, audio_temperature=0.8, audio_top_p=0.95,
                             audio_top_k=25, audio_repetition_penalty=1.2, text_temperature=1.0).audio_token_ids
    assert torch.equal(sampled, expected["sampled_seeded.audio_token_ids"])



def test_a_faster_format_is_hinted_only_for_fp32_on_a_cpu_that_runs_it_well(monkeypatch):
    monkeypatch.setattr(weight_formats, "cpu_has_vnni", lambda: False)  # int8 is hinted with or without VNNI
    monkeypatch.setattr(weight_formats, "int8_kernels_available", lambda: True)
    assert "--weight-format int8" in weight_formats.faster_format_hint("cpu", "fp32")
    assert weight_formats.faster_format_hint("cpu", "int8") is None
    assert weight_formats.faster_format_hint(torch.device("cuda"), "fp32") is None  # not a CPU
    monkeypatch.setattr(weight_formats, "int8_kernels_available", lambda: False)
    monkeypatch.setattr(weight_formats, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(weight_formats, "onednn_packing_available", lambda: True)
    assert "--weight-format bf16" in weight_formats.faster_format_hint("cpu", "fp32")
    monkeypatch.setattr(weight_formats, "cpu_has_native_bf16", lambda: False)
    assert weight_formats.faster_format_hint("cpu", "fp32") is None


# -- the codec's Linear layout on the CPU --------------------------------------------------------------------------
def _k_major(module):
    """Whether each nn.Linear weight of `module` is K-major (stride 1 along the output rows)."""
    return {linear.weight.stride()[0] == 1 for linear in module.modules() if isinstance(linear, torch.nn.Linear)}


@pytest.mark.parametrize("layout", ["k-major", "row-major"])
def test_codec_layout_follows_the_probe_and_keeps_values_checkpoints_and_audio(monkeypatch, tmp_path, layout):
    codec = checkpoints.tiny_codec(seed=3).eval()
    before = {name: tensor.clone() for name, tensor in codec.state_dict().items()}
    codes = torch.randint(0, codec.config.codebook_size, (codec.config.num_quantizers, 1, 5))
    audio = codec.decode(codes).audio
    monkeypatch.setattr(weight_formats, "codec_weight_layout", lambda: (layout, "forced by the test"))
    assert weight_formats.use_codec_cpu_layout(codec) == f"{layout} Linear weights (forced by the test)"
    assert _k_major(codec.decoder) == {layout == "k-major"} and _k_major(codec.encoder) == {False}
    after = codec.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    torch.testing.assert_close(codec.decode(codes).audio, audio, atol=1e-5, rtol=1e-5)
    codec.save_pretrained(str(tmp_path))
    reloaded = type(codec).from_pretrained(str(tmp_path)).state_dict()
    assert all(torch.equal(reloaded[name], before[name]) for name in before)


def test_codec_layout_goes_back_to_row_major_off_the_cpu_and_leaves_16_bit_decoders_alone(monkeypatch):
    monkeypatch.setattr(weight_formats, "codec_weight_layout", lambda: ("k-major", "forced by the test"))
    codec = checkpoints.tiny_codec(seed=4).eval()
    weight_formats.use_codec_cpu_layout(codec)
    assert _k_major(codec.decoder) == {True}
    codec.to("meta")  # another device: .to keeps the strides, the layout call restores contiguous weights
    assert _k_major(codec.decoder) == {True}
    assert weight_formats.use_codec_cpu_layout(codec) == "row-major Linear weights (not on the CPU)"
    assert _k_major(codec.decoder) == {False}
    half = checkpoints.tiny_codec(seed=4).eval()
    half.set_compute_dtype("bf16")
    assert weight_formats.use_codec_cpu_layout(half).startswith("weights as loaded")
    assert _k_major(half.decoder) == {False}


@pytest.mark.parametrize("row_us, k_major_us, expected", [(300.0, 250.0, "k-major"), (300.0, 290.0, "row-major"),
                                                          (250.0, 300.0, "row-major")])
def test_codec_layout_probe_takes_k_major_only_when_it_is_clearly_faster(monkeypatch, row_us, k_major_us, expected):
    monkeypatch.setattr(weight_formats, "_codec_probe_us", lambda: (row_us, k_major_us))
    layout, why = weight_formats.codec_weight_layout.__wrapped__()
    assert layout == expected and why == f"probe at 4 + 32 rows: row-major {row_us:.0f} us, K-major {k_major_us:.0f} us"


def test_codec_layout_probe_times_real_linears():
    row_us, k_major_us = weight_formats._codec_probe_us()
    assert 0 < row_us < 1e5 and 0 < k_major_us < 1e5
