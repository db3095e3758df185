"""The speech server against live uvicorn servers on 127.0.0.1 (tiny model, golden audible codec), driven by the
official openai SDK and by raw HTTP (httpx) for our extensions.

Three servers, each started and stopped here on a free port:
* `server`: in-process, 8 slots, an API key, the every-frame codec policy (a request alone gives the same samples
  every time, so bytes can be compared exactly);
* `small_server`: in-process, 2 slots and a queue of 1, no key, upstream's lead-based codec policy (faults: 429,
  disconnects, a failing request beside a healthy one);
* a `serve.py` subprocess on `server`'s voices folder, for the restart and SIGTERM drain.

The tiny model always continues, so a request makes exactly max_new_frames frames of HOP samples. Audio of a request
that ran beside others is compared to 16-bit rounding: the batched codec's float rounding depends on the batch
(tests/test_engine.py), which moves a sample by one 16-bit step now and then.
"""

import asyncio
import base64
import io
import json
import re
import shutil
import signal
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import torch
import uvicorn

from conftest import import_module, shared_path
from tiny_repository import HOP, pinned_copy_with_corrupt_weights

serve = import_module("serve")
loadtest = import_module("loadtest")
checkpoints = import_module("measurement.checkpoints")
audio_formats = import_module("server.formats")
infer_npu = import_module("infer_npu")
model_flags = import_module("settings.model_flags")
speech_server = import_module("server.app")
engine_module = import_module("engine")

KEY = "test-key"
FRAMES = 6
SAMPLES = FRAMES * HOP
BYTES_PER_SAMPLE = 4  # 16-bit stereo
LONG = 1500  # frames of a request that is still running when a test acts (2 minutes of audio, seconds of work)
READY_SECONDS = 120
QUEUE_TIMEOUT = 3.0  # small_server's --queue-timeout
# pcm is 24 kHz mono unless asked otherwise (OpenAI's layout); these tests compare bytes in the codec's native layout.
NATIVE_LAYOUT = {"sample_rate": 48000, "channels": 2}


def write_server_repository(folder):
    """The tiny TTS + tokenizer, with the golden tiny codec (audible: decoded rms ~1.5) as its audio tokenizer."""
    model = import_module("measurement.checkpoints").always_continue_tiny_model(seed=3)
    checkpoints.write_model_repository(folder, model.config, model.state_dict(),
                                       tokenizer_model=shared_path("assets", "tokenizer.model"))
    codec = shared_path("golden", "codec_tiny")
    (folder / "audio_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(codec / name, folder / "audio_tokenizer" / name)
    return folder


class LiveServer:
    """serve.py's app under uvicorn on a thread of this process."""

    def __init__(self, argv):
        self.port = loadtest.free_port()
        args = serve.build_parser().parse_args([*map(str, argv), "--port", str(self.port), "--log-level", "warning"])
        self.app = serve.build_app(args)
        self.server = uvicorn.Server(serve.uvicorn_config(self.app, args))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        loadtest.wait_until_ready(self.url, None, READY_SECONDS)

    @property
    def service(self):
        return self.app.state.speech.service

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return write_server_repository(tmp_path_factory.mktemp("server_repo"))


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


@pytest.fixture(scope="module")
def server(repository, voices_dir):
    live = LiveServer(["--model-path", repository, "--no-verify", "--device", "cpu", "--num-slots", 8, "--max-queue", 8,
                       "--max-positions", 256, "--api-key", KEY, "--voices-dir", voices_dir,
                       "--stream-policy", "every-frame", "--max-audio-seconds", 600])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def small_server(repository, tmp_path_factory):
    live = LiveServer(["--model-path", repository, "--no-verify", "--device", "cpu", "--num-slots", 2, "--max-queue", 1,
                       "--max-positions", 2048, "--voices-dir", tmp_path_factory.mktemp("small_voices"),
                       "--queue-timeout", QUEUE_TIMEOUT])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def voice(client, prompt_wav):
    """Voice 'en' (the 1.2 s prompt clip), added through the SDK."""
    created = client.audio.voices.create(name="en", audio_sample=("en.wav", prompt_wav.read_bytes(), "audio/wav"),
                                         consent="test")
    assert (created.id, created.name, created.object) == ("en", "en", "audio.voice")
    return "en"


def speech(client, voice, **extra):
    """Whole response bytes via the SDK; extra = our extensions (and response_format / speed)."""
    fields = {key: extra.pop(key) for key in ("response_format", "speed") if key in extra}
    response = client.audio.speech.create(model="tts-1", voice=voice, input="Hello world.",
                                          extra_body={"max_new_frames": FRAMES, **NATIVE_LAYOUT, **extra}, **fields)
    return response.content


def post(url, body, key=KEY, **keywords):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/audio/speech", json=body, headers=headers, timeout=60, **keywords)


def pcm_samples(data):
    return np.frombuffer(data, "<i2").reshape(-1, 2)


def assert_equal_to_16_bit_rounding(together, alone):
    """Same length; every sample within one 16-bit step, almost all identical."""
    assert together.shape == alone.shape
    difference = np.abs(together.astype(np.int32) - alone.astype(np.int32))
    assert difference.max() <= 1
    assert np.mean(difference == 0) > 0.95


# ----------------------------------------------------------------------------------------------------------------
# Formats, streaming, concurrency


@pytest.mark.parametrize("response_format", ["wav", "pcm", "flac", "mp3", "opus"])
def test_every_format_decodes_to_the_expected_length(client, voice, response_format):
    data = speech(client, voice, response_format=response_format, seed=1, stream=response_format != "flac")
    if response_format == "pcm":
        assert len(data) == SAMPLES * BYTES_PER_SAMPLE
        return
    decoded, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 48000 and decoded.shape[1] == 2
    if response_format == "mp3":  # decoders add the encoder's delay and pad to whole frames
        lead = audio_formats.MP3_LEAD_SAMPLES
        assert SAMPLES + lead <= decoded.shape[0] <= SAMPLES + lead + audio_formats.MP3_FRAME_SAMPLES
    else:
        assert decoded.shape[0] == SAMPLES


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_speed_changes_the_length_exactly(client, voice, speed):
    data = speech(client, voice, response_format="pcm", speed=speed, seed=1)
    assert len(data) == round(SAMPLES / speed) * BYTES_PER_SAMPLE


@pytest.mark.parametrize("response_format", ["pcm", "mp3", "wav"])
def test_streamed_bytes_equal_the_whole_file_for_the_same_seed(client, voice, response_format):
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=voice, input="Hello world.", response_format=response_format,
            extra_body={"max_new_frames": FRAMES, "seed": 7, **NATIVE_LAYOUT}) as response:
        assert response.headers["x-moss-seed"] == "7" and response.headers["x-sample-rate"] == "48000"
        streamed = b"".join(response.iter_bytes())
    whole = speech(client, voice, response_format=response_format, seed=7, stream=False)
    if response_format == "wav":  # the stream's header cannot know the sizes; the audio bytes are the same
        assert streamed[44:] == whole[44:] and whole[:4] == b"RIFF"
        assert int.from_bytes(whole[40:44], "little") == SAMPLES * BYTES_PER_SAMPLE
    else:
        assert streamed == whole
    other_seed = speech(client, voice, response_format=response_format, seed=8, stream=False)
    assert other_seed != whole


def test_instructions_are_accepted_and_ignored(client, voice):
    response = client.audio.speech.create(model="tts-1", voice=voice, input="Hello world.", response_format="pcm",
                                          instructions="Speak softly.", extra_body={"max_new_frames": FRAMES,
                                                                                    "seed": 9, **NATIVE_LAYOUT})
    assert response.content == speech(client, voice, response_format="pcm", seed=9)


def test_sse_streams_delta_events_then_done_with_usage(server, voice):
    body = {"model": "tts-1", "voice": voice, "input": "Hello world.", "response_format": "pcm",
            "stream_format": "sse", "max_new_frames": FRAMES, "seed": 7, **NATIVE_LAYOUT}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [event for event in events if event["type"] == "speech.audio.delta"]
    assert len(deltas) == FRAMES  # every-frame policy: one delta per frame, as produced
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] == FRAMES and events[-1]["usage"]["input_tokens"] > 0
    audio = b"".join(base64.b64decode(event["audio"]) for event in deltas)
    assert audio == speech(openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0), voice,
                           response_format="pcm", seed=7)


def test_eight_concurrent_seeded_requests_each_equal_the_same_request_alone(client, voice):
    seeds = list(range(100, 108))
    alone = {seed: pcm_samples(speech(client, voice, response_format="pcm", seed=seed)) for seed in seeds}
    together, errors = {}, []

    def run(seed):
        try:
            together[seed] = pcm_samples(speech(client, voice, response_format="pcm", seed=seed))
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and sorted(together) == seeds
    for seed in seeds:
        assert_equal_to_16_bit_rounding(together[seed], alone[seed])
    assert np.mean(alone[100] != alone[101]) > 0.5  # the seeds do make different audio


# ----------------------------------------------------------------------------------------------------------------
# Voices, models, auth, bad requests


def test_voices_can_be_added_listed_used_and_deleted(server, client, voice, prompt_wav):
    clip = prompt_wav.read_bytes()
    created = client.audio.voices.create(name="temp-1", audio_sample=("a.wav", clip, "audio/wav"), consent="x")
    listed = httpx.get(f"{server.url}/v1/audio/voices", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert listed["object"] == "list" and {"en", "temp-1"} <= {item["id"] for item in listed["data"]}
    with pytest.raises(openai.ConflictError):
        client.audio.voices.create(name="temp-1", audio_sample=("a.wav", clip, "audio/wav"), consent="x")
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.voices.create(name="Not A Name!", audio_sample=("a.wav", clip, "audio/wav"), consent="x")
    assert refused.value.param == "name"
    # the stored voice and the same clip as ref_audio give the same audio (voice=None: the SDK requires the argument)
    by_reference = speech(client, None, response_format="pcm", seed=5, ref_audio=base64.b64encode(clip).decode())
    assert speech(client, created.id, response_format="pcm", seed=5) == by_reference
    assert client.audio.voices.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.audio.voices.delete(created.id)


def test_models_health_and_metrics(server, client):
    assert [model.id for model in client.models.list()] == ["moss-tts-nano-100m"]
    health = httpx.get(f"{server.url}/health").json()  # open: no key needed
    assert health["status"] == "ok" and health["slots"] == 8 and health["sample_rate"] == 48000
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("moss_tts_requests_total", "moss_tts_time_to_first_audio_seconds_bucket",
                 "moss_tts_real_time_factor_ratio_bucket", "moss_tts_active_streams", "moss_tts_queued_requests",
                 "moss_tts_slot_occupancy_ratio", "moss_tts_audio_seconds_total"):
        assert name in metrics
    for reason in ("no_free_slot", "prefill_budget", "keeping_streams_ahead", "protecting_slack"):
        assert f'moss_tts_queued_requests_by_reason{{reason="{reason}"}} 0.0' in metrics


def _prefix_lookups(url):
    metrics = httpx.get(f"{url}/metrics").text
    return {result: float(re.search(rf'moss_tts_voice_prefix_lookups{{result="{result}"}} (\S+)', metrics).group(1))
            for result in ("hit", "miss")}


def test_a_voice_is_prefilled_once_and_its_reuse_changes_no_sample(server, client, voice):
    """The same request twice in a new voice: the first prefills the voice rows and stores them (a miss), the second
    copies them (a hit) and gets the same samples; /metrics counts both."""
    before = _prefix_lookups(server.url)
    clip = long_wav(seconds=2)
    first = speech(client, None, response_format="pcm", seed=9, ref_audio=clip)
    middle = _prefix_lookups(server.url)
    second = speech(client, None, response_format="pcm", seed=9, ref_audio=clip)
    after = _prefix_lookups(server.url)
    assert middle["miss"] == before["miss"] + 1 and middle["hit"] == before["hit"]
    assert after["hit"] == middle["hit"] + 1 and after["miss"] == middle["miss"]
    assert first == second  # every-frame codec calls: the same request gives the same bytes
    metrics = httpx.get(f"{server.url}/metrics").text
    assert float(re.search(r"^moss_tts_voice_prefix_bytes (\S+)$", metrics, re.MULTILINE).group(1)) > 0


def test_a_missing_or_wrong_api_key_gets_401(server, voice):
    response = post(server.url, {"model": "tts-1", "input": "Hi.", "voice": voice}, key=None)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.audio.speech.create(model="tts-1", voice=voice, input="Hi.")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def silent_wav():
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(48000, np.float32), 48000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def long_wav(seconds=15, rate=16000):
    """A tone with noise, long enough that its codes fill most of a 256-position slot."""
    time_axis = np.arange(seconds * rate) / rate
    noise = np.random.default_rng(0).normal(0, 0.05, time_axis.size)
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * time_axis) + noise).astype(np.float32), rate, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


BAD_BODIES = [
    ({"response_format": "aac", "sample_rate": 9000}, "sample_rate", "not one aac can carry"),
    ({"response_format": "ogg"}, "response_format", "expected one of wav, pcm, flac, mp3, opus"),
    ({"speed": 5}, "speed", "0.25 to 4.0"),
    ({"stream_format": "chunks"}, "stream_format", "'audio' or 'sse'"),
    ({"temperature": 1}, "temperature", "unknown field"),
    ({"model": "gpt-4"}, "model", "moss-tts-nano-100m"),
    ({"input": ""}, "input", "empty"),
    ({"input": "x" * 5000}, "input", "at most 4096"),
    ({"voice": "nobody"}, "voice", "unknown voice 'nobody'"),
    ({"mode": "sing"}, "mode", "voice_clone"),
    ({"ref_audio": "not base64!", "voice": None}, "ref_audio", "base64"),
    ({"ref_audio": "SILENT", "voice": None}, "ref_audio", "silent"),
    ({"ref_audio": "SILENT"}, "ref_audio", "ref_audio and voice are both given"),
    ({"ref_audio": "LONG", "voice": None}, "ref_audio", "the ref_audio clip takes"),  # not max_new_frames's fault
    ({"ref_text": "Hi."}, "ref_text", "continuation"),
    ({"audio_temperature": 0}, "audio_temperature", "must be > 0"),
    # the library's rules (synthesis_request.check_generation_settings), as infer_npu.py applies them
    ({"audio_top_p": 0}, "audio_top_p", "audio_top_p=0.0; expected a number in (0, 1]"),
    ({"audio_top_k": 0}, "audio_top_k", "audio_top_k=0; expected an integer >= 1"),
    ({"text_top_p": 1.5}, "text_top_p", "expected a number in (0, 1]"),
    ({"nq": 17}, "nq", "1..16"),
    ({"max_new_frames": 0}, "max_new_frames", "max_new_frames=0; expected an integer >= 1"),
    ({"max_new_frames": 5000}, "max_new_frames", "positions"),
    ({"voice_clone_max_text_tokens": 1}, "voice_clone_max_text_tokens", "expected an integer >= 4"),
    # bounded work: the 4 KB / 1-token / 3-frame request of issue 21, and a request for hours of audio
    ({"input": "Hello there, friend. " * 190, "voice_clone_max_text_tokens": 4, "max_new_frames": 3},
     "voice_clone_max_text_tokens", "at most 64 per request (--max-chunks)"),
    ({"input": "Hello there, friend. " * 20, "voice_clone_max_text_tokens": 4, "max_new_frames": 250},
     "max_new_frames", "the server allows at most 600 s per request (--max-audio-seconds)"),
    ({"seed": -1}, "seed", "0 to 2**63 - 1"),
    ({"stream": False, "stream_format": "sse"}, "stream", "always streamed"),
]


@pytest.mark.parametrize("change, param, expected", BAD_BODIES, ids=[case[1] + str(i) for i, case in
                                                                      enumerate(BAD_BODIES)])
def test_every_bad_field_gets_400_naming_it(server, voice, change, param, expected):
    body = {"model": "tts-1", "input": "Hello.", "voice": voice, **change}
    if body.get("ref_audio") == "SILENT":
        body["ref_audio"] = silent_wav()
    if body.get("ref_audio") == "LONG":
        body["ref_audio"] = long_wav()
    response = post(server.url, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert expected in error["message"]


def test_the_sdk_reports_the_field_of_a_400_and_bad_json_is_a_400(server, client, voice):
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="tts-1", voice=voice, input="Hi.", speed=9.0)
    assert refused.value.param == "speed" and "0.25 to 4.0" in refused.value.message
    response = httpx.post(f"{server.url}/v1/audio/speech", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


# ----------------------------------------------------------------------------------------------------------------
# Faults: full queue, disconnects, a failing request


def continuation(frames, **extra):
    return {"model": "tts-1", "voice": "none", "input": "Hello world.", "mode": "continuation",
            "response_format": "pcm", "max_new_frames": frames, "runaway_guards": False, **NATIVE_LAYOUT,
            **extra}  # runs all frames


def wait_for(condition, seconds):
    """Poll until condition() is true; returns the seconds it took (or fails)."""
    started = time.perf_counter()
    while not condition():
        assert time.perf_counter() - started < seconds, "timed out"
        time.sleep(0.01)
    return time.perf_counter() - started


def health(url):
    return httpx.get(f"{url}/health").json()


class OpenStream:
    """A streaming request, read on a thread of its own from its first audio chunk on, until close()."""

    def __init__(self, url, body):
        self.client = httpx.Client(timeout=60)
        self.response = self.client.send(self.client.build_request("POST", f"{url}/v1/audio/speech", json=body),
                                         stream=True)
        assert self.response.status_code == 200
        chunks = self.response.iter_raw()
        self.first = next(chunks)
        self.reader = threading.Thread(target=self._drain, args=(chunks,), daemon=True)
        self.reader.start()

    @staticmethod
    def _drain(chunks):
        try:
            for _ in chunks:
                pass
        except (httpx.HTTPError, RuntimeError, ValueError):  # closed under it by close()
            pass

    def close(self):
        self.response.close()
        self.client.close()
        self.reader.join(timeout=10)


def test_a_disconnected_stream_frees_its_slot_within_a_frame(small_server):
    stream = OpenStream(small_server.url, continuation(LONG))
    assert health(small_server.url)["active"] == 1
    stream.close()
    assert wait_for(lambda: health(small_server.url)["active"] == 0, 2.0) < 1.0
    metrics = httpx.get(f"{small_server.url}/metrics").text
    assert 'moss_tts_speech_ended_total{outcome="disconnected"}' in metrics


def test_a_client_that_leaves_a_whole_file_request_frees_its_slot(small_server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{small_server.url}/v1/audio/speech", json=continuation(LONG, stream=False), timeout=0.5)
    assert wait_for(lambda: health(small_server.url)["active"] == 0, 2.0) < 1.0


def test_a_full_queue_answers_429_at_once(small_server):
    running = [OpenStream(small_server.url, continuation(LONG)) for _ in range(2)]  # both slots
    queued = threading.Thread(target=lambda: httpx.post(f"{small_server.url}/v1/audio/speech",
                                                        json=continuation(FRAMES), timeout=60))
    queued.start()
    try:
        wait_for(lambda: health(small_server.url)["waiting"] == 1, 5.0)
        client = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="unused", max_retries=0)
        started = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as refused:
            client.audio.speech.create(model="tts-1", voice="none", input="Hi.", extra_body={"mode": "continuation"})
        assert time.perf_counter() - started < 1.0
        assert refused.value.response.headers["retry-after"] == "1" and refused.value.code == "rate_limit_exceeded"
    finally:
        for stream in running:
            stream.close()
        queued.join(timeout=60)
    wait_for(lambda: health(small_server.url)["active"] == 0, 5.0)


def test_a_request_that_waits_past_the_queue_timeout_gets_503_with_retry_after(small_server):
    running = [OpenStream(small_server.url, continuation(LONG)) for _ in range(2)]  # both slots
    try:
        started = time.perf_counter()
        response = post(small_server.url, continuation(FRAMES), key=None)
        waited = time.perf_counter() - started
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1" and response.json()["error"]["code"] == "queue_timeout"
        assert "--queue-timeout" in response.json()["error"]["message"]
        assert QUEUE_TIMEOUT - 0.1 < waited < QUEUE_TIMEOUT + 2.0
        assert wait_for(lambda: health(small_server.url)["waiting"] == 0, 2.0) < 1.0  # it left the queue
    finally:
        for stream in running:
            stream.close()
    wait_for(lambda: health(small_server.url)["active"] == 0, 5.0)
    metrics = httpx.get(f"{small_server.url}/metrics").text
    assert 'moss_tts_speech_ended_total{outcome="queue_timeout"} 1.0' in metrics


def test_health_fails_when_the_engine_stalls_or_its_thread_ends(repository, tmp_path):
    """A listener that blocks the engine's thread stalls the engine: /health's test (also Ray's check_health) says so
    after the bound, and recovers once the engine ticks again; an ended engine thread fails it for good."""
    args = serve.build_parser().parse_args(["--model-path", str(repository), "--no-verify", "--device", "cpu",
                                            "--num-slots", "1", "--max-positions", "2048", "--voices-dir",
                                            str(tmp_path / "voices")])
    state = speech_server.ServerState(stall_seconds=0.3)
    state.service = serve.load_service(args)
    engine = state.service.engine
    engine.start()
    release, blocked = threading.Event(), threading.Event()

    def blocking_listener(event):
        blocked.set()
        release.wait(30)

    try:
        assert speech_server.health_problem(state) is None
        prepared = state.service.prepare(import_module("server.schema").SpeechBody(**continuation(LONG)))
        handle = state.service.submit(prepared, blocking_listener)
        assert blocked.wait(30)
        wait_for(lambda: speech_server.health_problem(state) is not None, 5.0)
        assert "has not finished a tick" in speech_server.health_problem(state)
        release.set()
        wait_for(lambda: speech_server.health_problem(state) is None, 5.0)
        handle.cancel()
    finally:
        release.set()
        assert engine.stop(drain=False, timeout=30)
    assert speech_server.health_problem(state) == "the speech engine's thread has stopped"


def test_prepare_work_runs_on_at_most_its_workers_and_a_deadline_ends_the_wait():
    work = speech_server.BoundedWork(1)
    running, overlapped = [], []

    def job(seconds):
        overlapped.append(len(running))
        running.append(1)
        time.sleep(seconds)
        running.pop()
        return threading.current_thread().name

    async def scenario():
        first = asyncio.ensure_future(work.run(None, job, 0.5))
        await asyncio.sleep(0.1)
        with pytest.raises(speech_server.NoWorker):  # the only worker is busy past this deadline
            await work.run(time.monotonic() + 0.1, job, 0.0)
        second = await work.run(time.monotonic() + 5.0, job, 0.0)  # waits for the first, then runs
        return await first, second

    names = asyncio.run(scenario())
    assert overlapped == [0, 0] and all(name == "speech-work" for name in names)


def test_health_live_and_ready_answer_while_serving(small_server):
    assert httpx.get(f"{small_server.url}/health").status_code == 200
    live = httpx.get(f"{small_server.url}/health/live")
    assert live.status_code == 200 and live.json()["status"] == "ok"


def test_a_failing_request_leaves_the_request_beside_it_intact(small_server):
    service = small_server.service
    healthy_ids = set(service.tokenizer.encode("Hello world.", add_special_tokens=False))
    poisoned = set(service.tokenizer.encode("Zebra quilts.", add_special_tokens=False)) - healthy_ids
    # Whole files (stream=false): no playback to protect, so the engine runs both side by side at once.
    healthy = continuation(40, seed=3, stream=False)
    alone = pcm_samples(post(small_server.url, healthy, key=None).content)
    with torch.no_grad():  # this server's model now gives NaN for any prompt holding those text tokens
        service.model.transformer.wte.weight[sorted(poisoned)] = float("nan")
    results = {}
    threads = [threading.Thread(target=lambda: results.update(healthy=post(small_server.url, healthy, key=None))),
               threading.Thread(target=lambda: results.update(bad=post(
                   small_server.url, continuation(40, input="Zebra quilts.", stream=False), key=None)))]
    threads[0].start()
    # admitted (or already done): the bad one never finds it queued (--max-queue 1)
    wait_for(lambda: service.engine.active == 1 or "healthy" in results, 30)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=60)
    assert results["bad"].status_code == 500
    error = results["bad"].json()["error"]
    assert "Non-finite" in error["message"] and error["code"] == "non_finite_logits"
    assert results["healthy"].status_code == 200
    assert_equal_to_16_bit_rounding(pcm_samples(results["healthy"].content), alone)
    metrics = httpx.get(f"{small_server.url}/metrics").text
    assert 'moss_tts_speech_errors_total{code="non_finite_logits"} 1.0' in metrics



def _codes_alone(service, body):
    """The codes [F, n_vq] of `body` run through the service's engine directly."""
    events, done = [], threading.Event()

    def listener(event):
        events.append(event)
        if isinstance(event, engine_module.FINAL_EVENTS):
            done.set()
    service.submit(service.prepare(import_module("server.schema").SpeechBody(**body)), listener)
    assert done.wait(60) and isinstance(events[-1], engine_module.FinishedEvent)
    return events[-1].codes[0]


def test_a_request_that_fails_after_its_first_audio_ends_its_sse_stream_with_the_engine_code(small_server):
    service = small_server.service
    body = continuation(12, seed=5, stream_format="sse")
    codes = _codes_alone(service, body)[:, 0].tolist()
    later = next(index for index in range(3, len(codes)) if codes[index] not in codes[:index])
    embedding = service.model.audio_embeddings[0]
    original = embedding.weight
    weight = original.detach().clone()  # untied from channel 0's head: only sampling that code meets the NaN
    weight[codes[later]] = float("nan")
    embedding.weight = torch.nn.Parameter(weight)
    try:
        with httpx.stream("POST", f"{small_server.url}/v1/audio/speech", json=body, timeout=60) as response:
            assert response.status_code == 200
            events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    finally:
        embedding.weight = original
    assert events[0]["type"] == "speech.audio.delta"  # the failure came after audio had been sent
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "non_finite_logits"
    assert "Non-finite" in events[-1]["error"]["message"]

# ----------------------------------------------------------------------------------------------------------------
# A restart, SIGTERM, SIGINT, and a checkpoint that fails its checksum


def test_serve_refuses_a_corrupt_checkpoint_in_one_line_with_exit_2_before_binding(repository, tmp_path, monkeypatch,
                                                                                   capsys):
    copy, pins = pinned_copy_with_corrupt_weights(repository, tmp_path / "model")
    monkeypatch.setattr(model_flags, "PINS", pins)
    port = loadtest.free_port()
    code = serve.main(["--model-path", str(copy), "--device", "cpu", "--port", str(port), "--no-progress",
                       "--voices-dir", str(tmp_path / "voices")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: Checksum mismatch") and "pytorch_model.bin" in captured.err
    assert "--no-verify" in captured.err and "Traceback" not in captured.err
    assert "serving" not in captured.out
    with socket.create_server(("127.0.0.1", port)):  # never bound
        pass


@pytest.mark.parametrize("flag, value", [("--voice-cache-mb", -1), ("--max-chunks", 0), ("--queue-timeout", -2),
                                         ("--prefill-chunk-rows", -1)])
def test_serve_refuses_a_bad_number_naming_its_flag_with_exit_2(repository, tmp_path, capsys, flag, value):
    code = serve.main(["--model-path", str(repository), "--device", "cpu", "--port", str(loadtest.free_port()),
                       "--no-progress", "--voices-dir", str(tmp_path / "voices"), flag, str(value)])
    assert code == 2 and capsys.readouterr().err.startswith(f"error: {flag} ")


def test_sigint_ends_an_sse_stream_with_an_error_event_after_the_grace_period(repository, tmp_path):
    port = loadtest.free_port()
    process = loadtest.launch_server(
        ["--model-path", repository, "--no-verify", "--device", "cpu", "--num-slots", 2, "--max-positions", 2048,
         "--voices-dir", tmp_path / "voices", "--port", port, "--grace-seconds", 1, "--log-level", "info"],
        tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        loadtest.wait_until_ready(url, process, READY_SECONDS)
        events = []
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{url}/v1/audio/speech",
                             json=continuation(LONG, stream_format="sse", response_format="pcm")) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(json.loads(line.removeprefix("data: ")))
                    if len(events) == 1:
                        process.send_signal(signal.SIGINT)
        assert events[0]["type"] == "speech.audio.delta"
        assert events[-1]["type"] == "error" and "cancelled" in events[-1]["error"]["message"]
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "grace period over: cancelling 1 running" in log


def test_voices_survive_a_restart_and_sigterm_drains_running_streams(repository, voices_dir, client, voice,
                                                                      tmp_path):
    before = speech(client, voice, response_format="pcm", seed=11)
    cache = voices_dir / "en.codes.safetensors"
    cached_at = cache.stat().st_mtime_ns
    port = loadtest.free_port()
    process = loadtest.launch_server(
        ["--model-path", repository, "--no-verify", "--device", "cpu", "--num-slots", 8, "--max-positions", 256,
         "--api-key", KEY, "--voices-dir", voices_dir, "--stream-policy", "every-frame", "--port", port,
         "--grace-seconds", 30, "--log-level", "warning"], tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        loadtest.wait_until_ready(url, process, READY_SECONDS)
        restarted = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert speech(restarted, voice, response_format="pcm", seed=11) == before
        assert cache.stat().st_mtime_ns == cached_at  # the voice was not encoded again
        body = {"model": "tts-1", "voice": voice, "input": "Hello world.", "response_format": "pcm",
                "max_new_frames": 150, "runaway_guards": False, **NATIVE_LAYOUT}
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            with http.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
                raw = response.iter_raw()
                chunks = [next(raw)]
                assert health(url)["active"] == 1  # still generating when the signal comes
                process.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                with pytest.raises(httpx.ConnectError):  # no new connections while draining
                    httpx.get(f"{url}/health", timeout=2)
                chunks.extend(raw)
        assert len(b"".join(chunks)) == 150 * HOP * BYTES_PER_SAMPLE  # the running stream was finished
        process.wait(timeout=30)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
