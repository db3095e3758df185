"""Bounded soak and schemathesis runs against a serve.py subprocess on 127.0.0.1 (tiny model, golden audible codec).

The soak (measurement/soak.py, what `loadtest.py --soak` runs) mixes valid requests, bad ones, clients that leave mid-stream and
clients that never read for SOAK_SECONDS; then no response may have been a 5xx, every request must have got what its
kind expects, and no slot or queue entry may be left. schemathesis (the OpenAPI schema of /openapi.json, coverage and
fuzzing phases) runs for at most SCHEMATHESIS_SECONDS and must find no 5xx.
"""

import asyncio
import json
import subprocess
import sys
from collections import Counter

import httpx
import pytest

from conftest import import_module
from test_server import READY_SECONDS, write_server_repository
from tiny_repository import HOP

loadtest = import_module("loadtest")
soak = import_module("measurement.soak")

KEY = "soak-key"
SOAK_SECONDS = 30.0
SCHEMATHESIS_SECONDS = 45
RSS_GROWTH_LIMIT_MB = 200  # a leak of a request's audio per request would pass this within the soak


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, prompt_wav):
    """serve.py with 4 slots and a queue of 16, its own voices folder, voice 'en' added. The queue holds what the
    soak's clients can have outstanding (the streams of clients that left or stopped reading end a little after them)
    while deadline scheduling serialises streams on a CPU measured too slow to play two at once (CI's legs share two
    cores): a valid request must never meet a full queue here; the 429 itself is tested in test_server.py."""
    folder = tmp_path_factory.mktemp("soak")
    repository = write_server_repository(folder / "repo")
    port = loadtest.free_port()
    process = loadtest.launch_server(
        ["--model-path", repository, "--no-verify", "--device", "cpu", "--num-slots", 4, "--max-queue", 16,
         "--max-positions", 512, "--voices-dir", folder / "voices", "--api-key", KEY, "--port", port,
         "--queue-timeout", 60, "--grace-seconds", 2, "--log-level", "warning"], folder / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        loadtest.wait_until_ready(url, process, READY_SECONDS)
        loadtest.add_voice(url, str(prompt_wav), KEY)  # voice "loadtest"
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
    log = (folder / "server.log").read_text()
    assert "Traceback" not in log, log


def test_bad_requests_take_every_bad_body_in_turn_whatever_the_loop_index():
    sent = []

    def answer(request: httpx.Request) -> httpx.Response:  # a server that refuses everything, naming the field
        try:
            body = json.loads(request.content)
        except ValueError:
            sent.append("not json")
            return httpx.Response(400, json={"error": {"param": None}})
        param = next(param for change, param in soak.BAD_BODIES if change.items() <= body.items())
        sent.append(param)
        return httpx.Response(400, json={"error": {"param": param}})

    async def run() -> soak.SoakClient:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            client = soak.SoakClient(http, "http://127.0.0.1:9", {"model": "tts-1"}, None)
            for turn in range(len(soak.BAD_BODIES) + 1):  # one loop's indices: each loop steps by len(KINDS) + 1
                await client.run("bad", turn * (len(soak.KINDS) + 1))
            return client

    client = asyncio.run(run())
    assert sent == [param for _, param in soak.BAD_BODIES] + ["not json"]
    assert client.failures == Counter() and client.statuses == Counter({("bad", 400): len(sent)})


def test_a_soak_of_mixed_and_hostile_clients_leaves_no_5xx_no_failure_and_no_held_slot(fault_server):
    report = asyncio.run(soak.soak(fault_server, SOAK_SECONDS, "loadtest", KEY, concurrency=4, frames=6,
                                   pcm_bytes_per_frame=HOP // 2 * 2))  # pcm: 24 kHz mono s16le
    print(report)
    assert report["server_errors_5xx"] == 0, report
    assert report["failures"] == {}, report
    assert report["leaked_slots"] == 0 and report["leaked_queue_entries"] == 0, report
    kinds = {key.split()[0] for key in report["by_kind"]}
    assert kinds == set(soak.KINDS), report  # every kind ran
    assert report["rss_end_mb"] - report["rss_start_mb"] < RSS_GROWTH_LIMIT_MB, report


def test_schemathesis_finds_no_server_error(fault_server, tmp_path):
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{fault_server}/openapi.json",
               "--checks", "not_a_server_error", "--phases", "examples,coverage,fuzzing",
               "--max-time", str(SCHEMATHESIS_SECONDS), "--max-examples", "25", "--request-timeout", "60",
               "--workers", "1", "--header", f"Authorization: Bearer {KEY}", "--no-color"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                               timeout=SCHEMATHESIS_SECONDS + 120)
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-2000:]
    assert httpx.get(f"{fault_server}/health").json()["active"] == 0
