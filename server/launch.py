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
from loramux.server.protocol import unapplied_defaults
from loramux.server.settings import Settings, SettingsError

logger = logging.getLogger(__name__)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _sampling_defaults_notes(settings: Settings) -> None:
    """Say which request defaults the generation config sets (as vLLM does), and which of them
    loramux cannot apply; an invalid one stops start-up."""
    defaults = settings.sampling_defaults
    try:
        unapplied = unapplied_defaults(defaults)
    except ValueError as exc:
        sys.exit(f"loramux: error: --generation-config {settings.generation_config}: {exc}")
    if defaults:
        source = ("the model's generation_config.json" if settings.generation_config == "auto"
                  else f"--generation-config {settings.generation_config}")
        if settings.override_generation_config:
            source += " and --override-generation-config"
        logger.warning("default sampling parameters set by %s: %s; fields a request sends win "
                       "(--generation-config vllm: none)", source, defaults)
    if unapplied:
        logger.warning("sampling defaults not applied (not supported yet): %s",
                       ", ".join(unapplied))


def build_engine(settings: Settings) -> Engine:
    try:
        return Engine(settings.to_engine_config())
    except (EngineError, SettingsError, ValueError, OSError) as exc:
        sys.exit(f"loramux: error: cannot load model {settings.model}: {exc}")


async def load_static_adapters(settings: Settings, app: FastAPI) -> None:
    for module in settings.lora_modules:
        try:
            await app.state.server.models.load_static(module)
        except EngineError as exc:
            app.state.server.engine.shutdown()
            sys.exit(f"loramux: error: adapter {module.name!r} ({module.path}) failed to "
                     f"load: {exc}")


def http_server(settings: Settings, app: FastAPI) -> DrainingServer:
    # after the drain, connections get CUT_GRACE_S to send their last bytes
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.uvicorn_log_level or settings.log_level,
                            access_log=settings.access_log,
                            timeout_graceful_shutdown=CUT_GRACE_S)
    return DrainingServer(config, app.state.server.drain)


async def _serve(settings: Settings, engine: Engine) -> None:
    app = create_app(engine, settings)  # its lifespan starts and stops the engine loop
    await load_static_adapters(settings, app)
    logger.info("serving %s on http://%s:%d", settings.base_name, settings.host, settings.port)
    await http_server(settings, app).serve()


def run(settings: Settings, warnings: list[str] = ()) -> int:
    """Serve until stopped; `warnings` (vLLM flags accepted but ignored) are logged first."""
    _configure_logging(settings.log_level)
    for warning in warnings:
        logger.warning("%s", warning)
    _sampling_defaults_notes(settings)
    engine = build_engine(settings)
    asyncio.run(_serve(settings, engine))
    return 0
