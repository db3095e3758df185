"""The server's text fields on a live server (127.0.0.1, tiny model): `normalize`, `language`, the spoken text in a
header and in the SSE done event, and one speech.caption event per chunk."""

import base64
import json
from urllib.parse import unquote

import httpx
import pytest

from tiny_repository import HOP
from test_server import LiveServer, write_server_repository

FRAMES = 3
WRITTEN = "**Total:** $20.50\n- Meet at 3:30 pm 🎉"
SPOKEN = "Total: twenty dollars and fifty cents. Meet at three thirty PM."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = write_server_repository(tmp_path_factory.mktemp("text_server_repo"))
    live = LiveServer(["--model-path", repository, "--no-verify", "--device", "cpu", "--num-slots", 2,
                       "--max-queue", 4, "--max-positions", 256, "--voices-dir", tmp_path_factory.mktemp("voices"),
                       "--stream-policy", "every-frame"])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def body(prompt_wav):
    return {"model": "tts-1", "input": WRITTEN, "ref_audio": base64.b64encode(prompt_wav.read_bytes()).decode(),
            "response_format": "pcm", "max_new_frames": FRAMES, "seed": 3, "voice_clone_max_text_tokens": 16}


def _post(server, body, **changes):
    return httpx.post(f"{server.url}/v1/audio/speech", json={**body, **changes}, timeout=60)


def test_input_is_normalized_by_default_and_the_spoken_text_is_in_a_header(server, body):
    response = _post(server, body)
    assert response.status_code == 200, response.text
    assert unquote(response.headers["x-moss-spoken-text"]) == SPOKEN


def test_normalize_false_speaks_the_input_as_given(server, body):
    response = _post(server, body, input="It is 5 pm.", normalize=False)
    assert response.status_code == 200, response.text
    assert unquote(response.headers["x-moss-spoken-text"]) == "It is 5 pm."


def test_language_picks_the_number_rules(server, body):
    response = _post(server, body, input="Es kostet 5 €.", language="de")
    assert unquote(response.headers["x-moss-spoken-text"]) == "Es kostet fünf Euro."


def test_an_unknown_language_is_a_400_naming_the_field(server, body):
    response = _post(server, body, language="xx")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "language" and "expected one of" in error["message"]


def test_input_with_nothing_to_speak_is_a_400_naming_input(server, body):
    response = _post(server, body, input="🎉🎉")
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


def test_sse_sends_a_caption_per_chunk_and_the_spoken_text_when_done(server, body):
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json={**body, "stream_format": "sse"},
                      timeout=60) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    captions = [event for event in events if event["type"] == "speech.caption"]
    assert [caption["text"] for caption in captions] == ["Total: twenty dollars and fifty cents.",
                                                         "Meet at three thirty PM."]
    chunk_seconds = FRAMES * HOP / 48000
    assert captions[0]["start"] == 0.0 and captions[0]["end"] == pytest.approx(chunk_seconds, abs=1e-3)
    assert captions[1]["start"] > captions[0]["end"]  # the pause between chunks is not captioned
    assert captions[1]["end"] - captions[1]["start"] == pytest.approx(chunk_seconds, abs=1e-3)
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["spoken_text"] == SPOKEN
    last_delta = max(index for index, event in enumerate(events) if event["type"] == "speech.audio.delta")
    assert events.index(captions[1]) > last_delta  # the last caption once all its audio is sent


def test_a_runaway_chunk_is_ended_early_counted_and_reported(server, body):
    request = {**body, "input": "Hi.", "max_new_frames": 150, "stream_format": "sse"}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=request, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    (stop,) = done["runaway_stops"]
    assert stop["chunk"] == 0 and stop["reason"] in ("frame_cap", "loop", "silence")
    assert done["usage"]["output_tokens"] == stop["frames"] <= 44  # "Hi.": 3 s + 1 syllable at 2/s = 3.5 s
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert f'moss_tts_runaway_chunks_total{{reason="{stop["reason"]}"}} 1.0' in metrics


def test_runaway_guards_false_runs_to_max_new_frames(server, body):
    response = _post(server, body, input="Hi.", max_new_frames=60, runaway_guards=False)
    assert len(response.content) == 60 * (HOP // 2) * 2  # pcm: 24 kHz mono s16le
