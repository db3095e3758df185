"""The speech server as a Ray Serve application: serve.py's FastAPI app, one replica per device, behind Serve's proxy.

    ray start --head                       # then `ray start --address HEAD:6379` on every other node
    serve deploy serve_config.yaml         # or `serve run serve_config.yaml` in the foreground

Each replica is one speech server (server/app.py's create_app over serve.py's load_service: model, engine, voices)
mounted with `serve.ingress`; nothing of the server is rewritten here. What this file adds:

* `application(args)`, Serve's application builder (import_path `serve_ray:application`). `args` are serve.py's
  flags without their dashes (`model-path`, `device`, `num-slots`, ...; `true` for a bare flag such as `no-verify`).
  The replica's Ray resources come from --device: one card per replica (`{"NPU": 1}` on Ascend, `num_gpus: 1` on
  NVIDIA, CPUs only for `cpu`; devices.ray_actor_options) plus max(1, --threads) CPUs. A `ray_actor_options` in the
  config replaces them. Replica count, autoscaling, health-check and shutdown timing are Serve's own config keys.
* A replica loads and warms up before its startup ends, so Serve routes nothing to it until it can serve, and a
  failed load fails the replica (Serve retries it). It then checks Serve's per-replica limits against its engine
  (`check_replica_limits`): max_ongoing_requests between --num-slots and --num-slots + --max-queue, the autoscaling
  target at most --num-slots.
* `check_health` for Serve's health checks: the same test as the app's /health (server/app.py's health_problem: the
  service is loaded, the engine thread runs and has not stalled).
* Scale-down and redeploys drain: Serve stops routing to the replica and waits up to graceful_shutdown_timeout_s for
  its running streams (each is an ongoing request until its last byte), then the app's shutdown stops the engine.
* Every response names its replica: `x-moss-replica` (Serve's replica id) and `x-moss-replica-pid`.

Voices: give every replica the same --voices-dir on a shared file system; voice_library/store.py's VoiceStore rescans the folder on
every lookup, so a voice added through one replica is usable on all at once. Ray is an optional extra
(requirements-serve-ray.txt); nothing else in the repository imports it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import ray
import torch
from ray import serve
from ray.serve import Application

from local_package import import_module

devices = import_module("devices")
server_flags = import_module("settings.server_flags")
server_app_module = import_module("server.app")

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "SpeechReplica"
REPLICA_HEADER, PID_HEADER = "x-moss-replica", "x-moss-replica-pid"
# serve.py flags that Serve owns under Ray, and the config key to use instead.
SERVE_OWNED_FLAGS = {"host": "http_options.host", "port": "http_options.port",
                     "grace-seconds": "graceful_shutdown_timeout_s"}


# ----------------------------------------------------------------------------------------------------------------
# Configuration: serve.py's flags from the config's `args`, and Serve's limits against the engine


def server_argv(args: Mapping[str, Any]) -> list:
    """serve.py's command line for the config's `args` ({"model-path": "/m", "no-verify": True, "num-slots": 8}).

    Raises:
        ValueError: a flag that Serve owns under Ray (--host, --port, --grace-seconds).
    """
    argv = []
    for key, value in args.items():
        flag = str(key).strip().lstrip("-").replace("_", "-")
        if flag in SERVE_OWNED_FLAGS:
            raise ValueError(f"args {key!r}: Ray Serve sets this; use {SERVE_OWNED_FLAGS[flag]} in the Serve config")
        if value is True:
            argv.append(f"--{flag}")
        elif value not in (False, None):
            argv += [f"--{flag}", str(value)]
    return argv


def parse_server_args(argv: list):
    """serve.py's flags, parsed as serve.py parses them.

    Raises:
        ValueError: flags serve.py rejects (argparse writes its reason to stderr first).
    """
    try:
        parsed = server_flags.build_parser().parse_args(argv)
    except SystemExit as error:
        raise ValueError(f"serve.py flags {argv}: not accepted (argparse's message is above)") from error
    server_flags.check_server_flags(parsed)
    return parsed


def check_replica_limits(num_slots: int, max_queue: int, max_ongoing_requests: int,
                         target_ongoing_requests: Optional[float] = None) -> None:
    """Check Serve's per-replica limits against the engine of the replica.

    Serve sends a replica at most max_ongoing_requests at once and holds the rest at its proxy for the first replica
    with room. Below --num-slots, slots are never used; above --num-slots + --max-queue, clients get the engine's
    429 while Serve counts the replica as having room. The autoscaler adds replicas when the ongoing requests per
    replica exceed target_ongoing_requests; above --num-slots, that happens only once requests queue in the engines.

    Raises:
        ValueError: naming the Serve setting, its value and the range the engine allows.
    """
    if not num_slots <= max_ongoing_requests <= num_slots + max_queue:
        raise ValueError(f"max_ongoing_requests={max_ongoing_requests}; expected {num_slots} to "
                         f"{num_slots + max_queue} for an engine of {num_slots} slots (--num-slots) and a queue of "
                         f"{max_queue} (--max-queue): set it to --num-slots")
    if target_ongoing_requests is not None and not 0 < target_ongoing_requests <= num_slots:
        raise ValueError(f"autoscaling_config.target_ongoing_requests={target_ongoing_requests}; expected more "
                         f"than 0 and at most --num-slots={num_slots} (about 3/4 of it scales out before the slots "
                         "are full)")


def _serve_limits() -> tuple:
    """(max_ongoing_requests, target_ongoing_requests or None) of this replica's deployment config."""
    config = serve.get_replica_context()._deployment_config  # Ray 2.60: no public accessor for a replica's own
    autoscaling = config.autoscaling_config
    return config.max_ongoing_requests, None if autoscaling is None else autoscaling.get_target_ongoing_requests()


# ----------------------------------------------------------------------------------------------------------------
# The replica


class _ReplicaHeaders:
    """ASGI middleware: every HTTP response carries the replica's id and process id."""

    def __init__(self, app, replica: str) -> None:
        self.app = app
        self.headers = [(REPLICA_HEADER.encode(), replica.encode()), (PID_HEADER.encode(), str(os.getpid()).encode())]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SpeechReplica:
    """One speech server on one device: serve.py's app, loaded and warmed up before Serve routes to it."""

    def __init__(self, argv: list) -> None:
        self.args = parse_server_args(argv)
        check_accelerator(self.args.device)
        if self.args.num_slots:  # known before loading: a mismatch fails before the model loads
            check_replica_limits(self.args.num_slots, self.args.max_queue, *_serve_limits())
        if self.args.threads > 0:
            torch.set_num_threads(self.args.threads)
        self.server_app = server_app_module.create_app(self._load, api_key=self.args.api_key, load_before_serving=True,
                                                   prepare_workers=self.args.prepare_workers,
                                                   stall_seconds=self.args.engine_stall_seconds)
        self.server_app.add_middleware(_ReplicaHeaders, replica=serve.get_replica_context().replica_tag)

    def __serve_build_asgi_app__(self):
        return self.server_app

    def _load(self):
        service = server_flags.load_service(self.args)
        limits = _serve_limits()
        if not self.args.num_slots:  # sized from free memory while loading
            check_replica_limits(service.engine.num_slots, service.engine.max_queue, *limits)
        logger.info("replica %s (pid %d): %d slots, max_ongoing_requests=%d, target_ongoing_requests=%s",
                    serve.get_replica_context().replica_tag, os.getpid(), service.engine.num_slots, *limits)
        return service

    def check_health(self) -> None:
        """Serve's health check: raises while this replica cannot serve (Serve then replaces it)."""
        problem = health_problem(self.server_app.state.speech)
        if problem is not None:
            raise RuntimeError(problem)


# Why a replica cannot serve, or None: the app's own /health test (one test for both).
health_problem = server_app_module.health_problem


def check_accelerator(device: str) -> None:
    """A replica on an accelerator must hold one of Ray's cards, or every replica of a node shares card 0."""
    resource = devices.RAY_RESOURCES.get(devices.ray_replica_type(device))
    if resource is not None and not ray.get_runtime_context().get_accelerator_ids().get(resource):
        raise ValueError(f"device {device!r}, but Ray gave this replica no {resource}: its ray_actor_options in the "
                         f"Serve config must ask for one ({devices.ray_actor_options(device, 1)})")


def application(args: Mapping[str, Any]) -> Application:
    """Serve's application builder: serve.py's flags from `args`, the replica's resources from --device.

    Raises:
        ValueError: flags serve.py rejects, one that Serve owns, or a --device Ray cannot place (devices.py).
    """
    argv = server_argv(args)
    parsed = parse_server_args(argv)
    for flag, path in (("model-path", parsed.model_path), ("voices-dir", parsed.voices_dir)):
        if path is not None and not os.path.isabs(path):
            raise ValueError(f"args {flag}={path!r}: expected an absolute path, the same on every node (a replica's "
                             "working folder is Ray's, not yours)")
    options = devices.ray_actor_options(parsed.device, num_cpus=max(1, parsed.threads))
    return SpeechReplica.options(ray_actor_options=options).bind(argv)


__all__ = ["DEPLOYMENT_NAME", "PID_HEADER", "REPLICA_HEADER", "SpeechReplica", "application", "check_accelerator",
           "check_replica_limits", "health_problem", "parse_server_args", "server_argv"]
