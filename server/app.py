"""create_app(engine, settings) -> FastAPI: state, admission (body limit, drain), error
handlers, routers, and a lifespan that runs the engine's step loop while the app serves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loramux.server import __version__
from loramux.server.admission import Admission, default_max_body_bytes
from loramux.server.drain import Drain
from loramux.server.errors import install_error_handlers
from loramux.server.metrics import ServerMetrics
from loramux.server.prompt import Prompts
from loramux.server.redaction import PathRedactor
from loramux.server.registry import ModelRegistry
from loramux.server.routes import adapters, completions, health, models, responses, tokens
from loramux.server.settings import Settings
from loramux.server.state import ServerState


@asynccontextmanager
async def _engine_loop(app: FastAPI) -> AsyncIterator[None]:
    state = app.state.server
    state.engine.start()
    try:
        yield
    finally:
        state.engine.shutdown()
        state.prompts.shutdown()


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without the 422 it adds to every route (validation errors are 400s
    in the OpenAI envelope here; each route documents its own error statuses), and with error
    bodies as JSON also on the plain-text routes."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation["responses"]
                responses.pop("422", None)
                for status, response in responses.items():  # errors are JSON on every route
                    if int(status) >= 400 and response.get("content"):
                        schema_of = next(iter(response["content"].values()))
                        response["content"] = {"application/json": schema_of}
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


def create_app(engine, settings: Settings) -> FastAPI:
    app = FastAPI(title="loramux", version=__version__, lifespan=_engine_loop)
    metrics = ServerMetrics(engine, settings.base_name)
    redactor = PathRedactor(settings, engine)
    drain = Drain(settings.shutdown_timeout)
    app.state.server = ServerState(engine=engine, settings=settings,
                                   models=ModelRegistry(engine, settings, metrics, redactor),
                                   metrics=metrics, redactor=redactor,
                                   prompts=Prompts(engine.tokenizer, engine.max_model_len,
                                                   settings.chat_template_text),
                                   drain=drain)
    app.add_middleware(Admission, drain=drain, max_body_bytes=settings.max_request_body_bytes
                       or default_max_body_bytes(engine.max_model_len))
    app.openapi = lambda: _openapi(app)
    install_error_handlers(app)
    for router in (health.router, tokens.ping_router, models.router, completions.router,
                   responses.router, tokens.router):
        app.include_router(router)
    if settings.allow_runtime_lora_updating:
        app.include_router(adapters.router)
    return app
