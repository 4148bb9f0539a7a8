"""create_app(engine, settings) -> FastAPI: state, error handlers, routers, and a lifespan
that runs the engine's step loop while the app serves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.registry import ModelRegistry
from server.routes import adapters, completions, health, models, responses, tokens
from server.settings import Settings
from server.state import ServerState


@asynccontextmanager
async def _engine_loop(app: FastAPI) -> AsyncIterator[None]:
    engine = app.state.server.engine
    engine.start()
    try:
        yield
    finally:
        engine.shutdown()


def create_app(engine, settings: Settings) -> FastAPI:
    app = FastAPI(title="loramux", version=__version__, lifespan=_engine_loop)
    app.state.server = ServerState(engine=engine, settings=settings,
                                   models=ModelRegistry(engine, settings),
                                   metrics=ServerMetrics(engine))
    install_error_handlers(app)
    for router in (health.router, tokens.ping_router, models.router, completions.router,
                   responses.router, tokens.router):
        app.include_router(router)
    if settings.allow_runtime_lora_updating:
        app.include_router(adapters.router)
    return app
