"""The speech server as a Ray Serve application (serve_ray.py, serve_config.yaml) on a local Ray instance.

The live tests share one Ray instance, started here on 127.0.0.1 (4 logical CPUs, no dashboard) and shut down at the
end. The application is deployed as a user deploys it: serve_config.yaml with this test's values (the tiny model on
CPU, 2 slots, two replicas, one voices folder) through Serve's own CLI (`serve run CONFIG --non-blocking`). The
official openai SDK talks to Serve's HTTP proxy; each response names its replica (x-moss-replica-pid).

Faults: a client that leaves mid-stream; a replica killed with SIGKILL while it streams and while requests wait for
it (what each client sees is checked); a scale-down from two replicas to one while the replica that goes still
streams.

Ray is an optional extra (requirements-serve-ray.txt): without it this module skips with the reason, except under
CI=true, where it fails (CI's leg 1 installs the extra).
"""

import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest

from conftest import REPO_ROOT, import_module, optional_module

loadtest = import_module("loadtest")
serve_script = import_module("serve")
for key, value in loadtest.LOCAL_RAY_ENV.items():  # Ray on 127.0.0.1 only; read when ray is imported
    os.environ.setdefault(key, value)

ray = optional_module("ray", "pip install -r requirements-serve-ray.txt")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # Ray 2.60's schemas use pydantic's deprecated Field extras
    serve = optional_module("ray.serve", "pip install -r requirements-serve-ray.txt")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
yaml = pytest.importorskip("yaml")

import serve_ray  # noqa: E402  (top-level, as Ray imports it: import_path serve_ray:application)
from ray.serve.schema import ServeDeploySchema  # noqa: E402
from test_server import (HOP, NATIVE_LAYOUT, assert_equal_to_16_bit_rounding, pcm_samples,  # noqa: E402
                         write_server_repository)

CONFIG = REPO_ROOT / "serve_config.yaml"
APP = "moss-tts"
SLOTS = 2
BYTES_PER_FRAME = HOP * 4  # 16-bit stereo pcm
READY_SECONDS = 180
KILL_FRAMES = 120  # long enough that the killed replica is mid-stream, short enough to finish soon after
DRAIN_FRAMES = 200  # a replica's 2 rounds of streams outlast the scale-down command


# ----------------------------------------------------------------------------------------------------------------
# The config and its checks (no Ray instance)


def shipped_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_the_shipped_config_is_a_valid_serve_config_whose_limits_fit_the_engine():
    config = shipped_config()
    ServeDeploySchema.model_validate(config)  # Serve's own schema: unknown or mistyped keys raise
    application = config["applications"][0]
    assert application["import_path"] == "serve_ray:application"
    args = serve_ray.parse_server_args(serve_ray.server_argv(application["args"]))
    deployment = application["deployments"][0]
    assert deployment["name"] == serve_ray.DEPLOYMENT_NAME
    serve_ray.check_replica_limits(args.num_slots, args.max_queue, deployment["max_ongoing_requests"],
                                   deployment["autoscaling_config"]["target_ongoing_requests"])
    assert args.device == "npu"
    built = serve_ray.application(application["args"])  # resources from --device
    assert isinstance(built, serve.Application)


def test_config_mistakes_raise_value_errors_naming_the_value():
    with pytest.raises(ValueError, match="'port'.*http_options.port"):
        serve_ray.server_argv({"port": 9000})
    assert serve_ray.server_argv({"model_path": "/m", "no-verify": True, "no-progress": False, "num-slots": 4}) == [
        "--model-path", "/m", "--no-verify", "--num-slots", "4"]
    with pytest.raises(ValueError, match="--num-slots"):
        serve_ray.parse_server_args(["--num-slots", "many"])
    with pytest.raises(ValueError, match="max_ongoing_requests=5; expected 8 to 12"):
        serve_ray.check_replica_limits(8, 4, 5)
    with pytest.raises(ValueError, match="max_ongoing_requests=13; expected 8 to 12"):
        serve_ray.check_replica_limits(8, 4, 13)
    with pytest.raises(ValueError, match="target_ongoing_requests=9"):
        serve_ray.check_replica_limits(8, 4, 8, 9)
    serve_ray.check_replica_limits(8, 4, 12, 6)
    with pytest.raises(ValueError, match="voices-dir='voices'"):
        serve_ray.application({"device": "cpu", "voices-dir": "voices"})
    with pytest.raises(ValueError, match="'auto' for a Ray Serve replica"):
        serve_ray.application({"device": "auto", "voices-dir": "/v"})


def test_health_fails_until_the_service_is_loaded_and_after_its_engine_stops(tmp_path):
    speech_server = import_module("server.app")
    state = speech_server.ServerState()
    assert "still loading" in serve_ray.health_problem(state)
    state.error = "ValueError: bad weights"
    assert "bad weights" in serve_ray.health_problem(state)
    repository = write_server_repository(tmp_path / "repo")
    args = serve_script.build_parser().parse_args(["--model-path", str(repository), "--no-verify", "--device", "cpu",
                                                   "--num-slots", "1", "--voices-dir", str(tmp_path / "voices")])
    state.service = serve_script.load_service(args)
    state.service.engine.start()
    assert serve_ray.health_problem(state) is None
    assert state.service.engine.stop(drain=True, timeout=10)
    assert serve_ray.health_problem(state) == "the speech engine's thread has stopped"


# ----------------------------------------------------------------------------------------------------------------
# A live Ray instance


class Deployed:
    """The application on the module's Ray instance: its URL, and redeploys of its config."""

    def __init__(self, folder, address: str) -> None:
        self.folder, self.address = folder, address
        self.port = loadtest.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.repository = write_server_repository(folder / "repo")

    def config(self, replicas: int) -> dict:
        """serve_config.yaml with this test's values: the tiny model on CPU, `replicas` fixed replicas."""
        config = shipped_config()
        config["http_options"] = {"host": "127.0.0.1", "port": self.port}
        application = config["applications"][0]
        application["runtime_env"]["env_vars"]["PYTHONPATH"] = str(REPO_ROOT)
        application["args"].update({
            "model-path": str(self.repository), "no-verify": True, "device": "cpu", "threads": 1,
            "num-slots": SLOTS, "max-queue": 4, "max-positions": 2048, "voices-dir": str(self.folder / "voices"),
            "stream-policy": "every-frame"})
        deployment = application["deployments"][0]
        del deployment["autoscaling_config"]
        # One request may wait in each engine's queue: a request the replica accepted but has not started.
        deployment.update(num_replicas=replicas, max_ongoing_requests=SLOTS + 1)
        return config

    def deploy(self, replicas: int) -> None:
        """`serve run CONFIG --non-blocking` against this Ray instance; returns once Serve has the config."""
        path = self.folder / f"serve_config_{replicas}.yaml"
        path.write_text(yaml.safe_dump(self.config(replicas)))
        result = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "run", str(path), "--non-blocking",
                                 "--address", self.address], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    def replica_states(self) -> dict:
        application = serve.status().applications.get(APP)
        if application is None:
            return {}
        deployment = application.deployments.get(serve_ray.DEPLOYMENT_NAME)
        return {} if deployment is None else {str(getattr(k, "value", k)): v for k, v in
                                              deployment.replica_states.items()}

    def wait_for(self, states: dict, seconds: float = READY_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while self.replica_states() != states:
            assert time.monotonic() < deadline, f"replicas {self.replica_states()}, expected {states}"
            time.sleep(0.2)

    def client(self, **keywords):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=120, **keywords)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        application = Deployed(tmp_path_factory.mktemp("serve_ray"), ray.get_runtime_context().gcs_address)
        application.deploy(replicas=2)
        application.wait_for({"RUNNING": 2})
        yield application
    finally:
        serve.shutdown()
        ray.shutdown()


class Listener:
    """One streaming speech request through the openai SDK, on a thread of its own."""

    def __init__(self, client, frames: int, seed: int, voice: str = "none", **extra) -> None:
        self.client, self.frames, self.seed, self.voice, self.extra = client, frames, seed, voice, extra
        self.pid, self.data, self.error = None, bytearray(), None
        self.first_at = self.ended_at = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"max_new_frames": self.frames, "seed": self.seed, "runaway_guards": False, **NATIVE_LAYOUT,
                **self.extra}
        if self.voice == "none":
            body["mode"] = "continuation"
        try:
            with self.client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice=self.voice, input="Hello world.", response_format="pcm",
                    extra_body=body) as response:
                self.pid = int(response.headers[serve_ray.PID_HEADER])
                for chunk in response.iter_bytes():
                    if self.first_at is None:
                        self.first_at = time.monotonic()
                    self.data += chunk
        except Exception as error:  # what the client sees: any exception is recorded and judged by the test
            self.error = error
        self.ended_at = time.monotonic()

    @property
    def complete(self) -> bool:
        return self.error is None and len(self.data) == self.frames * BYTES_PER_FRAME

    def join(self, seconds: float = 120) -> None:
        self.thread.join(seconds)
        assert not self.thread.is_alive(), "a stream did not end"


def wait_until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_replica_on_an_accelerator_needs_a_card_from_ray(deployed):
    serve_ray.check_accelerator("cpu")
    with pytest.raises(ValueError, match="device 'cuda', but Ray gave this replica no GPU.*'num_gpus': 1"):
        serve_ray.check_accelerator("cuda")  # this process holds no GPU of Ray's, as a replica without num_gpus
    with pytest.raises(ValueError, match="no NPU.*'resources': {'NPU': 1}"):
        serve_ray.check_accelerator("npu")


def test_requests_spread_over_both_replicas_and_share_one_voice_store(deployed, prompt_wav):
    client = deployed.client(max_retries=0)
    created = client.audio.voices.create(name="en", audio_sample=("en.wav", prompt_wav.read_bytes(), "audio/wav"),
                                         consent="test")  # stored by one replica, in the shared folder
    assert created.id == "en"
    # 2 replicas x (2 slots + 1 queued) = 6 at once: Serve must use both replicas for 6 concurrent requests.
    listeners = [Listener(client, frames=40, seed=7, voice="en") for _ in range(6)]
    for listener in listeners:
        listener.join()
    assert all(listener.complete for listener in listeners), [repr(listener.error) for listener in listeners]
    assert len({listener.pid for listener in listeners}) == 2  # both replicas served the voice
    reference = pcm_samples(bytes(listeners[0].data))
    for listener in listeners[1:]:  # the same request gives the same audio on either replica
        assert_equal_to_16_bit_rounding(pcm_samples(bytes(listener.data)), reference)
    for _ in range(4):  # whichever replica answers lists it
        listed = httpx.get(f"{deployed.url}/v1/audio/voices").json()["data"]
        assert [voice["id"] for voice in listed if voice["kind"] == "upload"] == ["en"]


def test_a_client_that_leaves_mid_stream_frees_its_slot_through_the_proxy(deployed):
    body = {"model": "tts-1", "voice": "none", "input": "Hello world.", "mode": "continuation",
            "response_format": "pcm", "max_new_frames": 1500, "runaway_guards": False, **NATIVE_LAYOUT}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{deployed.url}/v1/audio/speech", json=body) as response:
            next(response.iter_raw())
            pid = response.headers[serve_ray.PID_HEADER]
    # The proxy cancels the replica's request; the engine drops it at its next frame. /health lands on either
    # replica: read the one that streamed.
    def idle() -> bool:
        answer = httpx.get(f"{deployed.url}/health")
        return answer.headers[serve_ray.PID_HEADER] == pid and answer.json()["active"] == 0

    wait_until(idle, 10)


def test_a_killed_replica_loses_no_request_that_had_not_started_streaming(deployed):
    statuses = []
    http = httpx.Client(event_hooks={"response": [lambda response: statuses.append(response.status_code)]},
                        timeout=120)
    client = deployed.client(http_client=http)  # the SDK's default retries (2), as a user's client has them
    # 8 requests: 2 stream and 1 waits in each replica; 2 wait in Serve's proxy.
    listeners = [Listener(client, frames=KILL_FRAMES, seed=seed) for seed in range(8)]
    wait_until(lambda: sum(listener.first_at is not None for listener in listeners) >= 2 * SLOTS, 60)
    victim = next(listener.pid for listener in listeners if listener.first_at is not None)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for listener in listeners:
        listener.join()
    cut = [listener for listener in listeners if listener.pid == victim and listener.first_at is not None
           and listener.first_at < killed_at and listener.ended_at > killed_at]
    assert cut, "no stream was running on the killed replica"
    for listener in listeners:
        if listener in cut:  # the client sees the broken stream as an error, never as a shorter complete file
            assert listener.error is not None and len(listener.data) < KILL_FRAMES * BYTES_PER_FRAME
            assert isinstance(listener.error, (httpx.RemoteProtocolError, openai.APIConnectionError)), \
                repr(listener.error)
        else:  # not yet streaming (or streaming elsewhere): served in full, on a live replica
            assert listener.complete, repr(listener.error)
            assert listener.pid != victim
    # The victim's accepted-but-waiting request got a clean 500 from the proxy, and the SDK retried it elsewhere.
    assert 500 in statuses
    deployed.wait_for({"RUNNING": 2})  # Serve replaced the replica


def wait_until_the_proxy_routes_to(deployed, replicas: int, seconds: float = 60) -> None:
    """Serve's controller reports a new replica RUNNING before every proxy router has learned of it; until then the
    router sends everything to the replicas it knows (once, all six streams of the scale-down test landed on one
    replica). Poll /health through the proxy until `replicas` different replica processes have answered."""
    seen, deadline = set(), time.monotonic() + seconds
    while len(seen) < replicas:
        assert time.monotonic() < deadline, f"the proxy routed only to {seen} in {seconds} s"
        seen.add(httpx.get(f"{deployed.url}/health").headers[serve_ray.PID_HEADER])
        time.sleep(0.02)


def test_scaling_down_drains_the_streams_of_the_replica_that_goes(deployed):
    client = deployed.client(max_retries=0)
    wait_until_the_proxy_routes_to(deployed, 2)  # then each replica takes at most max_ongoing_requests: 3 and 3
    # 6 requests fill both replicas (2 slots + 1 queued each, Serve's max_ongoing_requests).
    listeners = [Listener(client, frames=DRAIN_FRAMES, seed=seed) for seed in range(2 * (SLOTS + 1))]
    wait_until(lambda: sum(listener.first_at is not None for listener in listeners) >= 2 * SLOTS, 60)
    assert len({listener.pid for listener in listeners if listener.first_at is not None}) == 2
    deployed.deploy(replicas=1)
    wait_until(lambda: deployed.replica_states().get("STOPPING") == 1, 60)
    stopping_at = time.monotonic()
    for listener in listeners:
        listener.join()
    survivor = int(httpx.get(f"{deployed.url}/health").headers[serve_ray.PID_HEADER])
    leaving = [listener for listener in listeners if listener.pid != survivor]
    assert any(listener.ended_at > stopping_at for listener in leaving)  # it still streamed while stopping
    assert all(listener.complete for listener in listeners), [repr(listener.error) for listener in listeners]
    deployed.wait_for({"RUNNING": 1}, 60)
