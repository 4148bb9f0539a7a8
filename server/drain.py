"""Graceful shutdown on SIGTERM (or SIGINT): stop admitting, finish or end every request, exit 0.

The first signal starts `Drain.run`: new requests get 503 (/health too: load balancers stop
sending traffic), running requests may finish for up to --shutdown-timeout seconds, then each
one still running is ended by the server (a stream with an error frame in the OpenAI envelope
followed by `data: [DONE]`, a non-streaming request with a 503), and uvicorn is told to exit; it
waits a few seconds for those last bytes to leave. A second signal ends the running requests at
once. uvicorn's own signal handling is replaced, so the process exits with status 0 instead of
re-raising the signal.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import weakref
from typing import Protocol

import uvicorn

logger = logging.getLogger(__name__)

CUT_GRACE_S = 5.0  # how long ended requests get to deliver their last frames


class Cuttable(Protocol):
    def cut(self, reason: str) -> None: ...


class Drain:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.draining = False
        self._running: weakref.WeakSet[Cuttable] = weakref.WeakSet()
        self._idle = asyncio.Event()
        self._cut_now = asyncio.Event()

    def enter(self, request: Cuttable) -> None:
        self._running.add(request)
        self._idle.clear()

    def leave(self, request: Cuttable) -> None:
        self._running.discard(request)
        if not self._running:
            self._idle.set()

    @property
    def num_running(self) -> int:
        return len(self._running)

    async def run(self, server: uvicorn.Server) -> None:
        self.draining = True
        logger.info("shutting down: %d request(s) running, waiting up to %.0f s for them",
                    self.num_running, self.timeout)
        if self._running:
            await _first(self._idle.wait(), self._cut_now.wait(), timeout=self.timeout)
        if self._running:
            logger.warning("ending %d request(s) still running after the drain",
                           self.num_running)
            for request in list(self._running):
                request.cut(f"the server is shutting down; the request was ended after "
                            f"the {self.timeout:g} s drain (--shutdown-timeout)")
            await _first(self._idle.wait(), timeout=CUT_GRACE_S)
        server.should_exit = True

    def hurry(self) -> None:
        self._cut_now.set()


async def _first(*waits, timeout: float) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with Drain in place of its signal handling."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:  # a signal handler: hand over to the loop
        self._signals += 1
        if self._loop is None:
            self.should_exit = True
        elif self._signals == 1:
            self._loop.call_soon_threadsafe(self._start_drain)
        elif self._signals == 2:
            logger.warning("%s again: ending running requests now", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self.drain.hurry)
        else:
            self.force_exit = True

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self.drain.run(self))
