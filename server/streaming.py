"""Server-sent events: one `data: {json}` frame per chunk, optional usage, then `data: [DONE]`.

A failure after the first byte cannot change the HTTP status any more, so it is sent as an
error frame in the OpenAI envelope (the openai client raises it) before `[DONE]`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from engine.errors import EngineError
from server.errors import engine_status, error_body
from server.formats import Formatter
from server.generation import Generation
from server.responses_api import ResponseEvent

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(chunk: BaseModel | dict) -> str:
    """One frame; Responses API events also name themselves in an `event:` line."""
    body = (chunk.model_dump_json() if isinstance(chunk, BaseModel)
            else json.dumps(chunk, separators=(",", ":")))
    event = f"event: {chunk.type}\n" if isinstance(chunk, ResponseEvent) else ""
    return f"{event}data: {body}\n\n"


async def sse_frames(generation: Generation, formatter: Formatter, n: int,
                     include_usage: bool) -> AsyncIterator[str]:
    for chunk in formatter.opening(n):
        yield sse(chunk)
    last = None
    try:
        async for out in generation.outputs():
            for chunk in formatter.chunks(out):
                yield sse(chunk)
            last = out
    except EngineError as exc:
        yield sse(error_body(engine_status(exc), str(exc)))
    except Exception as exc:  # a bug: report it in-band, keep serving
        logger.exception("stream %s failed", generation.request_id)
        yield sse(error_body(HTTPStatus.INTERNAL_SERVER_ERROR,
                             f"internal error ({type(exc).__name__}); see the server log"))
    else:
        for chunk in formatter.closing(last, include_usage):
            yield sse(chunk)
    yield DONE


def sse_response(generation: Generation, formatter: Formatter, n: int,
                 include_usage: bool) -> StreamingResponse:
    return StreamingResponse(sse_frames(generation, formatter, n, include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
