"""GET /health, /version and /metrics: open without the API key, as in vLLM."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from loramux.server import __version__
from loramux.server.errors import ApiError, documented
from loramux.server.state import State

router = APIRouter()


@router.get("/health", response_class=Response,
            responses={200: {"description": "the engine loop runs (empty body)"},
                       **documented(HTTPStatus.SERVICE_UNAVAILABLE)})
async def health(state: State) -> Response:
    if not state.engine.is_alive:
        raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the engine loop is not running")
    return Response(status_code=HTTPStatus.OK)


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition"}})
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
