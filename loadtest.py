"""Load test of the speech server: N concurrent streaming HTTP clients against the full-size model, staggered arrivals.

    python loadtest.py --weight-format int8 --threads 2 --clients 2 4 8 12 16
    python loadtest.py --url http://127.0.0.1:8000 --voice alice --clients 4     # an already running server
    python loadtest.py --ray-replicas 2 --threads 1 --clients 4 8                # Ray Serve, 2 CPU replicas

Without --url it writes the released-size model with random weights (bench.py's seeded TTS with the stop decision
forced to "continue", so every request makes exactly --frames frames; bench.py's random codec) into a temporary
folder, starts `serve.py` on a free 127.0.0.1 port with --weight-format / --threads / --device, adds the reference
clip as a voice, runs every --clients level one after another, and stops the server with SIGTERM. With
--ray-replicas N it serves the same model with serve_ray.py instead: a local Ray instance on 127.0.0.1, N replicas of
--threads CPUs each (--num-slots per replica: the largest level over N), behind Serve's HTTP proxy, shut down at the
end (needs requirements-serve-ray.txt).

--soak SECONDS runs measurement/soak.py's mix instead of the levels (valid, bad, disconnecting and never-reading clients, --clients'
first value of them at once, --frames per request) and prints its report: requests by kind and status, 5xx (must be
0), failures by kind, slots and queue entries left behind (0), and the server's resident memory at the start and the
end; the exit code is 1 when any of those is wrong.

--small-requests N first sends N tiny requests one after another (GET /v1/models, and a 1-frame pcm speech request)
and prints their median and p90 latency: run it with and without --ray-replicas to see what the proxy adds.

Each client asks for `pcm` with stream_format `audio`; client i starts i * --stagger seconds after the first. Per
stream: time to first audio (request sent to first audio byte), real-time factor (request sent to last byte, over
the audio seconds), and underruns. Playback of a stream starts when its first audio arrives; it underruns when a
chunk arrives after the audio received before it has been played (received seconds < seconds since the first audio).
Per level: TTFA p50 / p95 / p99, the median and worst RTF, streams that underran, errors, and throughput (audio
seconds delivered per wall second). The last line names the largest level with no underrun and no error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from measurement import soak

REPO_ROOT = Path(__file__).resolve().parent
SHARED_DIR = Path(os.environ.get("MOSS_SHARED_DIR", REPO_ROOT.parent / "shared"))
DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog, and then it runs back home to sleep."
PCM_BYTES_PER_SECOND = 48000 * 2 * 2  # 48 kHz, stereo, 16-bit
# pcm defaults to 24 kHz mono (OpenAI's layout): the load test asks for the native layout that the line above counts.
NATIVE_PCM = {"sample_rate": 48000, "channels": 2}
READY_TIMEOUT_SECONDS = 900.0
# A local Ray instance that talks over 127.0.0.1 only: Ray takes the node's outward address unless multi-node
# clusters are switched off, and writes a token file to $HOME unless token authentication is. Read when ray is
# imported, so they are set before (tests/test_serve_ray.py sets them too).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


# ----------------------------------------------------------------------------------------------------------------
# The server under test


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_server(arguments: list, log_path: Path, env: Optional[dict] = None) -> subprocess.Popen:
    """`python serve.py ARGUMENTS` with its output in log_path."""
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), *map(str, arguments)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))


def wait_until_ready(url: str, process: Optional[subprocess.Popen], timeout: float) -> dict:
    """Poll GET /health until it answers 200; returns its JSON.

    Raises:
        RuntimeError: the process exited or `timeout` passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        try:
            response = httpx.get(f"{url}/health", timeout=2.0)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready after {timeout:.0f} s")


def write_random_model(folder: Path, tokenizer: Path) -> Path:
    """The released-size TTS (random, stop forced: bench.py) and codec (random: bench.py) as a model folder."""
    import torch

    import bench
    from local_package import import_module

    checkpoints = import_module("measurement.checkpoints")
    lm = bench.build_lm(argparse.Namespace(model_path=None), torch.device("cpu"))
    checkpoints.write_model_repository(folder, lm.config, lm.state_dict(), tokenizer_model=tokenizer,
                                       dtype=torch.float32)
    bench.build_codec(torch.device("cpu"), "fp32", "row-major").save_pretrained(str(folder / "audio_tokenizer"))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Clients


@dataclass
class StreamResult:
    """One client's stream, measured at the client."""

    ttfa: Optional[float] = None
    seconds: float = 0.0
    wall: float = 0.0
    underrun_seconds: float = 0.0
    error: Optional[str] = None

    @property
    def rtf(self) -> float:
        return self.wall / self.seconds if self.seconds else float("inf")


@dataclass
class Playback:
    """Playback of a stream that starts at its first audio; `arrive` records each chunk's arrival."""

    started: Optional[float] = None
    received: float = 0.0
    underrun: float = 0.0

    def arrive(self, now: float, seconds: float) -> None:
        if self.started is None:
            self.started = now
        else:
            self.underrun += max(0.0, (now - self.started) - self.received - self.underrun)
        self.received += seconds


async def one_stream(client, url: str, body: dict, delay: float) -> StreamResult:
    await asyncio.sleep(delay)
    result, playback, pending = StreamResult(), Playback(), 0
    started = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
            if response.status_code != 200:
                result.error = f"{response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for chunk in response.aiter_raw():
                now = time.perf_counter()
                if result.ttfa is None:
                    result.ttfa = now - started
                pending += len(chunk)
                playback.arrive(now, len(chunk) / PCM_BYTES_PER_SECOND)
    except Exception as error:  # any transport failure counts as this stream's error
        result.error = f"{type(error).__name__}: {error}"
    result.wall = time.perf_counter() - started
    result.seconds = pending / PCM_BYTES_PER_SECOND
    result.underrun_seconds = playback.underrun
    return result


async def run_level(url: str, clients: int, body: dict, stagger: float, api_key: Optional[str]) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers) as client:
        results = await asyncio.gather(*[one_stream(client, url, {**body, "seed": index}, index * stagger)
                                         for index in range(clients)])
    return summarise(clients, results, time.perf_counter() - started)


def percentile(values: list, share: float) -> float:
    """Nearest-rank percentile (share in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def summarise(clients: int, results: list, wall: float) -> dict:
    good = [result for result in results if result.error is None and result.ttfa is not None]
    ttfa = [result.ttfa for result in good] or [float("nan")]
    rtf = [result.rtf for result in good] or [float("nan")]
    return {
        "clients": clients, "errors": len(results) - len(good), "error_messages": [r.error for r in results if r.error],
        "ttfa_p50": percentile(ttfa, 0.50), "ttfa_p95": percentile(ttfa, 0.95), "ttfa_p99": percentile(ttfa, 0.99),
        "rtf_median": statistics.median(rtf), "rtf_worst": max(rtf),
        "underrun_streams": sum(result.underrun_seconds > 0 for result in good),
        "underrun_seconds": sum(result.underrun_seconds for result in good),
        "audio_seconds": sum(result.seconds for result in good), "wall_seconds": wall,
        "throughput": sum(result.seconds for result in good) / wall,
    }


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8, 12, 16], help="concurrency levels")
    parser.add_argument("--frames", type=int, default=120, help="frames per request (12.5 per second of audio)")
    parser.add_argument("--stagger", type=float, default=0.25, help="seconds between two clients' arrivals")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--url", default=None, help="test this running server instead of starting one")
    parser.add_argument("--voice", default=None, help="voice name on --url (default: add --ref-audio as a voice)")
    parser.add_argument("--api-key", default=os.environ.get("MOSS_TTS_API_KEY"))
    parser.add_argument("--ref-audio", default=str(SHARED_DIR / "assets" / "audio" / "en_2.wav"))
    parser.add_argument("--tokenizer", default=str(SHARED_DIR / "assets" / "tokenizer.model"))
    parser.add_argument("--weight-format", default="int8", help="serve.py --weight-format")
    parser.add_argument("--threads", type=int, default=2, help="serve.py --threads")
    parser.add_argument("--device", default="cpu", help="serve.py --device")
    parser.add_argument("--num-slots", type=int, default=0, help="serve.py --num-slots (0: the largest level)")
    parser.add_argument("--server-arg", action="append", default=[], help="one more serve.py argument (repeatable)")
    parser.add_argument("--ray-replicas", type=int, default=0,
                        help="serve with serve_ray.py on a local Ray instance, this many CPU replicas (0: serve.py)")
    parser.add_argument("--small-requests", type=int, default=0,
                        help="tiny requests to time one after another before the levels (0: none)")
    parser.add_argument("--json", action="store_true", help="also print the levels as JSON")
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help="run the soak mix (measurement/soak.py) for SECONDS instead of the levels (0: no soak)")
    return parser


def server_arguments(args, folder: Path, slots: int) -> list:
    """serve.py's flags for the model in `folder` (a Ray replica takes the same ones)."""
    return ["--model-path", folder / "model", "--no-verify", "--device", args.device, "--weight-format",
            args.weight_format, "--threads", args.threads, "--num-slots", slots, "--max-queue", max(args.clients),
            "--voices-dir", folder / "voices", "--log-level", "warning", *args.server_arg]


def start_local_server(args, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    arguments = server_arguments(args, folder, args.num_slots or max(args.clients))
    process = launch_server([*arguments, "--port", port], folder / "server.log")
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, process, READY_TIMEOUT_SECONDS)
    return process, url


def start_ray_application(args, folder: Path) -> str:
    """serve_ray.py's replicas on a new local Ray instance (Serve's proxy on a free 127.0.0.1 port); returns the URL."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    from ray import serve

    import serve_ray

    slots = args.num_slots or -(-max(args.clients) // args.ray_replicas)
    argv = [str(argument) for argument in server_arguments(args, folder, slots)]
    ray.init(address="local", num_cpus=args.ray_replicas * max(1, args.threads), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment = serve_ray.SpeechReplica.options(
        num_replicas=args.ray_replicas, max_ongoing_requests=slots,
        ray_actor_options=serve_ray.devices.ray_actor_options(args.device, max(1, args.threads)))
    serve.run(deployment.bind(argv), name="loadtest", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_ray_application() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def time_small_requests(url: str, count: int, voice: str, api_key: Optional[str]) -> dict:
    """Median and p90 seconds of `count` sequential GET /v1/models and 1-frame speech requests."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": "tts-1", "input": "Hi.", "voice": voice, "response_format": "pcm", "max_new_frames": 1,
            **NATIVE_PCM}
    seconds = {"GET /v1/models": [], "1-frame speech": []}
    with httpx.Client(timeout=60.0, headers=headers) as client:
        for _ in range(count):
            for name, send in (("GET /v1/models", lambda: client.get(f"{url}/v1/models")),
                               ("1-frame speech", lambda: client.post(f"{url}/v1/audio/speech", json=body))):
                started = time.perf_counter()
                send().raise_for_status()
                seconds[name].append(time.perf_counter() - started)
    return {name: (statistics.median(values), percentile(values, 0.9)) for name, values in seconds.items()}


def add_voice(url: str, clip: str, api_key: Optional[str]) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with open(clip, "rb") as handle:
        response = httpx.post(f"{url}/v1/audio/voices", files={"audio_sample": handle},
                              data={"name": "loadtest", "consent": "loadtest"}, headers=headers, timeout=300.0)
    if response.status_code not in (200, 409):
        raise RuntimeError(f"adding the voice failed: {response.status_code} {response.text}")
    return "loadtest"


def print_table(levels: list) -> None:
    print(f"{'clients':>7} {'TTFA p50':>9} {'p95':>7} {'p99':>7} {'RTF med':>8} {'worst':>6} {'underruns':>10} "
          f"{'errors':>6} {'audio s/s':>9}")
    for level in levels:
        print(f"{level['clients']:>7} {1000 * level['ttfa_p50']:>7.0f}ms {1000 * level['ttfa_p95']:>5.0f}ms "
              f"{1000 * level['ttfa_p99']:>5.0f}ms {level['rtf_median']:>8.3f} {level['rtf_worst']:>6.3f} "
              f"{level['underrun_streams']:>4}/{level['clients']:<5} {level['errors']:>6} {level['throughput']:>9.2f}")
    fine = [level["clients"] for level in levels if level["underrun_streams"] == 0 and level["errors"] == 0]
    print(f"largest level with no underrun and no error: {max(fine) if fine else 'none'}")


def pcm_bytes_per_frame(url: str, voice: str, args) -> Optional[int]:
    """The pcm bytes of one frame on a server this script started (its model never stops early), else None."""
    if args.url is not None:
        return None
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"model": "tts-1", "input": "Hi.", "voice": voice, "response_format": "pcm", "max_new_frames": 1}
    response = httpx.post(f"{url}/v1/audio/speech", json=body, headers=headers, timeout=120.0)
    response.raise_for_status()
    return len(response.content)


def print_soak(report: dict) -> int:
    """Print soak.soak's report; returns the exit code (1 when soak.report_ok says no)."""
    print(json.dumps(report, indent=2))
    good = soak.report_ok(report)
    print(f"soak: {report['requests']} requests in {report['duration_s']} s, {report['server_errors_5xx']} 5xx, "
          f"{report['leaked_slots']} slots and {report['leaked_queue_entries']} queue entries left, RSS "
          f"{report['rss_start_mb']} -> {report['rss_end_mb']} MB: {'ok' if good else 'FAILED'}", flush=True)
    return 0 if good else 1


def run(args, url: str, voice: str) -> list:
    body = {"model": "tts-1", "input": args.text, "voice": voice, "response_format": "pcm", "stream_format": "audio",
            "max_new_frames": args.frames, "runaway_guards": False, **NATIVE_PCM}  # the load asked for
    levels = [asyncio.run(run_level(url, clients, body, args.stagger, args.api_key)) for clients in args.clients]
    for clients, level in zip(args.clients, levels):
        for message in level["error_messages"][:3]:
            print(f"  error ({clients} clients): {message}", flush=True)
    return levels


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import bench
    from local_package import import_module

    print(f"loadtest: CPU {import_module('host').cpu_description()}, python "
          f"{platform.python_version()}, load average {bench.load_average()}", flush=True)
    print(f"  {args.frames} frames ({args.frames / 12.5:.1f} s) per stream, pcm, arrivals every {args.stagger} s",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="moss-loadtest-") as scratch:
        folder, process = Path(scratch), None
        try:
            if args.url is None:
                write_random_model(folder / "model", Path(args.tokenizer))
                if args.ray_replicas:
                    url = start_ray_application(args, folder)
                else:
                    process, url = start_local_server(args, folder)
                where = f"serve_ray.py, {args.ray_replicas} Ray replica(s) of" if args.ray_replicas else "serve.py"
                print(f"  server: {where} --weight-format {args.weight_format} --threads {args.threads} --device "
                      f"{args.device} {' '.join(args.server_arg)} on {url}", flush=True)
            else:
                url = args.url.rstrip("/")
            voice = args.voice or add_voice(url, args.ref_audio, args.api_key)
            if args.small_requests:
                for name, (median, p90) in time_small_requests(url, args.small_requests, voice,
                                                               args.api_key).items():
                    print(f"  {name}: median {1000 * median:.1f} ms, p90 {1000 * p90:.1f} ms "
                          f"({args.small_requests} sequential)", flush=True)
            if args.soak:
                return print_soak(asyncio.run(soak.soak(url, args.soak, voice, args.api_key, args.clients[0],
                                                        args.frames, args.text, pcm_bytes_per_frame(url, voice, args))))
            levels = run(args, url, voice)
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=120)
            if args.ray_replicas and args.url is None:
                stop_ray_application()
    print_table(levels)
    if args.json:
        print(json.dumps(levels, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
