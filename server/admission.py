"""What gets in: a bound on request bodies, and no new requests while the server drains.

`Admission` is ASGI middleware in front of the app. A body over `max_body_bytes` is answered
413 before the app (and its JSON parser) sees any of it; a declared Content-Length over the
limit is refused unread, a chunked body as soon as it passes the limit (the rest is discarded
up to a bound, so that the client reads the answer instead of a reset connection). While the
server drains (SIGTERM, server.drain) every request but /metrics and /version is a 503.
"""

from __future__ import annotations

from http import HTTPStatus

from loramux.server.drain import Drain
from loramux.server.errors import error_response

_OPEN_WHILE_DRAINING = ("/metrics", "/version")
_DISCARD_LIMIT = 64 << 20  # beyond this much refused body the connection is just closed


def default_max_body_bytes(max_model_len: int) -> int:
    """4 MiB, or 64 bytes per token of context (a prompt of escaped JSON text) if more."""
    return max(4 << 20, 64 * max_model_len)


class Admission:
    def __init__(self, app, max_body_bytes: int, drain: Drain) -> None:
        self.app, self.max_body_bytes, self.drain = app, max_body_bytes, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining and scope["path"] not in _OPEN_WHILE_DRAINING:
            return await error_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                        "the server is shutting down")(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(f"{int(declared)} bytes", scope, receive, send)
        body, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return await self.app(scope, _replay([], message, receive), send)
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await self._too_large(f"over {self.max_body_bytes} bytes", scope,
                                             receive, send, more)
        await self.app(scope, _replay(body, None, receive), send)

    async def _too_large(self, size: str, scope, receive, send, more: bool = True) -> None:
        discarded = 0
        while more and discarded < _DISCARD_LIMIT:
            message = await receive()
            discarded += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
        message = (f"the request body is {size}; this server takes at most "
                   f"{self.max_body_bytes} bytes (--max-request-body-bytes)")
        await error_response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)(scope, receive, send)


def _replay(chunks: list[bytes], pending: dict | None, receive):
    """A receive() that hands the app the body already read, then the client's own events."""
    first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
    queue = [pending] if pending is not None else [first]

    async def replay():
        return queue.pop(0) if queue else await receive()

    return replay
