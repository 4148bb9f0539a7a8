"""LocalServer: one whole loramux server (engine, app, uvicorn) inside a Ray Serve replica.

It runs on its own thread and event loop, listening on a free port of the node, so the replica
forwards requests to it over local HTTP and the ingress can reach every replica by its URL (for
load / unload on all of them, the union of /v1/models and the metrics of each). Everything a
client sees (routes, errors, streaming, drain) is the single-process server's.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time

import httpx

from loramux.server.app import create_app
from loramux.server.launch import build_engine, http_server, load_static_adapters
from loramux.server.settings import Settings

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600  # engine and static adapters; a large checkpoint takes minutes


class LocalServer:
    def __init__(self, settings: Settings) -> None:
        self.engine = build_engine(settings)
        self.app = create_app(self.engine, settings)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, 0))
        self.url = f"http://{settings.host}:{sock.getsockname()[1]}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.uvicorn = http_server(settings, self.app)
        self._thread = threading.Thread(target=asyncio.run, name="loramux-server", daemon=True,
                                        args=(self._serve(settings, sock),))
        self._thread.start()
        self._wait_healthy()

    @property
    def state(self):
        """The server's ServerState (engine, registry, metrics...)."""
        return self.app.state.server

    async def _serve(self, settings: Settings, sock: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        await load_static_adapters(settings, self.app)
        await self.uvicorn.serve([sock])

    def stop(self, timeout: float = 60.0) -> None:
        """Drain and stop as on SIGTERM (running requests may finish, --shutdown-timeout)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.uvicorn.handle_exit, signal.SIGTERM, None)
            self._thread.join(timeout)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the loramux server stopped during start-up; see the log")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    logger.info("loramux replica server ready on %s", self.url)
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the loramux server on {self.url} did not become healthy")

    def release(self, name: str) -> None:
        """Unload `name` if the resolver loaded it (Ray's per-replica LRU dropped it); adapters
        of --lora-modules and of /v1/load_lora_adapter stay. Callable from any thread."""
        asyncio.run_coroutine_threadsafe(self._release(name), self.loop)

    async def _release(self, name: str) -> None:
        models = self.state.models
        if models.resolver is None or name not in models.resolver.loaded:
            return
        models.resolver.loaded.discard(name)
        if name in {lora.lora_name for lora in self.engine.list_loras()}:
            await models.unload(name)
            logger.info("adapter %s unloaded: Ray's multiplexing dropped it from this replica",
                        name)
