"""Soak test of a running speech server: a mix of well-behaved, careless and hostile clients for a while, then what
the server has left behind (`python loadtest.py --soak SECONDS`).

Each of --concurrency client loops picks its next request from a fixed rotation until the time is up:

    valid        a streamed pcm request read to its end (with pcm_bytes_per_frame, its length is checked against
                 max_new_frames)
    valid_sse    stream_format sse read to its `speech.audio.done` event
    whole_file   stream=false
    bad          the next of BAD_BODIES in turn (each must be a 400 naming its field), then a body that is not JSON
    disconnect   a streamed request closed after its first audio chunk
    never_read   a raw connection that sends a request and never reads a byte, closed after NEVER_READ_SECONDS

The report: requests by kind and status, 5xx responses (must be 0), failures by kind (a wrong status, a short body, a
transport error), slots and queue entries still held SETTLE_SECONDS after the last client (both must be 0), and the
server's resident memory (process_resident_memory_bytes of /metrics) at the start and the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Optional

import httpx

# Requests the server must refuse with 400, naming the field (param).
BAD_BODIES = (
    ({"audio_top_p": 0}, "audio_top_p"),
    ({"audio_top_k": 0}, "audio_top_k"),
    ({"nq": 99}, "nq"),
    ({"voice_clone_max_text_tokens": 1}, "voice_clone_max_text_tokens"),
    ({"max_new_frames": 100000}, "max_new_frames"),
    ({"speed": 9}, "speed"),
    ({"ref_audio": "bm90IGF1ZGlv"}, "ref_audio"),
    ({"unknown_field": 1}, "unknown_field"),
)
KINDS = ("valid", "valid_sse", "bad", "disconnect", "whole_file", "never_read", "bad", "valid")
NEVER_READ_SECONDS = 2.0
# A never-read request asks for this many times more frames than the others (more than the socket buffers hold).
NEVER_READ_FRAMES_FACTOR = 8
SETTLE_SECONDS = 10.0


class SoakClient:
    """One client loop's requests against `url` (see the module docstring)."""

    def __init__(self, http: httpx.AsyncClient, url: str, body: dict, bytes_per_request: Optional[int]) -> None:
        self.http, self.url, self.body, self.bytes_per_request = http, url, body, bytes_per_request
        self.statuses: Counter = Counter()  # (kind, status)
        self.failures: Counter = Counter()  # (kind, reason)
        self.bad_sent = 0  # bad requests so far, over all loops: the next one takes the next bad body

    async def run(self, kind: str, index: int) -> None:
        try:
            status, problem = await getattr(self, kind)(index)
        except (httpx.HTTPError, OSError, asyncio.TimeoutError) as error:
            status, problem = "transport", type(error).__name__
        self.statuses[(kind, status)] += 1
        if problem is not None:
            self.failures[(kind, problem)] += 1

    async def valid(self, index: int):
        async with self.http.stream("POST", self.speech_url, json={**self.body, "seed": index}) as response:
            data = b"".join([chunk async for chunk in response.aiter_raw()])
        if response.status_code != 200:
            return response.status_code, f"status {response.status_code}"
        expected = self.bytes_per_request
        return 200, None if expected in (None, len(data)) else f"{len(data)} bytes, expected {expected}"

    async def valid_sse(self, index: int):
        body = {**self.body, "stream_format": "sse", "seed": index}
        async with self.http.stream("POST", self.speech_url, json=body) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        if response.status_code != 200:
            return response.status_code, f"status {response.status_code}"
        last = json.loads(lines[-1].removeprefix("data: ")) if lines else {}
        return 200, None if last.get("type") == "speech.audio.done" else f"last event {last.get('type')}"

    async def whole_file(self, index: int):
        response = await self.http.post(self.speech_url, json={**self.body, "stream": False, "seed": index})
        return response.status_code, None if response.status_code == 200 else f"status {response.status_code}"

    async def bad(self, index: int):
        turn, self.bad_sent = self.bad_sent % (len(BAD_BODIES) + 1), self.bad_sent + 1
        if turn == len(BAD_BODIES):
            response = await self.http.post(self.speech_url, content=b"{not json",
                                            headers={"Content-Type": "application/json"})
            return response.status_code, None if response.status_code == 400 else f"status {response.status_code}"
        change, param = BAD_BODIES[turn]
        response = await self.http.post(self.speech_url, json={**self.body, **change})
        named = response.status_code == 400 and response.json()["error"]["param"] == param
        return response.status_code, None if named else f"status {response.status_code}, not a 400 naming {param}"

    async def disconnect(self, index: int):
        async with self.http.stream("POST", self.speech_url, json={**self.body, "seed": index}) as response:
            if response.status_code == 200:
                async for _ in response.aiter_raw():
                    break  # leave after the first chunk
        return response.status_code, None if response.status_code == 200 else f"status {response.status_code}"

    async def never_read(self, index: int):
        """A request sent on a raw connection whose answer is never read; the connection is closed later."""
        host, _, port = self.url.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        frames = self.body["max_new_frames"] * NEVER_READ_FRAMES_FACTOR
        payload = json.dumps({**self.body, "seed": index, "max_new_frames": frames}).encode()
        headers = "".join(f"{name}: {value}\r\n" for name, value in self.http.headers.items()
                          if name.lower() == "authorization")
        writer.write(f"POST /v1/audio/speech HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n{headers}\r\n".encode() + payload)
        await writer.drain()
        await asyncio.sleep(NEVER_READ_SECONDS)
        writer.close()
        return "unread", None

    @property
    def speech_url(self) -> str:
        return f"{self.url}/v1/audio/speech"


async def server_numbers(http: httpx.AsyncClient, url: str) -> dict:
    """active / waiting slots (GET /health) and resident memory in MB (GET /metrics; None when not reported)."""
    health = (await http.get(f"{url}/health")).json()
    rss = None
    for line in (await http.get(f"{url}/metrics")).text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            rss = float(line.split()[1]) / 2**20
    return {"active": health.get("active"), "waiting": health.get("waiting"), "rss_mb": rss}


async def settle(http: httpx.AsyncClient, url: str, seconds: float) -> dict:
    """The server's numbers once nothing is active or waiting, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        numbers = await server_numbers(http, url)
        if (numbers["active"] == 0 and numbers["waiting"] == 0) or time.monotonic() > deadline:
            return numbers
        await asyncio.sleep(0.1)


async def soak(url: str, seconds: float, voice: Optional[str], api_key: Optional[str] = None, concurrency: int = 4,
               frames: int = 8, text: str = "Hello world. This is a soak test.",
               pcm_bytes_per_frame: Optional[int] = None) -> dict:
    """Run the mix for `seconds` with `concurrency` client loops; returns the report (module docstring).

    Args:
        voice: the voice of every request (None: continuation without a reference).
        frames: max_new_frames of a request.
        pcm_bytes_per_frame: when every request makes exactly `frames` frames (a model that never stops early, as
            loadtest's and the tests' are), the pcm bytes of one frame: a valid response of another length is a
            failure. None: lengths are not checked.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": "tts-1", "input": text, "response_format": "pcm", "max_new_frames": frames,
            **({"voice": voice} if voice else {"mode": "continuation"})}
    limits = httpx.Limits(max_connections=concurrency * 2 + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), headers=headers, limits=limits) as http:
        start = await server_numbers(http, url)
        client = SoakClient(http, url, body, frames * pcm_bytes_per_frame if pcm_bytes_per_frame else None)
        started = time.monotonic()
        await asyncio.gather(*[_client_loop(client, started + seconds, offset) for offset in range(concurrency)])
        duration = time.monotonic() - started
        end = await settle(http, url, SETTLE_SECONDS)
    return _report(client, duration, start, end)


async def _client_loop(client: SoakClient, until: float, offset: int) -> None:
    index = offset
    while time.monotonic() < until:
        await client.run(KINDS[index % len(KINDS)], index)
        index += len(KINDS) + 1  # each loop walks the rotation with its own phase


def _report(client: SoakClient, duration: float, start: dict, end: dict) -> dict:
    server_errors = sum(count for (_, status), count in client.statuses.items()
                        if isinstance(status, int) and status >= 500)
    return {
        "duration_s": round(duration, 1), "requests": sum(client.statuses.values()),
        "by_kind": {f"{kind} {status}": count for (kind, status), count in sorted(client.statuses.items(), key=str)},
        "server_errors_5xx": server_errors,
        "failures": {f"{kind}: {reason}": count for (kind, reason), count in sorted(client.failures.items())},
        "leaked_slots": end["active"], "leaked_queue_entries": end["waiting"],
        "rss_start_mb": _rounded(start["rss_mb"]), "rss_end_mb": _rounded(end["rss_mb"]),
    }


def _rounded(megabytes: Optional[float]) -> Optional[float]:
    return None if megabytes is None else round(megabytes, 1)


def report_ok(report: dict) -> bool:
    """No 5xx, no failure, nothing left behind."""
    return (report["server_errors_5xx"] == 0 and not report["failures"] and report["leaked_slots"] == 0
            and report["leaked_queue_entries"] == 0)


__all__ = ["BAD_BODIES", "KINDS", "SoakClient", "report_ok", "soak"]
