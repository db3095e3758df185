"""The inference pipeline (synthesis.py) on a tiny model repository: files, lengths, streaming, chunking, errors."""

import io
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import import_module, shared_path
from tiny_repository import HOP, SAMPLE_RATE, tiny_codec_config_dict, write_tiny_repository

synthesis = import_module("synthesis")
GenerationSettings = import_module("generation").GenerationSettings
synthesis_offline = import_module("synthesis_offline")
synthesis_request = import_module("synthesis_request")
modeling = import_module("modeling_moss_tts_nano")
text_chunking = import_module("text_chunking")
checkpoints = import_module("measurement.checkpoints")
weight_formats = import_module("weight_formats")

UPSTREAM_RESULT_KEYS = {
    "audio_path", "sample_rate", "audio_token_ids", "waveform", "reference_audio_token_ids",
    "voice_clone_text_chunks", "voice_clone_chunk_batch_size", "voice_clone_codec_batch_size",
}
TWO_CHUNKS = "Hello world. This is a test."
GREEDY = dict(do_sample=False, max_new_frames=2, progress=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tokenizer = shared_path("assets", "tokenizer.model")
    return write_tiny_repository(tmp_path_factory.mktemp("tiny_repo"), tokenizer)


@pytest.fixture(scope="module")
def model(repo):
    return modeling.MossTTSNanoForCausalLM.from_pretrained(str(repo)).eval()


def _prompt_frames(path):
    """Codec frames of a prompt: floor(samples at 48 kHz / 3840) (the codec's floor length, spec §11 item 9)."""
    info = sf.info(str(path))
    return int(round(info.frames * SAMPLE_RATE / info.samplerate)) // HOP


def _pauses(chunks):
    return sum(text_chunking.pause_samples(chunk, SAMPLE_RATE) for chunk in chunks[:-1])


def _assert_wav(path, samples):
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 2, samples)


def _leftovers(folder):
    return sorted(name for name in os.listdir(folder))


# ---------------------------------------------------------------------------------------------------------------
# Offline inference


def test_voice_clone_writes_48k_stereo_of_frames_times_hop_plus_pauses(model, prompt_wav, tmp_path):
    model.train()
    out = tmp_path / "vc.wav"
    result = model.inference(TWO_CHUNKS, str(out), mode="voice_clone", prompt_audio_path=str(prompt_wav),
                             voice_clone_max_text_tokens=5, **GREEDY)
    assert set(result) == UPSTREAM_RESULT_KEYS
    chunks = result["voice_clone_text_chunks"]
    assert chunks == ["Hello world.", "This is a test."]
    assert result["audio_token_ids"].shape == (2 * 2, 16)
    assert result["reference_audio_token_ids"].shape == (_prompt_frames(prompt_wav), 16)
    assert (result["voice_clone_chunk_batch_size"], result["voice_clone_codec_batch_size"]) == (1, 1)
    expected = 2 * 2 * HOP + _pauses(chunks)
    assert result["waveform"].shape == (2, expected) and result["waveform"].dtype == torch.float32
    _assert_wav(out, expected)
    assert result["audio_path"] == str(out) and result["sample_rate"] == SAMPLE_RATE
    assert model.training  # train mode restored, as upstream
    model.eval()


def test_continuation_text_only_writes_frames_times_hop(model, tmp_path):
    out = tmp_path / "c.wav"
    result = model.inference("Hello world.", str(out), **GREEDY)
    assert result["voice_clone_text_chunks"] == ["Hello world."]
    assert result["reference_audio_token_ids"] is None
    _assert_wav(out, 2 * HOP)


def test_continuation_with_prompt_strips_the_prompt_audio(model, prompt_wav, tmp_path):
    out = tmp_path / "cp.wav"
    result = model.inference("again.", str(out), prompt_text="Hello", prompt_audio_path=str(prompt_wav), **GREEDY)
    _assert_wav(out, 2 * HOP)
    assert result["audio_token_ids"].shape == (2, 16)


def test_golden_chunking_gives_the_golden_chunks_and_pauses(model, prompt_wav, golden_tts_dir):
    cases = json.loads((golden_tts_dir / "cases.json").read_text())["text_chunking"]["cases"]
    case = next(c for c in cases if c["name"] == "long_english" and c["max_tokens"] == 50)
    result = model.inference(case["text"], None, mode="voice_clone", prompt_audio_path=str(prompt_wav),
                             voice_clone_max_text_tokens=50, do_sample=False, max_new_frames=1, progress=False)
    assert result["voice_clone_text_chunks"] == case["chunks"]
    assert result["waveform"].shape[-1] == len(case["chunks"]) * HOP + _pauses(case["chunks"])


def test_nq_limits_the_generated_and_prompt_channels(model, prompt_wav):
    result = model.inference("Hi.", None, mode="voice_clone", prompt_audio_path=str(prompt_wav), nq=4, **GREEDY)
    assert (result["audio_token_ids"][:, 4:] == 1024).all() and (result["audio_token_ids"][:, :4] < 1024).all()
    assert (result["reference_audio_token_ids"][:, 4:] == 1024).all()


# ---------------------------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("mode", ["voice_clone", "continuation"])
def test_stream_concatenates_to_the_offline_waveform(model, prompt_wav, tmp_path, mode):
    kwargs = dict(mode=mode, prompt_audio_path=str(prompt_wav), do_sample=False, max_new_frames=3, progress=False)
    if mode == "continuation":
        kwargs["prompt_text"] = "Hello"
    text = TWO_CHUNKS if mode == "voice_clone" else "again."
    offline = model.inference(text, None, voice_clone_max_text_tokens=5, **kwargs)
    out = tmp_path / "stream.wav"
    events = list(model.inference_stream(text, str(out), voice_clone_max_text_tokens=5, **kwargs))
    audio, final = events[:-1], events[-1]
    assert all(e["type"] == "audio" for e in audio) and final["type"] == "result"
    assert set(final) - {"type"} == UPSTREAM_RESULT_KEYS
    assert audio[0]["waveform"].shape[-1] == HOP and not audio[0]["is_pause"]  # first audio after one frame
    streamed = torch.cat([e["waveform"] for e in audio], dim=-1)
    torch.testing.assert_close(streamed, offline["waveform"], atol=1e-4, rtol=1e-5)
    assert torch.equal(final["audio_token_ids"], offline["audio_token_ids"])
    assert [e["chunk_index"] for e in audio] == sorted(e["chunk_index"] for e in audio)
    assert sum(e["is_pause"] for e in audio) == len(offline["voice_clone_text_chunks"]) - 1
    assert audio[-1]["emitted_audio_seconds"] == pytest.approx(streamed.shape[-1] / SAMPLE_RATE)
    _assert_wav(out, streamed.shape[-1])
    assert _leftovers(tmp_path) == ["stream.wav"]


def test_chunks_stream_in_order_one_after_another_and_match_offline(model, prompt_wav, monkeypatch):
    monkeypatch.setattr(synthesis_offline, "chunk_batch_size", lambda device, chunks, gb: 3)  # as if memory allowed 3
    text = "Hello world. This is a test. One more sentence here. And the last one."
    kwargs = dict(mode="voice_clone", prompt_audio_path=str(prompt_wav), voice_clone_max_text_tokens=5,
                  do_sample=False, max_new_frames=2, progress=False)
    offline = model.inference(text, None, **kwargs)
    assert offline["voice_clone_chunk_batch_size"] == 3 and len(offline["voice_clone_text_chunks"]) == 5
    events = list(model.inference_stream(text, None, **kwargs))
    assert events[-1]["voice_clone_chunk_batch_size"] == 1  # a stream's chunks run one after another in its slot
    audio = events[:-1]
    assert [e["chunk_index"] for e in audio if e["is_pause"]] == [0, 1, 2, 3]
    streamed = torch.cat([e["waveform"] for e in audio], dim=-1)
    torch.testing.assert_close(streamed, offline["waveform"], atol=1e-4, rtol=1e-5)


def test_stream_failure_leaves_no_partial_file(model, prompt_wav, tmp_path, monkeypatch):
    generation = import_module("generation")
    frame, calls = generation.SlotDecoder.frame, []

    def failing_frame(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated device failure")
        return frame(self)

    monkeypatch.setattr(generation.SlotDecoder, "frame", failing_frame)
    with pytest.raises(RuntimeError, match="simulated") as caught:
        for _ in model.inference_stream("Hi.", str(tmp_path / "x.wav"), mode="voice_clone",
                                        prompt_audio_path=str(prompt_wav), **dict(GREEDY, max_new_frames=5)):
            pass
    assert caught.value.code == "decode_step_failed"  # the engine's stable error code (engine.ERROR_CODES)
    assert _leftovers(tmp_path) == []


def test_stream_budget_policy_follows_the_upstream_lead_table():
    policy = synthesis.UPSTREAM_STREAM_POLICY
    assert policy.frame_budget(5.0, emitted_any=False) == 1
    assert [policy.frame_budget(lead, True) for lead in (-1.0, 0.1, 0.3, 0.9, 1.5)] == [1, 1, 2, 4, 8]
    cuda = synthesis.UPSTREAM_CUDA_STREAM_POLICY
    assert [cuda.frame_budget(lead, True) for lead in (0.1, 0.3, 0.9, 1.5)] == [4, 6, 8, 12]
    assert policy.should_decode(True, 1, 8, 2.0)  # first audio pending
    assert policy.should_decode(False, 1, 8, 0.3)  # frames pending, lead < 0.45
    assert not policy.should_decode(False, 1, 8, 0.6)
    assert policy.should_decode(False, 8, 8, 2.0)  # a full budget
    assert policy.should_decode(False, 1, 8, -0.1)  # starving
    assert synthesis.stream_lead_seconds(2.0, 10.0, 11.5) == pytest.approx(0.5)
    assert synthesis.stream_lead_seconds(2.0, None, 11.5) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Batching, stability fallback, codec objects, tokenizer


def test_batch_sizes_follow_the_upstream_rules(monkeypatch):
    def request(**kwargs):
        return synthesis.build_request(**_arguments(**kwargs))

    assert synthesis.resolve_batch_sizes(torch.device("cpu"), 5, request(), streaming=False) == (1, 1)
    monkeypatch.setattr(synthesis_offline, "chunk_batch_size", lambda device, chunks, gb: 6)
    assert synthesis.resolve_batch_sizes("cpu", 9, request(), streaming=False) == (6, 1)
    assert synthesis.resolve_batch_sizes("cpu", 9, request(tts_max_batch_size=4), streaming=False) == (4, 1)
    assert synthesis.resolve_batch_sizes("cpu", 9, request(codec_max_batch_size=2), streaming=False) == (6, 2)
    assert synthesis.resolve_batch_sizes("cpu", 9, request(codec_max_batch_size=3), streaming=True) == (3, 3)
    assert synthesis.resolve_batch_sizes("cpu", 9, request(), streaming=True) == (6, 6)


def test_each_request_of_a_many_request_run_keeps_its_own_generation_settings(model, monkeypatch):
    """iter_inference_many (infer_npu.py --jsonl) batches only chunks of requests with equal settings."""
    monkeypatch.setattr(synthesis_offline, "chunk_batch_size", lambda device, chunks, gb: 8)  # as if memory allowed 8
    frames = [2, 3, 3, 1]  # the tiny TTS never stops, so each request makes exactly its max_new_frames
    requests = [synthesis.build_request(**_arguments(text="Hello world.", max_new_frames=count)) for count in frames]
    refs = [(index, 0) for index in range(4)]
    assert synthesis_offline.batches_of_equal_settings(requests, refs, 8) == [refs[:1], refs[1:3], refs[3:]]
    assert synthesis_offline.batches_of_equal_settings(requests, refs, 1) == [[ref] for ref in refs]
    results = list(synthesis.iter_inference_many(model, requests))
    assert [result["audio_token_ids"].shape[0] for result in results] == frames
    assert [result["waveform"].shape[-1] for result in results] == [count * HOP for count in frames]


def _arguments(**overrides):
    arguments = dict(
        text="Hi.", output_audio_path=None, mode="continuation", prompt_text=None, prompt_audio_path=None,
        reference_audio_path=None, text_tokenizer=None, text_tokenizer_path=None, audio_tokenizer=None,
        audio_tokenizer_type=None, audio_tokenizer_pretrained_name_or_path=None, device=None, nq=None,
        max_new_frames=2, do_sample=False, text_temperature=1.5, text_top_p=1.0, text_top_k=50,
        audio_temperature=1.7, audio_top_p=0.8, audio_top_k=25, audio_repetition_penalty=1.0, use_kv_cache=True,
        voice_clone_max_text_tokens=50, voice_clone_max_memory_per_sample_gb=1.0, tts_max_batch_size=0,
        codec_max_batch_size=0, progress=False,
    )
    arguments.update(overrides)
    return arguments


def test_stability_error_retries_once_in_float32_then_restores_the_dtype(model, caplog):
    class Unstable(type(model)):
        calls = []

        def generate(self, *args, **kwargs):
            self.calls.append((self.dtype, kwargs.get("attn_implementation")))
            if self.dtype != torch.float32:
                raise RuntimeError("Non-finite logits during generation (inf or nan)")
            return super().generate(*args, **kwargs)

    unstable = Unstable.from_pretrained(str(model.config._name_or_path)).to(torch.bfloat16).eval()
    requested = (unstable.config.attn_implementation, unstable.config.local_attn_implementation)
    with caplog.at_level(logging.WARNING, logger=synthesis_offline.__name__):
        result = unstable.inference("Hello world.", None, **GREEDY)
    assert result["waveform"].shape[-1] == 2 * HOP
    assert Unstable.calls == [(torch.bfloat16, None), (torch.float32, "sdpa")]
    assert unstable.dtype == torch.bfloat16  # restored
    assert (unstable.config.attn_implementation, unstable.config.local_attn_implementation) == requested
    message = next(r.getMessage() for r in caplog.records if "Retrying" in r.getMessage())
    assert "float32" in message and "bfloat16" in message and "'sdpa'" in message


def _fails_once(monkeypatch, model):
    """Make model.generate raise a stability error on its first call; returns the model dtype of every call."""
    generate, dtypes = model.generate, []

    def flaky(*args, **kwargs):
        dtypes.append(model.dtype)
        if len(dtypes) == 1:
            raise RuntimeError("Non-finite logits during generation (inf or nan)")
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", flaky)
    return dtypes


def _converted_tiny_model(weight_format):
    return weight_formats.apply_weight_format(checkpoints.random_tiny_model(seed=9), weight_format)


@pytest.mark.parametrize("weight_format, plain_bf16", [("fp32", False), ("fp16", False), ("bf16", True),
                                                       ("bf16", False)])
def test_float32_retry_works_for_weight_formats_that_cast(monkeypatch, weight_format, plain_bf16):
    if plain_bf16:  # what every CPU without oneDNN packing (and every accelerator) gets
        monkeypatch.setattr(weight_formats, "onednn_packing_available", lambda: False)
    converted = _converted_tiny_model(weight_format)
    if weight_formats.dtype_change_unavailable_reason(converted) is not None:
        pytest.skip("oneDNN packs bf16 on this CPU: covered by the refusal test")
    dtype = converted.dtype
    dtypes = _fails_once(monkeypatch, converted)
    ids = torch.randint(10, 1000, (1, 6, 17))
    codes = synthesis.generate_codes(converted, ids, torch.ones(1, 6, dtype=torch.bool), dict(max_new_frames=2))
    assert dtypes == [dtype, torch.float32] and converted.dtype == dtype
    assert codes[0].shape[1] == 16 and converted.generate(ids, max_new_frames=1).audio_token_ids.shape[2] == 16


@pytest.mark.parametrize("weight_format", [
    pytest.param("int8", marks=pytest.mark.skipif(not weight_formats.int8_kernels_available(), reason="no int8")),
    pytest.param("bf16", marks=pytest.mark.skipif(not weight_formats.onednn_packing_available(),
                                                  reason="oneDNN packing does not run here: bf16 casts instead")),
])
def test_float32_retry_is_refused_clearly_for_converted_weight_formats(monkeypatch, weight_format):
    converted = _converted_tiny_model(weight_format)
    dtypes = _fails_once(monkeypatch, converted)
    ids = torch.randint(10, 1000, (1, 6, 17))
    with pytest.raises(RuntimeError, match=f"float32 retry cannot run: its weight format '{weight_format}'") as caught:
        synthesis.generate_codes(converted, ids, torch.ones(1, 6, dtype=torch.bool), dict(max_new_frames=2))
    assert "Non-finite logits" in str(caught.value) and "without a weight format (fp32)" in str(caught.value)
    assert len(dtypes) == 1


def test_other_generation_errors_are_not_retried(model):
    class Broken(type(model)):
        def generate(self, *args, **kwargs):
            raise RuntimeError("something unrelated")

    broken = Broken.from_pretrained(str(model.config._name_or_path)).eval()
    with pytest.raises(RuntimeError, match="unrelated"):
        broken.inference("Hello world.", None, **GREEDY)


class DuckCodec:
    """Not our class: only the upstream codec API (batch_encode / batch_decode / streaming reset) and attributes."""

    def __init__(self, inner):
        self.inner = inner
        self.sampling_rate, self.number_channels, self.downsample_rate = 48000, 2, 3840
        self.calls = []

    def eval(self):
        return self

    def batch_encode(self, wav_list, chunk_duration=None):
        self.calls.append("encode")
        return self.inner.batch_encode(wav_list, chunk_duration=chunk_duration)

    def batch_decode(self, codes_list, num_quantizers=None, chunk_duration=None, **streaming):
        self.calls.append("stream" if streaming.get("streaming") else "decode")
        return self.inner.batch_decode(codes_list, num_quantizers=num_quantizers, **streaming)

    def _reset_batch_decode_streaming_state(self):
        self.calls.append("reset")
        self.inner._reset_batch_decode_streaming_state()


def test_any_object_with_the_upstream_codec_api_works(model, prompt_wav, repo):
    codec_module = import_module("modeling_moss_audio_tokenizer")
    duck = DuckCodec(codec_module.MossAudioTokenizerModel.from_pretrained(str(repo / "audio_tokenizer")).eval())
    kwargs = dict(mode="voice_clone", prompt_audio_path=str(prompt_wav), **GREEDY)
    default = model.inference("Hi there.", None, **kwargs)
    ducked = model.inference("Hi there.", None, audio_tokenizer=duck, **kwargs)
    torch.testing.assert_close(ducked["waveform"], default["waveform"])
    events = list(model.inference_stream("Hi there.", None, audio_tokenizer=duck, **kwargs))
    torch.testing.assert_close(events[-1]["waveform"], default["waveform"], atol=1e-4, rtol=1e-5)
    assert duck.calls[:3] == ["encode", "decode", "encode"] and "stream" in duck.calls and duck.calls[-1] == "reset"


def test_the_codec_loaded_from_the_model_folder_takes_this_cpus_layout_once(repo, caplog):
    fresh = modeling.MossTTSNanoForCausalLM.from_pretrained(str(repo)).eval()
    with caplog.at_level(logging.INFO, logger=synthesis.load_audio_tokenizer.__module__):
        codec = synthesis.load_audio_tokenizer(fresh, device="cpu")
        assert synthesis.load_audio_tokenizer(fresh, device="cpu") is codec
    (line,) = [record.getMessage() for record in caplog.records if record.getMessage().startswith("codec from")]
    layout, why = weight_formats.codec_weight_layout()
    assert line.endswith(f"{layout} Linear weights ({why})"), line
    linears = [module for module in codec.decoder.modules() if isinstance(module, torch.nn.Linear)]
    assert {linear.weight.stride()[0] == 1 for linear in linears} == {layout == "k-major"}


def test_tokenizer_loads_from_folder_or_file_without_touching_hf_modules_cache(model, repo, tokenizer_model_path):
    before = os.environ.get("HF_MODULES_CACHE")
    from_folder = model._load_text_tokenizer()
    from_file = model._load_text_tokenizer(text_tokenizer_path=str(tokenizer_model_path))
    assert from_folder.encode("Hello world.", add_special_tokens=False) == [7026, 1177, 10380]
    assert from_file.encode("Hello world.", add_special_tokens=False) == [7026, 1177, 10380]
    assert model._load_text_tokenizer() is from_folder  # cached per path
    assert os.environ.get("HF_MODULES_CACHE") == before
    with pytest.raises(ValueError, match="no text tokenizer"):
        model._load_text_tokenizer(text_tokenizer_path=str(repo / "missing"))


def test_tiny_codec_config_has_the_golden_shape(golden_codec_dir):
    golden = json.loads((golden_codec_dir / "config.json").read_text())
    ours = tiny_codec_config_dict()
    for key in ("encoder_kwargs", "decoder_kwargs", "quantizer_kwargs", "downsample_rate", "code_dim"):
        assert ours[key] == golden[key], key


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear ValueError and no output file


def _write_noise(path, seconds, amplitude=0.3):
    rng = np.random.default_rng(0)
    sf.write(str(path), (amplitude * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
    return path


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("empty", "empty"),
    ("silent", "silent"),
    ("garbage", "could not read"),
    ("too_short", "shorter than one codec frame"),
    ("folder", "not a file"),
])
def test_bad_prompt_files_raise_clear_errors_and_write_nothing(model, tmp_path, case, match):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    prompt = inputs / f"{case}.wav"
    if case == "empty":
        prompt.write_bytes(b"")
    elif case == "silent":
        sf.write(str(prompt), np.zeros(16000, dtype=np.float32), 16000)
    elif case == "garbage":
        prompt.write_bytes(os.urandom(4096))
    elif case == "too_short":
        _write_noise(prompt, 0.05)
    elif case == "folder":
        prompt.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=match):
        model.inference("Hello.", str(out / "x.wav"), mode="voice_clone", prompt_audio_path=str(prompt), **GREEDY)
    assert _leftovers(out) == []


@pytest.mark.parametrize("overrides, match", [
    (dict(text=""), "empty"),
    (dict(text="   \n "), "empty"),
    (dict(mode="sing"), "mode="),
    (dict(mode="voice_clone"), "needs prompt_audio_path"),
    (dict(prompt_text="Hello"), "together"),
    (dict(device="tpu"), "unknown device"),
    (dict(nq=17), "nq=17"),
    (dict(output_audio_path="out.mp4"), "must end in"),
    (dict(audio_tokenizer_type="encodec"), "audio_tokenizer_type"),
    (dict(audio_tokenizer_pretrained_name_or_path="someone/other-codec"), "not a local folder"),
    (dict(text="word " * 20000), "continuation mode"),  # 100,000 characters
])
def test_bad_arguments_raise_clear_value_errors(model, tmp_path, overrides, match):
    kwargs = dict(text="Hello.", output_audio_path=str(tmp_path / "x.wav"), **GREEDY)
    kwargs.update(overrides)
    if kwargs["output_audio_path"] == "out.mp4":
        kwargs["output_audio_path"] = str(tmp_path / "out.mp4")
    with pytest.raises(ValueError, match=match):
        model.inference(**kwargs)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("overrides, match", [
    (dict(max_new_frames=0), r"max_new_frames=0; expected an integer >= 1"),
    (dict(audio_top_p=2), r"audio_top_p=2; expected a number in \(0, 1\]"),
    (dict(text_top_p=0.0), r"text_top_p=0.0; expected a number in \(0, 1\]"),
    (dict(audio_top_k=0), r"audio_top_k=0; expected an integer >= 1"),
    (dict(nq=0), r"nq=0; expected an integer >= 1"),
    (dict(do_sample=True, audio_temperature=0.0), "audio_temperature must be > 0"),
    (dict(audio_repetition_penalty=-1.0), "audio_repetition_penalty must be > 0"),
    (dict(voice_clone_max_text_tokens=1), r"voice_clone_max_text_tokens=1; expected an integer >= 4"),
])
def test_generation_settings_are_checked_before_anything_is_loaded(overrides, match):
    with pytest.raises(ValueError, match=match) as refused:
        synthesis.build_request(**_arguments(**overrides))
    assert refused.value.name in overrides  # the setting at fault, for the server's `param` and the CLI's flag


def test_the_engine_request_builder_applies_the_same_rules(model):
    """engine_request (the engine requests of inference_stream and the server) refuses what build_request refuses."""
    tokenizer = synthesis.load_text_tokenizer(model)
    for settings, name in ((GenerationSettings(audio_top_k=0), "audio_top_k"),
                           (GenerationSettings(audio_top_p=0.0), "audio_top_p"),
                           (GenerationSettings(nq=int(model.config.n_vq) + 1), "nq")):
        with pytest.raises(ValueError) as refused:
            synthesis.engine_request(model, tokenizer, "Hello.", "continuation", settings=settings)
        assert refused.value.name == name
    for budget in (1, 3):
        with pytest.raises(ValueError, match="voice_clone_max_text_tokens"):
            synthesis.engine_request(model, tokenizer, "Hello.", "continuation", voice_clone_max_text_tokens=budget)
    assert synthesis.engine_request(model, tokenizer, "Hello.", "continuation", voice_clone_max_text_tokens=0).chunks


def _unwritable_outputs(tmp_path):
    blocker = tmp_path / "a_file.txt"
    blocker.write_text("not a folder")
    cases = [(blocker / "out.wav", "is a file, not a folder"), (blocker / "deeper" / "out.wav", "is a file")]
    if Path("/proc/self").is_dir():  # procfs refuses new files even to root
        cases.append((Path("/proc/self/out.wav"), "is not writable"))
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "out.wav", "is not writable"))
    return cases


def test_unwritable_output_location_is_refused_before_anything_is_loaded(tmp_path):
    for path, reason in _unwritable_outputs(tmp_path):
        with pytest.raises(ValueError, match=reason) as caught:
            synthesis.build_request(**_arguments(output_audio_path=str(path)))
        assert f"output_audio_path {str(path)!r} cannot be written" in str(caught.value)


def test_writable_output_in_a_missing_folder_is_accepted_and_nothing_is_left(tmp_path):
    synthesis.build_request(**_arguments(output_audio_path=str(tmp_path / "new" / "sub" / "out.wav")))
    assert _leftovers(tmp_path) == []


def test_chunks_cut_at_max_new_frames_give_one_summary_warning(model, prompt_wav, caplog):
    text = " ".join(f"Sentence number {index} is here." for index in range(6))
    with caplog.at_level(logging.WARNING, logger=synthesis_request.__name__):
        result = model.inference(text, None, mode="voice_clone", prompt_audio_path=str(prompt_wav),
                                 voice_clone_max_text_tokens=8, **GREEDY)
    chunks = len(result["voice_clone_text_chunks"])
    assert chunks >= 5
    (warning,) = [r.getMessage() for r in caplog.records if "max_new_frames" in r.getMessage()]
    assert warning.startswith(f"{chunks} of {chunks} chunk(s) reached max_new_frames=2")
    assert f"and {chunks - 3} more" in warning


def test_progress_without_a_terminal_is_a_periodic_log_line(model, prompt_wav, caplog, monkeypatch):
    monkeypatch.setattr(synthesis_request, "PROGRESS_LOG_SECONDS", 0.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, also under `pytest -s`
    with caplog.at_level(logging.INFO, logger=synthesis.progress_logger.name):
        model.inference(TWO_CHUNKS, None, mode="voice_clone", prompt_audio_path=str(prompt_wav),
                        voice_clone_max_text_tokens=5, do_sample=False, max_new_frames=2, progress=None)
    lines = [r.getMessage() for r in caplog.records if r.name == synthesis.progress_logger.name]
    assert [line.split(",")[0] for line in lines] == ["synthesising: 1/2 chunks", "synthesising: 2/2 chunks"]
    assert "s left" in lines[0]


def test_missing_codec_says_how_to_download(tmp_path, repo):
    folder = tmp_path / "no_codec"
    folder.mkdir()
    for name in os.listdir(repo):
        if name != "audio_tokenizer" and (repo / name).is_file():
            (folder / name).write_bytes((repo / name).read_bytes())
    bare = modeling.MossTTSNanoForCausalLM.from_pretrained(str(folder)).eval()
    with pytest.raises(ValueError, match="--download-only"):
        bare.inference("Hello.", None, **GREEDY)


def test_reference_audio_path_is_a_deprecated_alias(prompt_wav):
    request = synthesis.build_request(**_arguments(mode="voice_clone", reference_audio_path=str(prompt_wav)))
    assert request.prompt_audio_path == str(prompt_wav)
    with pytest.raises(ValueError, match="differ"):
        synthesis.build_request(**_arguments(prompt_audio_path="a.wav", reference_audio_path=str(prompt_wav)))


def test_100k_character_text_is_chunked_in_voice_clone_mode(model, prompt_wav, tmp_path):
    """The whole pipeline on 100,000 characters; the network is replaced by one fixed frame per chunk (speed)."""

    class OneFrame(type(model)):
        def generate(self, input_ids, attention_mask=None, **kwargs):
            frames = torch.zeros(input_ids.shape[0], 1, 16, dtype=torch.long)
            return modeling.MossTTSNanoGenerationOutput(audio_token_ids=frames, prompt_input_ids=input_ids)

    fast = OneFrame.from_pretrained(str(model.config._name_or_path)).eval()
    sentence = "The quick brown fox jumps over the lazy dog, and then it runs away. "
    text = sentence * (100_000 // len(sentence) + 1)  # just over 100,000 characters, whole sentences
    out = tmp_path / "long.wav"
    result = fast.inference(text, str(out), mode="voice_clone", prompt_audio_path=str(prompt_wav),
                            voice_clone_max_text_tokens=1000, do_sample=False, max_new_frames=375, progress=False)
    chunks = result["voice_clone_text_chunks"]
    assert len(chunks) > 20 and "".join(chunks).replace(" ", "") == text.replace(" ", "")
    _assert_wav(out, len(chunks) * HOP + _pauses(chunks))


def test_upstream_private_helpers_that_callers_use_still_answer(model, tokenizer):
    """Spec tts.md §7 lists private methods upstream callers use; they delegate to the library's functions."""
    text = "Hello world. This is a test. One more sentence here."
    assert model._split_text_into_best_sentences(tokenizer, text, 5) == \
        text_chunking.split_text_into_chunks(tokenizer, text, 5)
    assert model._compute_stream_lead_seconds(2.0, 10.0, 11.5) == pytest.approx(0.5)
    assert model._compute_stream_lead_seconds(2.0, None) == 0.0
    assert [model._resolve_stream_decode_frame_budget(lead) for lead in (0.1, 0.3, 0.9, 1.5)] == [1, 2, 4, 8]
    assert model._resolve_stream_decode_frame_budget(1.5, emitted_any=False) == 1


def test_signatures_are_upstreams_plus_keyword_only_extras():
    import inspect

    upstream = ["text", "output_audio_path", "mode", "prompt_text", "prompt_audio_path", "reference_audio_path",
                "text_tokenizer", "text_tokenizer_path", "audio_tokenizer", "audio_tokenizer_type",
                "audio_tokenizer_pretrained_name_or_path", "device", "nq", "max_new_frames", "do_sample",
                "text_temperature", "text_top_p", "text_top_k", "audio_temperature", "audio_top_p", "audio_top_k",
                "audio_repetition_penalty", "use_kv_cache", "voice_clone_max_text_tokens",
                "voice_clone_max_memory_per_sample_gb", "tts_max_batch_size", "codec_max_batch_size"]
    text_extras = ["normalize", "language", "captions", "runaway_guards"]
    for method, extras in ((synthesis.SynthesisMixin.inference, ["progress", *text_extras]),
                           (synthesis.SynthesisMixin.inference_stream, ["progress", "stream_policy", *text_extras])):
        parameters = list(inspect.signature(method).parameters.values())[1:]
        positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == upstream
        assert [p.name for p in parameters if p.kind is p.KEYWORD_ONLY] == extras
    defaults = inspect.signature(synthesis.SynthesisMixin.inference).parameters
    assert (defaults["max_new_frames"].default, defaults["audio_temperature"].default,
            defaults["voice_clone_max_text_tokens"].default, defaults["do_sample"].default) == (300, 1.7, 50, False)
