"""Process lifecycle: build the engine (slow), load --lora-modules, then serve.

Static adapters load on the serving event loop before uvicorn binds the port, so a bad one
stops start-up with one line and a non-zero exit instead of a half-working server. The app's
lifespan starts the engine loop and stops it once uvicorn has drained its connections. SIGTERM
and SIGINT start server.drain's graceful shutdown; the process then exits with status 0.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import uvicorn
from fastapi import FastAPI

from loramux.engine import Engine
from loramux.engine.errors import EngineError
from loramux.server.app import create_app
from loramux.server.drain import CUT_GRACE_S, DrainingServer
from loramux.server.settings import Settings, SettingsError

logger = logging.getLogger(__name__)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _build_engine(settings: Settings) -> Engine:
    try:
        return Engine(settings.to_engine_config())
    except (EngineError, SettingsError, ValueError, OSError) as exc:
        sys.exit(f"loramux: error: cannot load model {settings.model}: {exc}")


async def _load_static_adapters(settings: Settings, app: FastAPI) -> None:
    for module in settings.lora_modules:
        try:
            await app.state.server.models.load_static(module)
        except EngineError as exc:
            app.state.server.engine.shutdown()
            sys.exit(f"loramux: error: adapter {module.name!r} ({module.path}) failed to "
                     f"load: {exc}")


async def _serve(settings: Settings, engine: Engine) -> None:
    app = create_app(engine, settings)  # its lifespan starts and stops the engine loop
    await _load_static_adapters(settings, app)
    # after the drain, connections get CUT_GRACE_S to send their last bytes
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, timeout_graceful_shutdown=CUT_GRACE_S)
    logger.info("serving %s on http://%s:%d", settings.base_name, settings.host, settings.port)
    await DrainingServer(config, app.state.server.drain).serve()


def run(settings: Settings) -> int:
    _configure_logging(settings.log_level)
    engine = _build_engine(settings)
    asyncio.run(_serve(settings, engine))
    return 0
