"""Server-sent events: one `data: {json}` frame per chunk, optional usage, then `data: [DONE]`.

A request streams one generation, or (a completions prompt batch) several whose chunks are
interleaved as they come, each formatter numbering its own choices. A failure after the first
byte cannot change the HTTP status any more, so it is sent as an error frame in the OpenAI
envelope (the openai client raises it) before `[DONE]`; the other generations are aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from loramux.engine.errors import EngineError
from loramux.engine.request import RequestOutput
from loramux.server.errors import engine_status, error_body
from loramux.server.formats import Formatter
from loramux.server.generation import Generation
from loramux.server.responses_api import ResponseEvent

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"

Stream = tuple[Generation, Formatter]


def sse(chunk: BaseModel | dict) -> str:
    """One frame; Responses API events also name themselves in an `event:` line."""
    body = (chunk.model_dump_json() if isinstance(chunk, BaseModel)
            else json.dumps(chunk, separators=(",", ":")))
    event = f"event: {chunk.type}\n" if isinstance(chunk, ResponseEvent) else ""
    return f"{event}data: {body}\n\n"


async def _merged(streams: list[Stream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) as each generation produces them; leaving early stops all."""
    if len(streams) == 1:
        async for out in streams[0][0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, generation: Generation) -> None:
        try:
            async for out in generation.outputs():
                await queue.put((i, out))
            await queue.put((i, None))
        except Exception as exc:  # handed to the consumer, which reports it
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, (g, _) in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def sse_frames(streams: list[Stream], n: int, include_usage: bool,
                     public: Callable[[str], str]) -> AsyncIterator[str]:
    """`public` rewrites an error message for the client (--redact-paths)."""
    for _, formatter in streams:
        for chunk in formatter.opening(n):
            yield sse(chunk)
    last: list[RequestOutput | None] = [None] * len(streams)
    try:
        async for i, out in _merged(streams):
            for chunk in streams[i][1].chunks(out):
                yield sse(chunk)
            last[i] = out
    except EngineError as exc:
        yield sse(error_body(engine_status(exc), public(str(exc))))
    except Exception as exc:  # a bug: report it in-band, keep serving
        logger.exception("stream %s failed", streams[0][0].request_id)
        yield sse(error_body(HTTPStatus.INTERNAL_SERVER_ERROR,
                             f"internal error ({type(exc).__name__}); see the server log"))
    else:
        for chunk in streams[0][1].closing(last, include_usage):
            yield sse(chunk)
    yield DONE


def event_stream(response: type | None, chunk: type) -> dict:
    """OpenAPI `responses=` for 200: the JSON answer, or (`stream`) server-sent events."""
    events = {"schema": {"type": "string", "description": f"`data: <{chunk.__name__} JSON>` "
                                                          "frames, then `data: [DONE]`"}}
    return {200: {"content": {"text/event-stream": events},
                  **({"model": response} if response else {})}}


def sse_response(streams: list[Stream], n: int, include_usage: bool,
                 public: Callable[[str], str]) -> StreamingResponse:
    return StreamingResponse(sse_frames(streams, n, include_usage, public),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
