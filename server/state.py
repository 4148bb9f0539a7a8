"""What every route reads: the engine, the settings, the model registry, the metrics, the path
redactor, the prompt tokenizer pool and the shutdown drain."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from loramux.server.errors import ApiError
from loramux.server.drain import Drain
from loramux.server.metrics import ServerMetrics
from loramux.server.prompt import Prompts
from loramux.server.redaction import PathRedactor
from loramux.server.registry import ModelRegistry
from loramux.server.settings import Settings

if TYPE_CHECKING:
    from loramux.engine import Engine


@dataclass(frozen=True)
class ServerState:
    engine: Engine
    settings: Settings
    models: ModelRegistry
    metrics: ServerMetrics
    redactor: PathRedactor
    prompts: Prompts
    drain: Drain


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]  # what a route declares to get the state


async def require_api_key(request: Request) -> None:
    """--api-key: `Authorization: Bearer KEY` with one of the keys, compared in constant time."""
    keys = get_state(request).settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]  # each one compared
    if scheme.lower() != "bearer" or not any(matches):
        raise ApiError(HTTPStatus.UNAUTHORIZED,
                       "Unauthorized: send a valid API key as `Authorization: Bearer KEY`")
