"""`minillm serve --replicas N`: N engine replicas (replica.py) behind Ray Serve, answering the same routes
as one `minillm serve`. Ray Serve's HTTP proxy hands every request to the front deployment (`Front`), which
reads its body, finds its routing key (prefix_router.py) and forwards it through a Ray Serve handle to
the replica the prefix-aware router picks; the replica's response streams back the same way. Ray starts
the replicas, restarts one whose process dies (its requests in flight get a 503, or an error event if
their stream had begun) and routes nothing to it until its model has loaded again.

`build_app` is the Ray Serve application, for `serve.run` on an existing Ray cluster (or `serve run
minillm.server.replicas:app_builder ...`: docs/scale_out.md); `run` starts a Ray instance on this machine
for the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import ray
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..loading import default_model_path, open_tokenizer
from .formats import sse
from .guard import Guard
from .prefix_router import PrefixAwareRouter, ReplicaRouter, routing_key
from .protocol import APIError, error_shape
from .replica import REPLICA_HEADER, EngineReplica, Forwarded

APP_NAME, ENGINES = "minillm", "EngineReplica"
PREFIX_CHARS = 1024  # characters of a prompt's start that route it (~250 tokens: 16 blocks of 16)
REPLICA_MAX_ONGOING = 512  # requests Ray sends one replica at once: its engine batches and queues them itself
HEALTH_WAIT = 2.0  # seconds /health waits for a replica that can answer (none while the models load)
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@serve.deployment(max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Front:
    """The HTTP entry: forwards each request to a replica chosen by its prompt's start. /metrics gathers
    every replica's metrics (each series labeled with its replica), stored Responses are looked up on
    every replica. The replicas check API keys; the front only bounds bodies (size, time to arrive)."""

    def __init__(self, engines: DeploymentHandle, num_replicas: int, max_body_bytes: int, read_timeout: float,
                 prefix_chars: int) -> None:
        self.engines = engines.options(stream=True)
        self.num_replicas, self.prefix_chars = num_replicas, prefix_chars
        self.guard = {"api_key": None, "public": (), "max_body_bytes": max_body_bytes, "body_timeout": read_timeout}

    def __serve_build_asgi_app__(self) -> Guard:
        app = Starlette(routes=[Route("/health", self.health), Route("/metrics", self.metrics),
                                Route("/{path:path}", self.forward, methods=_METHODS)])
        return Guard(app, **self.guard)

    async def forward(self, request: Request) -> Response:
        try:
            body = await request.body()
        except HTTPException as err:  # the Guard's 413 and 408
            return _error(request.url.path, APIError(err.status_code, str(err.detail)))
        path = request.url.path
        if len(body) > 1 << 16:  # a big body is parsed off the event loop
            key = await asyncio.to_thread(routing_key, path, body, self.prefix_chars)
        else:
            key = routing_key(path, body, self.prefix_chars)
        forwarded = _forwarded(request, body, key)
        if path == "/v1/responses" or path.startswith("/v1/responses/"):
            return await self._responses(forwarded)
        return await self._relay(forwarded)

    async def health(self, request: Request) -> Response:
        """A replica's /health (200 once one can serve), or 503 while none has its model loaded."""
        try:
            return await asyncio.wait_for(self._relay(_forwarded(request, b"")), HEALTH_WAIT)
        except asyncio.TimeoutError:
            return JSONResponse({"status": "loading", "detail": "no engine replica is ready yet"}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        """Every replica's /metrics in one exposition, each series labeled `replica`."""
        answers = await self._each_replica(_forwarded(request, b""))
        failed = [a for a in answers.values() if a[0] != 200]
        if failed:  # say, 401 without the API key
            return _response(*failed[0])
        return Response(merged_metrics({rid: a[2].decode() for rid, a in answers.items()}),
                        media_type="text/plain; version=0.0.4")

    async def _responses(self, request: Forwarded) -> Response:
        """Stored responses live on the replica that made them: GET and DELETE ask every replica, and a
        request continuing one (`previous_response_id`) goes to its replica."""
        if request.method in ("GET", "DELETE"):
            answers = list((await self._each_replica(request)).values())
            return _response(*next((a for a in answers if a[0] != 404), answers[0]))
        previous = _previous_response_id(request.body)
        if previous is not None:
            lookup = Forwarded("GET", f"/v1/responses/{previous}", b"", request.headers, b"")
            for index in range(self.num_replicas):
                status, _, _ = await self._collect(replace(lookup, replica_index=index))
                if status == 200:
                    return await self._relay(replace(request, replica_index=index))
        return await self._relay(request)

    async def _relay(self, request: Forwarded) -> Response:
        """The chosen replica's response, streamed as it comes; a clean 5xx if the replica fails first."""
        stream: DeploymentResponseGenerator = self.engines.remote(request)
        try:
            start = await stream.__anext__()
        except RayError as err:
            return _error(request.path, _replica_error(err))
        except asyncio.CancelledError:  # the client went away, or /health stopped waiting
            stream.cancel()
            raise
        events = dict(start["headers"]).get(b"content-type", b"").startswith(b"text/event-stream")
        response = StreamingResponse(_body(stream, request.path, events), status_code=start["status"])
        response.raw_headers = list(start["headers"])
        return response

    async def _collect(self, request: Forwarded) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """A replica's whole answer: status, headers, body."""
        stream: DeploymentResponseGenerator = self.engines.remote(request)
        try:
            messages = [message async for message in stream]
        except RayError as err:
            error = _replica_error(err)
            return error.status, [(b"content-type", b"application/json")], _error(request.path, error).body
        return messages[0]["status"], messages[0]["headers"], b"".join(m.get("body", b"") for m in messages[1:])

    async def _each_replica(self, request: Forwarded) -> dict[str, tuple[int, list[tuple[bytes, bytes]], bytes]]:
        """The request's answer from every replica, by replica id (while one is being replaced, another is
        reached through its index too, and counted once). One after another: Ray Serve (2.60) gives the
        calls one request makes the same internal request id, and a router without its FIFO mixin
        (ours: a request must get the replica chosen for it) would assign only one of them at a time."""
        answers = [await self._collect(replace(request, replica_index=i)) for i in range(self.num_replicas)]
        return {dict(a[1]).get(REPLICA_HEADER, b"?").decode(): a for a in answers}


def _forwarded(request: Request, body: bytes, key: str | None = None) -> Forwarded:
    return Forwarded(request.method, request.url.path, request.scope["query_string"], list(request.scope["headers"]),
                     body, key)


def _previous_response_id(body: bytes) -> str | None:
    try:
        value = json.loads(body).get("previous_response_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


async def _body(stream: DeploymentResponseGenerator, path: str, events: bool) -> AsyncIterator[bytes]:
    """A replica's body pieces. If the replica dies mid-stream, a server-sent stream ends with an error
    event in the API's shape; any other body is cut short."""
    try:
        async for message in stream:
            yield message.get("body", b"")
    except RayError as err:
        if events:
            error = _replica_error(err)
            shape = error_shape(path)
            yield sse(error.body(shape), "error" if shape == "anthropic" else None).encode()
    finally:
        stream.cancel()  # the client went away: the replica aborts the request


def _replica_error(err: RayError) -> APIError:
    if isinstance(err, (RayActorError, ActorUnavailableError)):
        return APIError(503, "the engine replica serving this request died; Ray Serve is restarting it",
                        kind="service_unavailable", code="replica_died")
    return APIError(500, f"internal error in the engine replica: {type(err).__name__}", kind="server_error")


def _response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


def _error(path: str, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(error_shape(path)), status_code=err.status)


def merged_metrics(texts: dict[str, str]) -> bytes:
    """Prometheus expositions of several replicas as one, each sample labeled with its replica's id."""
    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
    return generate_latest(SimpleNamespace(collect=lambda: list(families.values())))


def build_app(model: str | None, model_name: str, llm_options: dict, server_options: dict, replicas: int,
              num_cpus: float, threads: int, prefix_routing: bool = True, prefix_chars: int = PREFIX_CHARS,
              max_imbalance: int = 16) -> serve.Application:
    """The Ray Serve application: `replicas` engine replicas of `create_app(model, model_name, llm_options,
    **server_options)`, each reserving `num_cpus` of Ray's CPUs and computing on `threads` threads, behind
    the front deployment. `prefix_routing` False: the power of two choices (the less loaded of two random
    replicas, blind to prompts, as Ray Serve's default router) instead of the prefix-aware router."""
    router = RequestRouterConfig(request_router_class=PrefixAwareRouter,
                                 request_router_kwargs={"max_imbalance": max_imbalance}) if prefix_routing \
        else RequestRouterConfig(request_router_class=ReplicaRouter)
    engines = serve.deployment(EngineReplica, name=ENGINES, num_replicas=replicas,
                               max_ongoing_requests=REPLICA_MAX_ONGOING, ray_actor_options={"num_cpus": num_cpus},
                               request_router_config=router,
                               max_constructor_retry_count=replicas)  # a model that fails to load fails again
    return Front.bind(engines.bind(model, model_name, llm_options, server_options, threads), replicas,
                      server_options.get("max_body_bytes", 16 << 20), server_options.get("read_timeout", 30.0),
                      prefix_chars)


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run minillm.server.replicas:app_builder model=PATH replicas=N num_cpus=C ...` on an
    existing Ray cluster: model (default: the bundled one), served_model_name, replicas (2), num_cpus per
    replica (1; its threads too), api_key, prefix_routing (true/false)."""
    model = Path(args["model"]) if "model" in args else default_model_path()
    num_cpus = float(args.get("num_cpus", 1))
    server = {"api_key": args["api_key"]} if "api_key" in args else {}
    return build_app(str(model), args.get("served_model_name", model.stem), {}, server,
                     int(args.get("replicas", 2)), num_cpus, max(1, int(num_cpus)),
                     args.get("prefix_routing", "true").lower() != "false")


def run(model: str, model_name: str, llm_options: dict, server_options: dict, replicas: int, host: str, port: int,
        prefix_routing: bool = True) -> int:
    """Serve `replicas` replicas on host:port from a Ray instance started here (the CLI), sharing this
    machine's cores between them, until SIGINT or SIGTERM."""
    try:
        socket.create_server((host, port)).close()  # Ray's proxy binds it later, with no clear message if taken
    except OSError as err:
        print(f"minillm: error: cannot listen on {host}:{port}: {err.strerror or err}", file=sys.stderr)
        return 1
    try:  # a file that is not a model fails here in a second, not in each replica after Ray has started
        open_tokenizer(model, llm_options.get("chat_template"))
    except (ValueError, OSError) as err:
        print(f"minillm: error: {err}", file=sys.stderr)
        return 1
    cpus = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="warning")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        quiet = {"log_level": "WARNING", "enable_access_log": False}  # Ray Serve's logs: its warnings and errors
        serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
        app = build_app(model, model_name, llm_options, server_options, replicas, cpus / replicas,
                        max(1, cpus // replicas), prefix_routing)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", logging_config=quiet)
        except RuntimeError:  # the replicas failed to start: say why in one line (Ray has logged the rest)
            reason = serve.status().applications[APP_NAME].deployments[ENGINES].message.strip().splitlines()
            print(f"minillm: error: the replicas did not start: {reason[-1] if reason else 'see the log above'}",
                  file=sys.stderr)
            return 1
        print(f"minillm: {replicas} replicas serving on http://{host}:{port}", file=sys.stderr)
        while not stop.wait(1.0):
            pass
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
