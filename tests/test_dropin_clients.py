"""The server as a drop-in for clients written for OpenAI's speech API and for Home Assistant's Wyoming protocol.

One live server on 127.0.0.1, started and stopped here: serve.py's app under uvicorn plus the Wyoming server on the
same event loop (server/wyoming.py: serve_both, what `serve.py --wyoming-port` runs), over the tiny model whose repository
carries the stand-in preset voices (checkpoints.write_stand_in_presets) and no uploaded voice. Clients: the official
`openai` SDK (sync and async, whole and streamed) and the `wyoming` client library. The tiny model never stops, so a
request makes exactly FRAMES frames of HOP samples at 48 kHz; every response is decoded and its rate, channel count
and length checked against that.
"""

import asyncio
import base64
import io
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import uvicorn

from conftest import REPO_ROOT, import_module
from test_server import READY_SECONDS, write_server_repository
from tiny_repository import HOP

serve = import_module("serve")
loadtest = import_module("loadtest")
checkpoints = import_module("measurement.checkpoints")
audio_formats = import_module("server.formats")
voice_presets = import_module("voice_library.presets")
wyoming_server = import_module("server.wyoming")

from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.tts import (Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop,  # noqa: E402
                         SynthesizeStopped, SynthesizeVoice)

FRAMES = 3
NATIVE_RATE = 48000
WYOMING_SECONDS = 60  # bound on every Wyoming exchange


def samples_at(rate, frames=FRAMES):
    return frames * HOP * rate // NATIVE_RATE


class LiveDropin:
    """HTTP (uvicorn) and Wyoming on one event loop in a thread of this process, one engine."""

    def __init__(self, repository, voices_dir):
        self.port, self.wyoming_port = loadtest.free_port(), loadtest.free_port()
        args = serve.build_parser().parse_args(
            ["--model-path", str(repository), "--no-verify", "--device", "cpu", "--num-slots", "4", "--max-queue",
             "8", "--max-positions", "256", "--voices-dir", str(voices_dir), "--port", str(self.port),
             "--wyoming-port", str(self.wyoming_port), "--log-level", "warning"])
        self.app = serve.build_app(args)
        self.server = uvicorn.Server(serve.uvicorn_config(self.app, args))
        speech = wyoming_server.WyomingSpeech(self.app.state.speech, {"max_new_frames": FRAMES})
        both = wyoming_server.serve_both(self.server, speech, "127.0.0.1", self.wyoming_port)
        self.thread = threading.Thread(target=asyncio.run, args=(both,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        loadtest.wait_until_ready(self.url, None, READY_SECONDS)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    folder = write_server_repository(tmp_path_factory.mktemp("dropin_repo"))
    checkpoints.write_stand_in_presets(folder)
    return folder


@pytest.fixture(scope="module")
def live(repository, tmp_path_factory):
    server = LiveDropin(repository, tmp_path_factory.mktemp("dropin_voices"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def voice_listing(client):
    """GET /v1/audio/voices through the SDK's client (it has no typed method for the listing): id -> Voice JSON."""
    return {voice["id"]: voice for voice in client.get("/audio/voices", cast_to=object)["data"]}


def create(client, voice="alloy", response_format="pcm", **extra):
    return client.audio.speech.with_raw_response.create(
        model="gpt-4o-mini-tts", voice=voice, input="Hello there.", response_format=response_format,
        extra_body={"max_new_frames": FRAMES, **extra})


def decode(data, response_format, rate, channels):
    """(samples [n, channels] int16, rate) of a response body; pcm is read with the layout the request expects."""
    if response_format == "pcm":
        return np.frombuffer(data, "<i2").reshape(-1, channels), rate
    if response_format == "aac":  # libsndfile reads no aac; FFmpeg (PyAV) does
        import av

        with av.open(io.BytesIO(data)) as container:
            frames = [frame.to_ndarray() for frame in container.decode(audio=0)]
            decoded_rate = container.streams.audio[0].sample_rate
        samples = np.concatenate(frames, axis=1).T
        return np.rint(np.clip(samples, -1, 1) * 32767).astype(np.int16), decoded_rate
    decoded, decoded_rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    return decoded, decoded_rate


def assert_audio(data, response_format, rate, channels, frames=FRAMES):
    samples, decoded_rate = decode(data, response_format, rate, channels)
    assert decoded_rate == rate and samples.shape[1] == channels
    expected = samples_at(rate, frames)
    if response_format == "mp3":  # the decoder adds the encoder's delay (scaled to the rate) and pads to a frame
        assert expected <= samples.shape[0] <= expected + audio_formats.MP3_LEAD_SAMPLES + 1152
    elif response_format == "aac":  # the encoder's priming first, the end padded to a whole frame
        lead = audio_formats.AAC_LEAD_SAMPLES
        assert expected + lead <= samples.shape[0] <= expected + lead + audio_formats.AAC_FRAME_SAMPLES
    else:
        assert samples.shape[0] == expected
    assert np.abs(samples).max() > 0


# ----------------------------------------------------------------------------------------------------------------
# OpenAI clients


@pytest.mark.parametrize("name", sorted(voice_presets.OPENAI_VOICES))
def test_every_openai_voice_name_speaks_without_an_upload_and_says_which_preset(client, name):
    response = create(client, voice=name)
    assert response.headers["x-moss-voice"] == voice_presets.OPENAI_VOICES[name]
    assert (response.headers["x-sample-rate"], response.headers["x-channels"]) == ("24000", "1")
    assert_audio(response.content, "pcm", 24000, 1)


def test_pcm_is_24_khz_mono_as_openai_documents_it_and_48_khz_stereo_is_one_field_away(client):
    default = create(client, seed=3)
    native = create(client, seed=3, sample_rate=NATIVE_RATE, channels=2)
    assert len(default.content) == samples_at(24000) * 2
    assert len(native.content) == samples_at(NATIVE_RATE) * 4
    assert (native.headers["x-sample-rate"], native.headers["x-channels"]) == ("48000", "2")
    mono = np.frombuffer(native.content, "<i2").reshape(-1, 2).astype(np.float64).mean(axis=1)
    converted = np.frombuffer(default.content, "<i2").astype(np.float64)
    # The 24 kHz mono answer is the 48 kHz stereo one mixed and resampled: its level matches within 10%
    assert abs(np.sqrt(np.mean(converted ** 2)) / np.sqrt(np.mean(mono ** 2)) - 1) < 0.1


@pytest.mark.parametrize("response_format", ["wav", "pcm", "flac", "mp3", "opus", "aac"])
def test_sync_sdk_whole_and_streamed_every_format_decodes_to_the_frames_generated(client, response_format):
    rate, channels = (24000, 1) if response_format == "pcm" else (NATIVE_RATE, 2)
    whole = create(client, response_format=response_format, stream=False)
    assert_audio(whole.content, response_format, rate, channels)
    if response_format == "flac":  # libsndfile cannot read a streamed flac to its end (server/formats.py)
        return
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="nova", input="Hello there.", response_format=response_format,
            extra_body={"max_new_frames": FRAMES}) as streamed:
        assert streamed.headers["x-moss-voice"] == voice_presets.OPENAI_VOICES["nova"]
        data = b"".join(streamed.iter_bytes())
    assert_audio(data, response_format, rate, channels)


@pytest.mark.parametrize("response_format, rate, channels", [
    ("pcm", 16000, 2), ("wav", 22050, 1), ("flac", 44100, 1), ("mp3", 22050, 1), ("opus", 16000, 2),
    ("wav", 8000, 2), ("aac", 24000, 1), ("pcm", 48000, 2),
])
def test_async_sdk_gets_any_format_at_the_rate_and_channels_it_asks_for(live, response_format, rate, channels):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            async with client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="onyx", input="Hello there.", response_format=response_format,
                    extra_body={"max_new_frames": FRAMES, "sample_rate": rate, "channels": channels,
                                "stream": response_format != "flac"}) as response:
                headers = response.headers
                return headers, b"".join([chunk async for chunk in response.iter_bytes()])

    headers, data = asyncio.run(run())
    assert (headers["x-sample-rate"], headers["x-channels"]) == (str(rate), str(channels))
    assert_audio(data, response_format, rate, channels)


@pytest.mark.parametrize("change, param", [
    ({"sample_rate": 7999}, "sample_rate"), ({"sample_rate": 48001}, "sample_rate"), ({"channels": 3}, "channels"),
    ({"response_format": "opus", "sample_rate": 44100}, "sample_rate"),
    ({"response_format": "mp3", "sample_rate": 9000}, "sample_rate"), ({"voice": "nobody"}, "voice"),
])
def test_a_layout_or_voice_that_cannot_be_served_is_a_400_naming_the_field(client, change, param):
    fields = {"voice": change.pop("voice", "alloy"), "response_format": change.pop("response_format", "pcm")}
    with pytest.raises(openai.BadRequestError) as raised:
        create(client, **fields, **change)
    assert raised.value.body["param"] == param


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_speed_applies_after_the_conversion_to_24_khz_mono(client, speed):
    response = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.", response_format="pcm",
                                          speed=speed, extra_body={"max_new_frames": FRAMES})
    assert len(response.content) == round(samples_at(24000) / speed) * 2


def test_sse_events_state_the_format_rate_and_channels_sent(live):
    body = {"model": "tts-1", "voice": "echo", "input": "Hello there.", "response_format": "pcm", "sample_rate": 8000,
            "stream_format": "sse", "max_new_frames": FRAMES}
    with httpx.stream("POST", f"{live.url}/v1/audio/speech", json=body, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    audio_events = [event for event in events if event["type"].startswith("speech.audio.")]  # not the captions
    assert [event["type"] for event in events if event not in audio_events] == ["speech.caption"]
    for event in audio_events:
        assert (event["response_format"], event["sample_rate"], event["channels"]) == ("pcm", 8000, 1)
    audio = b"".join(base64.b64decode(event["audio"]) for event in audio_events[:-1])
    assert len(audio) == samples_at(8000) * 2


def test_a_missing_preset_falls_back_to_the_default_voice_and_says_so(client, live, repository, tmp_path):
    preset = voice_presets.OPENAI_VOICES["ash"]
    clip = voice_presets.preset_folder(repository) / f"{preset}.wav"
    shutil.move(clip, tmp_path / clip.name)
    try:
        response = create(client, voice="ash")
        listed = voice_listing(client)
    finally:
        shutil.move(tmp_path / clip.name, clip)
    assert response.headers["x-moss-voice"] == voice_presets.DEFAULT_VOICE
    assert_audio(response.content, "pcm", 24000, 1)
    assert listed["ash"]["fallback"] is True and listed["ash"]["uses"] == voice_presets.DEFAULT_VOICE
    assert create(client, voice="ash").headers["x-moss-voice"] == preset


def test_the_listing_names_presets_openai_names_and_an_upload_that_replaces_one(client, repository):
    listed = voice_listing(client)
    assert {name for name, extra in listed.items() if extra["kind"] == "preset"} == set(voice_presets.PRESETS)
    assert not list(voice_presets.preset_folder(repository).glob("*.codes.safetensors"))  # caches go to --voices-dir
    assert {name for name, extra in listed.items() if extra["kind"] == "openai"} == set(voice_presets.OPENAI_VOICES)
    clip = (voice_presets.preset_folder(repository) / "zh_1.wav").read_bytes()
    client.audio.voices.create(name="alloy", audio_sample=("alloy.wav", clip, "audio/wav"), consent="test")
    try:
        listed = voice_listing(client)
        assert listed["alloy"]["kind"] == "upload" and listed["alloy"]["replaces"] == "openai"
        assert create(client, voice="alloy").headers["x-moss-voice"] == "alloy"
    finally:
        client.delete("/audio/voices/alloy", cast_to=object)
    assert create(client, voice="alloy").headers["x-moss-voice"] == voice_presets.OPENAI_VOICES["alloy"]


# ----------------------------------------------------------------------------------------------------------------
# Wyoming


async def wyoming_exchange(port, events, until=(AudioStop.is_type, Error.is_type)):
    """Send `events` to the Wyoming server on `port`, then read until an event whose type one of `until` accepts;
    returns what was read."""
    received = []
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=10, read_timeout=WYOMING_SECONDS) as client:
        for event in events:
            await client.write_event(event.event())
        while True:
            event = await asyncio.wait_for(client.read_event(), WYOMING_SECONDS)
            assert event is not None, "the server closed the connection"
            received.append(event)
            if any(accept(event.type) for accept in until):
                return received


def wyoming_audio(events):
    """(AudioStart, pcm bytes) of a received event list."""
    start = AudioStart.from_event(next(event for event in events if AudioStart.is_type(event.type)))
    chunks = [AudioChunk.from_event(event) for event in events if AudioChunk.is_type(event.type)]
    assert all((chunk.rate, chunk.width, chunk.channels) == (start.rate, start.width, start.channels)
               for chunk in chunks)
    return start, b"".join(chunk.audio for chunk in chunks)


def test_wyoming_describe_lists_the_voices_and_languages(live):
    events = asyncio.run(wyoming_exchange(live.wyoming_port, [Describe()], until=(Info.is_type,)))
    program = Info.from_event(events[-1]).tts[0]
    names = {voice.name for voice in program.voices}
    assert set(voice_presets.OPENAI_VOICES) <= names and set(voice_presets.PRESETS) <= names
    assert program.supports_synthesize_streaming
    assert {language for voice in program.voices for language in voice.languages} == set(voice_presets.LANGUAGES)


def test_wyoming_synthesize_answers_audio_start_chunks_stop(live):
    request = Synthesize(text="Hello there.", voice=SynthesizeVoice("alloy"))
    events = asyncio.run(wyoming_exchange(live.wyoming_port, [request]))
    assert AudioStart.is_type(events[0].type) and AudioStop.is_type(events[-1].type)
    start, audio = wyoming_audio(events)
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    assert len(audio) == samples_at(24000) * 2


def test_wyoming_streaming_synthesis_speaks_each_sentence_and_ignores_the_compatibility_copy(live):
    text = ["Hello ", "there. How are", " you? Fine"]
    events = asyncio.run(wyoming_exchange(live.wyoming_port, [
        SynthesizeStart(voice=SynthesizeVoice("sage")), *[SynthesizeChunk(text=part) for part in text],
        Synthesize(text="".join(text)), SynthesizeStop()], until=(SynthesizeStopped.is_type, Error.is_type)))
    kinds = [event.type for event in events]
    assert kinds[0] == "audio-start" and kinds[-2:] == ["audio-stop", "synthesize-stopped"]
    assert kinds.count("audio-start") == 1
    _, audio = wyoming_audio(events)
    assert len(audio) == samples_at(24000, 3 * FRAMES) * 2  # three sentences, FRAMES each, nothing for the copy


def test_wyoming_streamed_text_without_a_sentence_end_is_refused_past_the_input_limit(live):
    limit = live.app.state.speech.service.options.max_input_chars
    events = asyncio.run(wyoming_exchange(live.wyoming_port, [
        SynthesizeStart(), SynthesizeChunk(text="word " * (limit // 5)), SynthesizeChunk(text="more words")]))
    assert [event.type for event in events] == ["error"]
    assert f"expected at most {limit}" in Error.from_event(events[0]).text


def test_wyoming_errors_answer_with_the_error_event_and_the_connection_goes_on(live):
    async def run():
        async with AsyncTcpClient("127.0.0.1", live.wyoming_port, connect_timeout=10) as client:
            await client.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice("nobody")).event())
            error = await asyncio.wait_for(client.read_event(), WYOMING_SECONDS)
            await client.write_event(SynthesizeChunk(text="no session").event())
            second = await asyncio.wait_for(client.read_event(), WYOMING_SECONDS)
            await client.write_event(Describe().event())
            info = await asyncio.wait_for(client.read_event(), WYOMING_SECONDS)
            return error, second, info

    error, second, info = asyncio.run(run())
    assert Error.is_type(error.type) and "nobody" in Error.from_event(error).text
    assert Error.is_type(second.type) and "synthesize-start" in Error.from_event(second).text
    assert Info.is_type(info.type)


def finished_requests(live):
    """moss_tts_speech_ended_total{outcome="finished"}: requests of either protocol that the engine completed."""
    metrics = live.app.state.speech.metrics
    return metrics.registry.get_sample_value("moss_tts_speech_ended_total", {"outcome": "finished"}) or 0.0


def test_http_and_wyoming_clients_at_once_share_one_engine(live, client):
    before = finished_requests(live)
    results = []

    def http():
        results.append(create(client, voice="coral", response_format="wav", stream=False).content)

    threads = [threading.Thread(target=http) for _ in range(2)]
    for thread in threads:
        thread.start()

    async def two_wyoming_clients():
        request = [Synthesize(text="Hello there.", voice=SynthesizeVoice("coral"))]
        exchanges = [wyoming_exchange(live.wyoming_port, request) for _ in range(2)]
        return await asyncio.wait_for(asyncio.gather(*exchanges), WYOMING_SECONDS)

    wyoming = asyncio.run(two_wyoming_clients())
    for thread in threads:
        thread.join(timeout=WYOMING_SECONDS)
    assert len(results) == 2
    for data in results:
        assert_audio(data, "wav", NATIVE_RATE, 2)
    for events in wyoming:
        assert len(wyoming_audio(events)[1]) == samples_at(24000) * 2
    assert finished_requests(live) - before == 4  # all four went through the one engine's request accounting


def test_serve_py_with_a_wyoming_port_serves_both_and_stops_cleanly_on_sigterm(repository, tmp_path):
    port, wyoming_port = loadtest.free_port(), loadtest.free_port()
    process = loadtest.launch_server(
        ["--model-path", repository, "--no-verify", "--device", "cpu", "--num-slots", 2, "--max-positions", 256,
         "--voices-dir", tmp_path / "voices", "--port", port, "--wyoming-port", wyoming_port, "--log-level",
         "warning"], tmp_path / "server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        loadtest.wait_until_ready(url, process, READY_SECONDS)
        events = asyncio.run(wyoming_exchange(wyoming_port, [Describe()], until=(Info.is_type,)))
        assert "alloy" in {voice.name for voice in Info.from_event(events[-1]).tts[0].voices}
        response = httpx.post(f"{url}/v1/audio/speech", timeout=60, json={
            "model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": "pcm", "max_new_frames": FRAMES})
        assert response.headers["x-moss-voice"] == "en_2" and len(response.content) == samples_at(24000) * 2
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_serve_py_refuses_a_bad_default_voice_before_loading(tmp_path):
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "serve.py"), "--default-voice", "Not A Name",
                                "--model-path", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "--default-voice" in completed.stderr


def test_start_up_loads_the_default_voice_and_stores_its_prompt_rows(repository, tmp_path, caplog):
    """The warm-up speaks once in the default voice: its codes are loaded and its prompt rows stored, so the first
    request that omits its voice (Home Assistant, most chat front ends) prefills only its text. The load line names
    the weight format the default (auto) applied, and an x86 CPU hears of int8 as the CLI's users do."""
    args = serve.build_parser().parse_args(["--model-path", str(repository), "--no-verify", "--device", "cpu",
                                            "--num-slots", "1", "--max-positions", "256", "--voices-dir",
                                            str(tmp_path / "voices")])
    with caplog.at_level(logging.INFO):
        service = serve.load_service(args)
    assert any("loaded: device=cpu dtype=float32" in line and "weights=fp32 kernels=" in line
               for line in caplog.messages), caplog.messages
    formats = import_module("weight_formats")
    assert any(line.startswith("hint: --weight-format int8") for line in caplog.messages) == \
        formats.int8_kernels_available()
    service.engine.start()
    try:
        service.warm_up()
        store = service.engine.prefixes
        assert (store.misses, store.hits, len(store)) == (2, 0, 2)  # the continuation template, the default voice
        assert service.engine.prefill_chunk_rows == import_module("settings.server_flags").DEFAULT_PREFILL_CHUNK_ROWS
        schema, engine = import_module("server.schema"), import_module("engine")
        body = schema.SpeechBody(model="tts-1", input="Good morning.", max_new_frames=1)  # no voice: the default
        final = list(service.submit(service.prepare(body), None).events(timeout=60))[-1]
        assert isinstance(final, engine.FinishedEvent)
        assert (store.misses, store.hits) == (2, 1)
    finally:
        assert service.engine.stop(drain=False, timeout=30)
