"""Codec behaviour on tiny random models: config reading, checkpoint loading, windows, streaming, lengths, dtypes."""

import json

import pytest
import torch
from conftest import REPO_ROOT, import_module, shared_path
from safetensors.torch import save_file
from transformers import AutoModel

checkpoints = import_module("measurement.checkpoints")
configuration = import_module("configuration_moss_audio_tokenizer")
modeling = import_module("modeling_moss_audio_tokenizer")
codec_streaming = import_module("codec_streaming")
weights = import_module("weights")
HOP = 3840


def _patch(size):
    return {"module_type": "PatchedPretransform", "patch_size": size}


def _stage(input_dim, output_dim, num_layers, duration, d_model=256, heads=4, ffn=1024):
    return {"causal": True, "context_duration": duration, "conv_layout": True, "d_model": d_model,
            "dim_feedforward": ffn, "gating": "none", "input_dimension": input_dim, "layer_scale": 0.01,
            "max_period": 10000, "module_type": "Transformer", "norm": "layer_norm", "num_heads": heads,
            "num_layers": num_layers, "output_dimension": output_dim, "positional_embedding": "rope"}


def released_config_dict() -> dict:
    """The released codec config.json (spec codec.md §2.2, §2.4, §3), written out independently of the module."""
    encoder = [_patch(240), _stage(240, 384, 4, 4.0), _patch(2), _stage(768, 384, 2, 6.0), _patch(2),
               _stage(768, 384, 2, 8.0), _patch(2), _stage(768, 192, 4, 10.0), _patch(4)]
    decoder = [_patch(4), _stage(192, 768, 4, 10.0), _patch(2), _stage(384, 768, 2, 8.0), _patch(2),
               _stage(384, 768, 2, 6.0), _patch(2), _stage(384, 240, 4, 4.0), _patch(240)]
    return {
        "architectures": ["MossAudioTokenizerModel"],
        "auto_map": {"AutoConfig": "configuration_moss_audio_tokenizer.MossAudioTokenizerConfig",
                     "AutoModel": "modeling_moss_audio_tokenizer.MossAudioTokenizerModel"},
        "model_type": "moss-audio-tokenizer", "sample_rate": 48000, "sampling_rate": 48000, "downsample_rate": 3840,
        "causal_transformer_context_duration": 10.0, "number_channels": 2, "enable_channel_interleave": True,
        "attention_implementation": "sdpa", "compute_dtype": "fp32", "dtype": "float32", "code_dim": 768,
        "encoder_kwargs": encoder, "decoder_kwargs": decoder, "quantizer_type": "rlfq",
        "quantizer_kwargs": {"codebook_dim": 8, "codebook_loss_weight": 1.0, "codebook_size": 1024,
                             "commitment_loss_weight": 0.25, "input_dim": 768, "num_quantizers": 16,
                             "output_dim": 768, "quantizer_dropout": 1.0, "quantizer_type": "rlfq", "rvq_dim": 512},
        "transformers_version": "4.56.0.dev0", "reversed_decoder_kwargs": encoder,
    }


def tiny_config_dict(durations=(0.02, 0.04, 0.06, 0.08), num_quantizers=4, codebook_size=64) -> dict:
    """Real patch layout and rates, toy widths; windows 8/8/6/4 (encoder) and 4/6/8/8 (decoder) tokens."""
    return checkpoints.tiny_codec_config_dict(code_dim=48, d_model=16, contexts=durations,
                                              num_quantizers=num_quantizers, codebook_size=codebook_size, rvq_dim=16)


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = configuration.MossAudioTokenizerConfig(**tiny_config_dict(**kwargs))
    model = modeling.MossAudioTokenizerModel(config).eval()
    with torch.no_grad():  # unit-gain weights so that attention and the windows matter numerically
        for name, param in model.named_parameters():
            if name.endswith("scale"):
                param.fill_(0.3)
            elif param.dim() == 2 and not name.startswith("quantizer"):
                param.normal_(0.0, param.shape[1] ** -0.5)
            elif name.endswith("codebook.weight"):
                param.normal_(0.0, 1.0)
    return model


# -- config --------------------------------------------------------------------------------------------------------
def test_config_reads_released_json_and_defaults_to_the_release():
    released = configuration.MossAudioTokenizerConfig(**released_config_dict())
    default = configuration.MossAudioTokenizerConfig()
    for config in (released, default):
        assert (config.sampling_rate, config.number_channels, config.downsample_rate) == (48000, 2, 3840)
        assert (config.num_quantizers, config.codebook_size, config.frame_rate) == (16, 1024, 12.5)
        assert config.model_type == "moss-audio-tokenizer"
    assert released.encoder_kwargs == default.encoder_kwargs
    assert released.decoder_kwargs == default.decoder_kwargs


def test_config_aliases_and_reversed_decoder_rule():
    config = configuration.MossAudioTokenizerConfig(sample_rate=24000, channels_numbers=1, attention_backend="eager",
                                                    codec_compute_dtype="bf16")
    assert (config.sampling_rate, config.number_channels) == (24000, 1)
    assert (config.attention_implementation, config.compute_dtype) == ("eager", "bf16")
    # Without decoder_kwargs the decoder mirrors reversed_decoder_kwargs; with both, decoder_kwargs wins.
    released = released_config_dict()
    derived = configuration.MossAudioTokenizerConfig(reversed_decoder_kwargs=released["encoder_kwargs"])
    assert derived.decoder_kwargs == released["decoder_kwargs"]
    tiny = tiny_config_dict()
    kept = configuration.MossAudioTokenizerConfig(decoder_kwargs=tiny["decoder_kwargs"],
                                                  reversed_decoder_kwargs=released["encoder_kwargs"])
    assert kept.decoder_kwargs == tiny["decoder_kwargs"]


@pytest.mark.parametrize("kwargs", [{"compute_dtype": "int8"}, {"quantizer_type": "rvq"},
                                    {"sample_rate": 24000, "sampling_rate": 48000}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        configuration.MossAudioTokenizerConfig(**kwargs)


def test_released_config_builds_the_374_upstream_tensors():
    lines = shared_path("spec", "codec_state_dict.txt").read_text().splitlines()
    manifest = [line.split(" ", 1) for line in lines]
    with torch.device("meta"):
        model = modeling.MossAudioTokenizerModel(configuration.MossAudioTokenizerConfig(**released_config_dict()))
    ours = [(name, str(list(tensor.shape)).replace(" ", "")) for name, tensor in model.state_dict().items()]
    expected = [(name, shape.replace(" ", "")) for name, shape in manifest]
    assert len(ours) == 374
    assert ours == expected  # same names, shapes and order
    contexts = [m.context for m in model.modules() if isinstance(m, modeling.ProjectedTransformer)]
    assert contexts == [1600, 1200, 800, 500, 500, 800, 1200, 1600]


# -- loading -------------------------------------------------------------------------------------------------------
def _legacy_names(state_dict):
    return {name.replace("parametrizations.weight.original0", "weight_g")
            .replace("parametrizations.weight.original1", "weight_v"): tensor for name, tensor in state_dict.items()}


@pytest.mark.parametrize("spelling", ["parametrizations", "weight_g_weight_v"])
def test_checkpoint_with_either_weight_norm_spelling_loads_without_missing_keys(tmp_path, spelling):
    source = tiny_model(seed=3)
    state = {name: tensor.contiguous() for name, tensor in source.state_dict().items()}
    if spelling != "parametrizations":
        state = _legacy_names(state)
        assert any(name.endswith("weight_g") for name in state)
    source.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded, info = modeling.MossAudioTokenizerModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    fresh = modeling.MossAudioTokenizerModel(source.config)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_auto_model_loads_folder_with_auto_map_and_remote_code(tmp_path):
    source = tiny_model(seed=4)
    config = dict(tiny_config_dict(), auto_map=released_config_dict()["auto_map"])
    codec_dir = tmp_path / weights.CODEC_SUBFOLDER
    codec_dir.mkdir()
    (codec_dir / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(codec_dir / "model.safetensors"))
    # The same code installation --download-only does: the auto_map modules and what they import relatively.
    assert weights.install_codec_code(tmp_path, REPO_ROOT)
    model = AutoModel.from_pretrained(str(codec_dir), trust_remote_code=True).eval()
    assert type(model).__name__ == "MossAudioTokenizerModel"
    audio = torch.randn(1, 2, 2 * HOP)
    assert torch.equal(model.encode(audio).audio_codes, source.encode(audio).audio_codes)


# -- attention windows ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("length, context", [(5, 8), (37, 8), (64, 5), (101, 16)])
def test_windowed_attention_equals_dense_sliding_window_mask(backend, length, context):
    torch.manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, 8) for _ in range(3))
    pos = torch.arange(length)
    dense = modeling.eager_attention(None, q, k, v, modeling.window_mask(pos, pos, context), 8**-0.5)
    kernel = modeling.CODEC_ATTENTION_FUNCTIONS[backend]
    windowed = modeling.windowed_attention(None, q, k, v, context, kernel)
    torch.testing.assert_close(windowed, dense, atol=1e-5, rtol=1e-5)


def test_window_size_matters_for_decoding():
    model = tiny_model(seed=5)
    codes = torch.randint(0, 64, (4, 1, 12))
    reference = model.decode(codes).audio
    model.decoder[7].transformer.layers[0].self_attn.context += 1
    assert (model.decode(codes).audio - reference).abs().max() > 1e-3


# -- streaming -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames_per_step, call_sizes", [(1, [1]), (3, [3]), (4, [1, 4, 2, 7, 3])])
def test_decode_session_matches_offline_for_a_clip_longer_than_every_window(frames_per_step, call_sizes):
    model = tiny_model(seed=6)
    codes = torch.randint(0, 64, (4, 2, 17))  # 17 frames = 68 tokens at 50 Hz, 544 at 400 Hz >> windows (<= 8)
    offline = model.decode(codes).audio
    session = model.decode_session(batch_size=2, max_frames_per_step=frames_per_step)
    ring_shapes = [tuple(c.k.shape) for _, s in session._stream.stages if s is not None for c in s.caches]
    pieces, start, index = [], 0, 0
    while start < codes.shape[-1]:
        size = call_sizes[index % len(call_sizes)]
        pieces.append(session.step(codes[:, :, start : start + size]))
        start, index = start + size, index + 1
    streamed = torch.cat(pieces, dim=-1)
    assert (streamed - offline).abs().max().item() <= 1e-5
    assert [tuple(c.k.shape) for _, s in session._stream.stages if s is not None for c in s.caches] == ring_shapes
    assert session.frames_decoded.tolist() == [17, 17]


def test_decode_session_ragged_rows_and_reset():
    model = tiny_model(seed=7)
    codes = torch.randint(0, 64, (4, 2, 10))
    offline = model.decode(codes).audio
    session = model.decode_session(batch_size=2, max_frames_per_step=4)
    first = session.step(codes[:, :, :4], num_frames=torch.tensor([4, 1]))
    batch = torch.stack([codes[:, 0, 4:8], codes[:, 1, 1:5]], dim=1)
    second = session.step(batch, num_frames=torch.tensor([4, 4]))
    assert (first[0] - offline[0, :, : 4 * HOP]).abs().max() <= 1e-5
    assert (first[1, :, :HOP] - offline[1, :, :HOP]).abs().max() <= 1e-5
    assert first[1, :, HOP:].abs().max() == 0
    assert (second[0] - offline[0, :, 4 * HOP : 8 * HOP]).abs().max() <= 1e-5
    assert (second[1] - offline[1, :, HOP : 5 * HOP]).abs().max() <= 1e-5
    session.reset(rows=[1])
    with pytest.raises(ValueError, match=r"rows=\[2\]; expected indices in \[0, 2\)"):
        session.reset(rows=[2])
    again = session.step(codes[:, :, :1], num_frames=torch.tensor([0, 1]))
    assert (again[1] - offline[1, :, :HOP]).abs().max() <= 1e-5
    assert session.frames_decoded.tolist() == [8, 1]


def test_streaming_attends_only_the_written_ring_prefix_until_it_wraps():
    """A 120-token window (ring of 183 slots at 2 frames per step): the attended prefix grows by whole granules of
    64 slots with the tokens written, then stays at the capacity; a row reset mid-stream keeps the others' prefix,
    and audio equals offline decoding throughout."""
    model = tiny_model(seed=11, durations=(0.3, 0.04, 0.06, 0.08))
    codes = torch.randint(0, 64, (4, 2, 9), generator=torch.Generator().manual_seed(3))
    offline = model.decode(codes).audio
    session = model.decode_session(batch_size=2, max_frames_per_step=2)
    last = [state for _, state in session._stream.stages if state is not None][-1]
    assert (last.context, last.capacity) == (120, 183)
    filled = []
    begin_step = last.begin_step
    last.begin_step = _recording(begin_step, filled)
    for frame in range(7):
        audio = session.step(codes[:, :, frame : frame + 1])
        assert (audio - offline[:, :, frame * HOP : (frame + 1) * HOP]).abs().max() <= 1e-5
    assert filled == [64, 64, 128, 128, 183, 183, 183]
    session.reset(rows=[1])
    audio = session.step(torch.stack([codes[:, 0, 7:8], codes[:, 1, 0:1]], dim=1))
    assert (audio[0] - offline[0, :, 7 * HOP : 8 * HOP]).abs().max() <= 1e-5
    assert (audio[1] - offline[1, :, :HOP]).abs().max() <= 1e-5
    assert filled[-1] == 183
    session.reset()
    session.step(codes[:, :, :2])
    assert filled[-1] == 64


def _last_stage_recording(session):
    last = [state for _, state in session._stream.stages if state is not None][-1]
    filled = []
    last.begin_step = _recording(last.begin_step, filled)
    return filled


def test_rows_with_fewer_frames_widen_the_prefix_only_by_what_they_write():
    """With the frame counts on the host (a CPU num_frames), a row with no frames rewrites only its first 32 slots
    each step, so the other row's prefix follows its own stream; audio equals offline decoding."""
    model = tiny_model(seed=12, durations=(0.3, 0.04, 0.06, 0.08))
    codes = torch.randint(0, 64, (4, 2, 6), generator=torch.Generator().manual_seed(4))
    offline = model.decode(codes).audio
    session = model.decode_session(batch_size=2, max_frames_per_step=2)
    filled = _last_stage_recording(session)
    for frame in range(6):
        batch = torch.stack([codes[:, 0, frame : frame + 1], codes[:, 1, :1]], dim=1)
        audio = session.step(batch, torch.tensor([1, 1 if frame == 0 else 0]))
        assert (audio[0] - offline[0, :, frame * HOP : (frame + 1) * HOP]).abs().max() <= 1e-5
    assert filled == [64, 64, 128, 128, 183, 183]
    session.reset(rows=[0])
    session.step(codes[:, :, :1], torch.tensor([1, 0]))
    assert filled[-1] == 64  # row 1 wrote only its first frame's slots, plus idle rewrites of them


def test_without_host_frame_counts_each_row_is_bounded_by_the_whole_step():
    """A device num_frames cannot be read without a sync: every stepped row then counts the whole step."""
    stage = modeling.ProjectedTransformer(tiny_config_dict(durations=(0.3, 0.04, 0.06, 0.08))["decoder_kwargs"][7],
                                          context=120)
    state = codec_streaming.StageState(stage, 2, 32, 2, "cpu")
    still = torch.tensor([0, 0])  # neither row advances: each rewrites its first 32 slots
    unknown = [state.begin_step(32, still, 2, None).filled for _ in range(3)]
    state.reset(rows=[0])
    unknown.append(state.begin_step(32, still, 2, None).filled)  # row 1 keeps its bound of 3 whole steps
    state.reset()
    known = [state.begin_step(32, still, 2, [0, 0]).filled for _ in range(4)]
    assert (unknown, known) == ([64, 64, 128, 128], [64, 64, 64, 64])


def test_a_stream_outliving_a_finalized_one_attends_its_own_prefix():
    """batch_decode(streaming=True): a finalized stream's slot is forgotten, so the stream beside it (in a higher
    slot) attends the ring prefix of its own history, not the finished one's."""
    model = tiny_model(seed=13, durations=(0.3, 0.04, 0.06, 0.08))
    codes = torch.randint(0, 64, (4, 2, 8), generator=torch.Generator().manual_seed(5))
    offline = model.decode(codes).audio
    model.batch_decode([codes[:, 0, :6]], streaming=True, max_batch_size=2, reset_stream=True)
    filled = _last_stage_recording(model._batch_streams.session)
    first = model.batch_decode([codes[:, 0, 6:7], codes[:, 1, :1]], streaming=True, finalize_indices=[0])
    second = model.batch_decode([codes[:, 1, 1:2]], streaming=True)  # former row 1 is now row 0, in slot 1
    assert filled == [256, 64]  # 7 frames of 32 tokens in a ring of 375 slots; then 2 frames
    assert (first.audio[1] - offline[1, :, :HOP]).abs().max() <= 1e-5
    assert (second.audio[0] - offline[1, :, HOP : 2 * HOP]).abs().max() <= 1e-5
    model._reset_batch_decode_streaming_state()


def _recording(begin_step, filled):
    def record(*args):
        step = begin_step(*args)
        filled.append(step.filled)
        return step
    return record


def test_streaming_batch_decode_appends_and_finalizes_rows():
    model = tiny_model(seed=8)
    codes = torch.randint(0, 64, (4, 2, 6))
    offline = model.decode(codes).audio
    first = model.batch_decode([codes[:, 0, :2]], streaming=True, max_batch_size=2, reset_stream=True)
    second = model.batch_decode([codes[:, 0, 2:3], codes[:, 1, :3]], streaming=True, finalize_indices=[0])
    third = model.batch_decode([codes[:, 1, 3:6]], streaming=True)  # former row 1 is now row 0
    assert second.audio_lengths.tolist() == [HOP, 3 * HOP]
    assert (first.audio[0] - offline[0, :, : 2 * HOP]).abs().max() <= 1e-5
    assert (second.audio[0, :, :HOP] - offline[0, :, 2 * HOP : 3 * HOP]).abs().max() <= 1e-5
    assert (second.audio[1] - offline[1, :, : 3 * HOP]).abs().max() <= 1e-5
    assert (third.audio[0] - offline[1, :, 3 * HOP :]).abs().max() <= 1e-5
    with pytest.raises(ValueError):
        model.batch_decode([codes[:, 0, :1]] * 3, streaming=True)  # 3 rows > max_batch_size 2
    model._reset_batch_decode_streaming_state()


# -- lengths, codebooks, dtypes ------------------------------------------------------------------------------------
def test_encode_of_a_non_multiple_length_has_ceil_frames_and_floor_length():
    model = tiny_model(seed=9)
    audio = torch.randn(2, 5 * HOP + 100)
    out = model.encode(audio)
    assert out.audio_codes.shape == (4, 1, 6) and out.audio_codes.dtype == torch.long
    assert out.audio_codes_lengths.tolist() == [5]
    assert out.encoder_hidden_states.shape == (1, 48, 6)
    codes, lengths = model.encode(audio, return_dict=False)
    assert torch.equal(codes, out.audio_codes) and torch.equal(lengths, out.audio_codes_lengths)
    assert model.decode(out.audio_codes).audio.shape == (1, 2, 6 * HOP)


def test_decode_with_fewer_codebooks_uses_the_first_ones():
    model = tiny_model(seed=10)
    codes = torch.randint(0, 64, (4, 1, 5))
    prefix = model.decode(codes[:2]).audio
    assert torch.equal(prefix, model.decode(codes, num_quantizers=2).audio)
    assert torch.equal(prefix, model.batch_decode([codes[:, 0]], num_quantizers=2).audio)
    assert (prefix - model.decode(codes).audio).abs().max() > 1e-4
    session = model.decode_session(1)
    assert (session.step(codes[:2]) - prefix).abs().max() <= 1e-5


def test_bf16_cast_keeps_the_quantizer_fp32_and_still_decodes():
    model = tiny_model(seed=11)
    codes = torch.randint(0, 64, (4, 1, 6))
    reference = model.decode(codes).audio
    audio = torch.randn(1, 2, 3 * HOP)
    reference_codes = model.encode(audio).audio_codes
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.quantizer.parameters())
    assert model.decoder[1].input_proj.weight.dtype == torch.bfloat16
    decoded = model.decode(codes).audio
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()
    assert (decoded - reference).abs().max() < 0.1 * reference.abs().max()
    streamed = model.decode_session(1).step(codes)
    assert torch.isfinite(streamed).all()
    assert model.encode(audio).audio_codes.shape == reference_codes.shape
    model.set_compute_dtype("fp32")
    torch.testing.assert_close(model.decode(codes).audio, reference, atol=0.1, rtol=0)


def test_user_mistakes_raise_value_errors():
    model = tiny_model(seed=12)
    with pytest.raises(ValueError, match="input_values"):
        model.encode(torch.randn(3, HOP))
    with pytest.raises(ValueError, match="num_quantizers"):
        model.decode(torch.zeros(4, 1, 2, dtype=torch.long), num_quantizers=9)
    with pytest.raises(ValueError, match="outside"):
        model.batch_decode([torch.full((4, 2), 64)])
    with pytest.raises(ValueError, match="chunk_duration"):
        model.decode(torch.zeros(4, 1, 2, dtype=torch.long), chunk_duration=0.1)
    with pytest.raises(ValueError, match="attention"):
        model.set_attention_implementation("paged")
    with pytest.raises(ValueError, match="compute_dtype"):
        model.set_compute_dtype("int8")
