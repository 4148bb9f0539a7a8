"""Every failure leaves as the OpenAI error envelope; routes raise, handlers here answer.

`{"error": {"message": str, "type": str, "param": str | None, "code": int}}`
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramux.engine.errors import (
    AdapterAlreadyExists,
    AdapterFilesChanged,
    AdapterLoadError,
    AdapterNotFound,
    AdapterPathForbidden,
    EngineError,
    EngineOverloaded,
    EngineStopped,
    InvalidRequest,
)
from loramux.server.responses import ErrorResponse

logger = logging.getLogger(__name__)

# Most specific class first: PromptTooLong is an InvalidRequest.
_ENGINE_STATUS: tuple[tuple[type[EngineError], HTTPStatus], ...] = (
    (AdapterNotFound, HTTPStatus.NOT_FOUND),
    (AdapterAlreadyExists, HTTPStatus.BAD_REQUEST),
    (AdapterLoadError, HTTPStatus.BAD_REQUEST),
    (AdapterPathForbidden, HTTPStatus.FORBIDDEN),
    (AdapterFilesChanged, HTTPStatus.CONFLICT),
    (InvalidRequest, HTTPStatus.BAD_REQUEST),
    (EngineOverloaded, HTTPStatus.SERVICE_UNAVAILABLE),
    (EngineStopped, HTTPStatus.SERVICE_UNAVAILABLE),
)

_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.FORBIDDEN: "PermissionDeniedError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.CONFLICT: "ConflictError",
    HTTPStatus.METHOD_NOT_ALLOWED: "MethodNotAllowed",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "RequestTooLargeError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
}


class ApiError(Exception):
    """A client-facing error raised by the server itself (not by the engine)."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was complete; nobody reads the reply."""


_WHEN = {
    HTTPStatus.BAD_REQUEST: "invalid request (the message names the field or the problem)",
    HTTPStatus.UNAUTHORIZED: "missing or wrong API key (--api-key)",
    HTTPStatus.FORBIDDEN: "lora_path outside --allowed-lora-roots",
    HTTPStatus.NOT_FOUND: "unknown model, adapter or adapter path",
    HTTPStatus.CONFLICT: "the adapter's files changed on disk since it was loaded (reload it)",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "request body over --max-request-body-bytes",
    HTTPStatus.SERVICE_UNAVAILABLE: "overloaded, shutting down, or the engine loop stopped",
}


def documented(*statuses: HTTPStatus) -> dict:
    """OpenAPI `responses=` entries for the error statuses a route can answer."""
    return {int(s): {"model": ErrorResponse, "description": _WHEN[s]} for s in statuses}


def model_not_found(model: str, base_name: str) -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND,
                    f"The model `{model}` does not exist. Valid aliases: {base_name}.", "model")


def error_body(status: int, message: str, param: str | None = None) -> dict:
    error_type = _TYPES.get(HTTPStatus(status), "InternalServerError" if status >= 500
                            else "BadRequestError")
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def engine_status(exc: EngineError) -> HTTPStatus:
    for cls, status in _ENGINE_STATUS:
        if isinstance(exc, cls):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR


def _where(error: dict) -> str:
    """An error's location; a whole-body check names the field it found in ctx["field"]."""
    loc = [str(x) for x in error["loc"]]
    field = (error.get("ctx") or {}).get("field")
    return ".".join([*loc, field] if field else loc)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    parts = [f"{_where(e)}: {e['msg']}" for e in errors]
    param = _where(errors[0]) if errors else None
    return f"{len(errors)} validation error(s): " + "; ".join(parts), param


def _public(request: Request, message: str) -> str:
    """The message as a client may read it (--redact-paths)."""
    return request.app.state.server.redactor.text(message)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, _public(request, exc.message), exc.param)


async def _on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
    status = engine_status(exc)
    if status == HTTPStatus.SERVICE_UNAVAILABLE:  # expected under load: one line, no traceback
        logger.warning("503 on %s: %s", request.url.path, exc)
    elif status >= 500:
        logger.error("engine error on %s: %s", request.url.path, exc, exc_info=exc)
    return error_response(status, _public(request, str(exc)))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    return error_response(HTTPStatus.BAD_REQUEST, message, param)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


async def _on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=499)  # nginx's "client closed request", for the access log


async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(HTTPStatus.INTERNAL_SERVER_ERROR,
                          f"internal error ({type(exc).__name__}); see the server log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(EngineError, _on_engine_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientDisconnected, _on_disconnect)
    app.add_exception_handler(Exception, _on_bug)
