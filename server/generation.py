"""One engine request as a route sees it: started, timed, and aborted when the client leaves.

`start()` waits for the first output, so engine errors raised before the first yield
(PromptTooLong, AdapterNotFound, EngineOverloaded...) become HTTP errors before any response
byte is sent. While waiting (and while collecting a non-streaming answer) a watcher listens
for the client's disconnect; a stream is cancelled by Starlette when its client goes away.
Either way the engine request is aborted at once, which frees its KV blocks and adapter slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

from loramux.engine.errors import EngineError, EngineStopped
from loramux.engine.request import RequestOutput, SamplingParams
from loramux.server.drain import Drain
from loramux.server.errors import ClientDisconnected
from loramux.server.metrics import RequestTimer

if TYPE_CHECKING:
    from loramux.engine import Engine

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; raise ClientDisconnected (cancelling it) if the client leaves first."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientDisconnected


class Generation:
    """The server's handle on one engine request (all n choices of it). While it runs, the
    server's Drain knows it and may end it at shutdown (cut)."""

    def __init__(self, engine: Engine, request_id: str, lora: str | None, timer: RequestTimer,
                 drain: Drain) -> None:
        self.engine, self.request_id, self.lora, self.timer = engine, request_id, lora, timer
        self.drain = drain
        self._outputs: AsyncIterator[RequestOutput] | None = None
        self._first: RequestOutput | None = None
        self._finished = False
        self._cut: str | None = None  # why the server ended the request

    async def start(self, request: Request, prompt_ids: list[int], params: SamplingParams) -> None:
        await start_all(request, [(self, prompt_ids)], params)

    async def _begin(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.timer.submitted(params)
        self._outputs = self.engine.generate(prompt_ids, params, lora=self.lora,
                                             request_id=self.request_id)
        self.drain.enter(self)
        self._first = await anext(self._outputs)
        self._observe(self._first)

    def _observe(self, out: RequestOutput) -> None:
        self.timer.observe(out)
        self._finished = out.finished
        if self._cut is not None:  # this is the output of the server's abort
            self._finished = True
            raise EngineStopped(self._cut)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Every output from the first on; aborts the engine request if iteration stops early."""
        assert self._first is not None and self._outputs is not None, "call start() first"
        try:
            yield self._first
            while not self._finished:
                try:
                    out = await anext(self._outputs)
                except EngineError:
                    self._finished = True  # the engine ended the request itself
                    raise
                self._observe(out)
                yield out
        finally:
            if not self._finished:
                self.abort()
            self.drain.leave(self)

    async def final(self, request: Request) -> RequestOutput:
        """The last output (all text and tokens are cumulative), or ClientDisconnected."""
        return (await final_all(request, [self]))[0]

    async def _drain(self) -> RequestOutput:
        last = None
        async for out in self.outputs():
            last = out
        return last

    def cut(self, reason: str) -> None:
        """End the request from the server's side: its next output raises EngineStopped."""
        if not self._finished and self._outputs is not None:
            self._cut = reason
            self.engine.abort(self.request_id)

    def abort(self) -> None:
        self.drain.leave(self)
        if self._finished or self._outputs is None:
            return
        self._finished = True
        logger.debug("aborting request %s (adapter %s): client went away", self.request_id,
                     self.lora)
        self.engine.abort(self.request_id)
        self.timer.aborted()


async def start_all(request: Request, generations: list[tuple[Generation, list[int]]],
                    params: SamplingParams) -> None:
    """Submit every request at once and wait for each one's first output. If the client
    leaves, or one request fails (its error propagates), every one of them is aborted."""
    tasks = [asyncio.ensure_future(g._begin(ids, params)) for g, ids in generations]
    try:
        await until_disconnect(request, asyncio.gather(*tasks))
    except BaseException:
        for (generation, _), task in zip(generations, tasks, strict=True):
            if task.done() and not task.cancelled() and task.exception() is not None:
                generation._finished = True  # the engine refused or ended it itself
            task.cancel()
            generation.abort()
        raise


async def final_all(request: Request, generations: list[Generation]) -> list[RequestOutput]:
    """The last output of each generation (one watcher for the client's disconnect)."""
    return await until_disconnect(request, asyncio.gather(*(g._drain() for g in generations)))
