"""The Ray Serve application: `build_app(args)` for `serve run deploy/ray/serve.yaml`.

Three deployments:

- `Replica` (num_replicas): a whole loramux server (LocalServer) per replica, one per GPU (or
  per CPU slot for tests). Requests reach it through Ray; Ray's model multiplexing keys them by
  the adapter in `model`, so a request lands on a replica that already holds its adapter, and
  on a miss the replica's --lora-resolver-dir loads it from the shared directory. Ray keeps at
  most `adapters_per_replica` adapters per replica (LRU); one it drops is unloaded there if it
  was loaded on demand.
- `Directory` (one): each replica's URL (a heartbeat every second) and, in order, the adapter
  loads and unloads made through the ingress, which a replica that starts later replays.
- `Ingress`: the HTTP entry. OpenAI / vLLM routes go to one replica through Ray (streams
  relayed chunk by chunk; a replica lost mid-answer ends the stream with an error frame, or
  answers 503 before the first byte); `/v1/models`, `/metrics` and `/health` ask every replica;
  load / unload act on every replica.

Replicas accept only the ingress: their servers require an internal API key besides any of the
user's (--api-key), and the user's own key is checked by the replica it reaches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shlex
import time
from collections.abc import AsyncIterator

import httpx
import ray
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loramux.ray_serve.fanout import ask_all, merge_metrics, union_models
from loramux.ray_serve.local import LocalServer
from loramux.server.cli import build_parser, settings_from_args
from loramux.server.errors import error_body
from loramux.server.settings import Settings

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
STALE_S = 5.0  # a replica silent this long is gone (Ray restarts it; it registers anew)
ADMIN_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "authorization"}


class AppArgs(BaseModel):
    """`args:` of the application in serve.yaml."""

    serve_args: str | list[str] = ""  # `loramux serve` flags: MODEL, --lora-resolver-dir, ...
    num_replicas: int = Field(2, ge=1)
    adapters_per_replica: int | None = Field(None, ge=1)  # Ray's LRU (--max-cpu-loras)
    max_ongoing_requests: int = Field(256, ge=1)  # per replica; Ray's default (5) is for models
    multiplex: bool = True  # False: Ray's default routing, for comparison
    replica_options: dict = Field(default_factory=lambda: {"num_cpus": 1})  # ray_actor_options


def parse_serve_args(serve_args: str | list[str], *extra: str) -> Settings:
    argv = shlex.split(serve_args) if isinstance(serve_args, str) else list(serve_args)
    return settings_from_args(build_parser().parse_args(["serve", *argv, *extra]))


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})  # a heartbeat a second each
class Directory:
    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, float]] = {}
        self._ops: list[tuple[str, bytes]] = []

    def register(self, replica: str, url: str) -> None:
        self._seen[replica] = (url, time.monotonic())

    def urls(self) -> dict[str, str]:
        now = time.monotonic()
        return {r: url for r, (url, seen) in self._seen.items() if now - seen < STALE_S}

    def record(self, path: str, body: bytes) -> None:
        self._ops.append((path, body))

    def ops(self) -> list[tuple[str, bytes]]:
        return list(self._ops)


class _Lease:
    """An adapter in Ray's per-replica LRU; Ray calls __del__ when it drops it."""

    def __init__(self, server: LocalServer, name: str) -> None:
        self._server, self._name = server, name

    def __del__(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.release(self._name)


@serve.deployment
class Replica:
    async def __init__(self, directory: DeploymentHandle, serve_args: str | list[str],
                       internal_key: str, adapters_per_replica: int | None) -> None:
        self.id = serve.get_replica_context().replica_id.unique_id
        settings = parse_serve_args(serve_args, "--host", ray.util.get_node_ip_address(),
                                    "--api-key", *_user_keys(serve_args), internal_key)
        self.server = await asyncio.to_thread(LocalServer, settings)
        self.http = httpx.AsyncClient(base_url=self.server.url, timeout=None)
        self.directory, self.auth = directory, {"authorization": f"Bearer {internal_key}"}
        for path, body in await directory.ops.remote():  # loads made before this replica
            reply = await self.http.post(path, content=body, headers=self.auth)
            if reply.status_code != 200:
                logger.warning("replica %s: replaying %s failed: %s", self.id, path, reply.text)
        await directory.register.remote(self.id, self.server.url)
        self._heartbeat = asyncio.create_task(self._beat())
        size = adapters_per_replica or settings.max_cpu_loras or settings.max_loras

        async def lease(name: str) -> _Lease:
            return _Lease(self.server, name)
        self.adapter = serve.multiplexed(max_num_models_per_replica=size)(lease)

    def __del__(self) -> None:
        """Ray's graceful shutdown: the server drains (running requests may finish)."""
        if (beat := getattr(self, "_heartbeat", None)) is not None:
            beat.cancel()
            self.server.stop()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.directory.register.remote(self.id, self.server.url)
            except ray.exceptions.RayError as exc:  # the directory restarts: try again
                logger.warning("replica %s: heartbeat failed: %s", self.id, exc)

    async def forward(self, method: str, path: str, headers: dict[str, str],
                      body: bytes) -> AsyncIterator[tuple[int, dict[str, str]] | bytes]:
        """The local server's answer: (status, headers) first, then the body's chunks."""
        if model := serve.get_multiplexed_model_id():
            await self.adapter(model)
        request = self.http.build_request(method, path, headers=headers, content=body)
        reply = await self.http.send(request, stream=True)
        try:
            yield reply.status_code, {k: v for k, v in reply.headers.items()
                                      if k.lower() not in _HOP_HEADERS}
            async for chunk in reply.aiter_raw():
                yield chunk
        finally:
            await reply.aclose()  # a cancelled relay closes the connection: the request aborts


@serve.deployment(ray_actor_options={"num_cpus": 0})  # relays bytes: the replicas get the CPUs
class Ingress:
    def __init__(self, replicas: DeploymentHandle, directory: DeploymentHandle,
                 serve_args: str | list[str], internal_key: str, multiplex: bool) -> None:
        settings = parse_serve_args(serve_args)
        self.replicas, self.directory, self.multiplex = replicas, directory, multiplex
        self.base_names = set(settings.served_model_names)
        self.admin = settings.allow_runtime_lora_updating
        self.checks_keys = bool(settings.api_keys)
        self.internal = f"Bearer {internal_key}"
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(60.0))

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/v1/models" and request.method == "GET":
            return await self._models(request)
        if path == "/metrics":
            return await self._metrics()
        if path in ("/health", "/ping"):
            return await self._health()
        if path in ADMIN_ROUTES and self.admin and request.method == "POST":
            return await self._admin(request)
        return await self._forward(request)

    def _auth(self, request: Request) -> dict[str, str]:
        """The user's key when the replicas check one (they also take the internal key)."""
        given = request.headers.get("authorization", "") if self.checks_keys else self.internal
        return {"authorization": given}

    async def _forward(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        options: dict = {"stream": True}
        model = _model_of(body)
        if self.multiplex and model and model not in self.base_names:
            options["multiplexed_model_id"] = model
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        answer = self.replicas.options(**options).forward.remote(
            request.method, target, {**headers, **self._auth(request)}, body)
        try:
            status, reply_headers = await answer.__anext__()
        except ray.exceptions.RayError as exc:
            logger.warning("no replica answered %s: %s", target, exc)
            return JSONResponse(error_body(503, "the replica serving this request failed "
                                                "before answering; retry"), status_code=503)
        return StreamingResponse(_relay(answer, reply_headers), status_code=status,
                                 headers=reply_headers)

    async def _models(self, request: Request) -> Response:
        replies = await self._ask_all("GET", "/v1/models", request)
        if not replies:
            return JSONResponse(error_body(503, "no replica is running"), status_code=503)
        if failed := next((r for r in replies if not r.ok), None):
            return Response(failed.body, failed.status, media_type=failed.content_type)
        return JSONResponse(union_models(json.loads(r.body) for r in replies))

    async def _metrics(self) -> Response:
        replies = await self._ask_all("GET", "/metrics")
        text = merge_metrics({r.replica: r.body.decode() for r in replies if r.ok})
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _health(self) -> Response:
        replies = await self._ask_all("GET", "/health")
        if any(r.ok for r in replies):
            return Response(status_code=200)
        return JSONResponse(error_body(503, "no replica is healthy"), status_code=503)

    async def _admin(self, request: Request) -> Response:
        """Load or unload on every replica; recorded for replicas that start later."""
        body = await request.body()
        headers = {"content-type": "application/json", **self._auth(request)}
        replies = await self._ask_all("POST", request.url.path, request, body, headers)
        if not replies:
            return JSONResponse(error_body(503, "no replica is running"), status_code=503)
        if failed := next((r for r in replies if not r.ok), None):
            return Response(failed.body, failed.status, media_type=failed.content_type)
        await self.directory.record.remote(request.url.path, body)
        return Response(replies[0].body, 200, media_type=replies[0].content_type)

    async def _ask_all(self, method: str, path: str, request: Request | None = None,
                       body: bytes | None = None, headers: dict[str, str] | None = None):
        urls = await self.directory.urls.remote()
        headers = headers or ({} if request is None else self._auth(request))
        return await ask_all(self.http, urls, method, path, headers, body)


async def _relay(answer, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The replica's chunks; if it is lost mid-stream, an error frame and [DONE] end an SSE
    stream (a JSON answer is simply cut: its status was already sent)."""
    try:
        async for chunk in answer:
            yield chunk
    except ray.exceptions.RayError as exc:
        logger.warning("replica lost mid-answer: %s", exc)
        if headers.get("content-type", "").startswith("text/event-stream"):
            frame = error_body(503, "the replica serving this stream failed; retry")
            yield f"data: {json.dumps(frame)}\n\ndata: [DONE]\n\n".encode()
    finally:
        answer.cancel()


def _model_of(body: bytes) -> str | None:
    try:
        model = json.loads(body).get("model") if body else None
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and model else None


def _user_keys(serve_args: str | list[str]) -> tuple[str, ...]:
    return parse_serve_args(serve_args).api_keys


def build_app(args: dict) -> serve.Application:
    """The application of serve.yaml's `args` (AppArgs)."""
    config = AppArgs(**args)
    key = secrets.token_hex(32)  # the ingress's key to its replicas (hex: never a flag)
    directory = Directory.bind()
    replicas = Replica.options(
        num_replicas=config.num_replicas, max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=config.replica_options,
    ).bind(directory, config.serve_args, key, config.adapters_per_replica)
    return Ingress.options(max_ongoing_requests=config.max_ongoing_requests * config.num_replicas
                           ).bind(replicas, directory, config.serve_args, key, config.multiplex)
