"""On-demand adapters (--lora-resolver-dir DIR, vLLM's filesystem resolver convention).

A request whose `model` names no loaded adapter, but a subdirectory DIR/<model>, loads that
directory as the adapter <model> on its first request; from then on it is served and listed
like any other. Only a name that is one plain path component can match (no `/`, no `..`), the
subdirectory must resolve (links followed) inside DIR, and the engine's reader confines every
file it opens to DIR too. The load runs off the event loop and off the step thread (the
engine's add_lora reads on an executor thread), so running streams go on. Concurrent first
requests for one name share one load; a failed load answers each of them with the error and is
forgotten, so the next request tries again (after the directory is fixed, it succeeds).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

from loramux.engine.errors import AdapterAlreadyExists, EngineError
from loramux.engine.request import LoRARequest
from loramux.server.errors import ApiError, engine_status
from loramux.server.settings import adapter_name_problem

logger = logging.getLogger(__name__)


class AdapterResolver:
    """Loads DIR/<name> as adapter <name> through `engine.add_lora`; `on_load(name)` is called
    after each load (the metrics start tracking the name)."""

    def __init__(self, directory: Path, engine, on_load: Callable[[str], None]) -> None:
        self.dir = directory.resolve()
        self.engine, self.on_load = engine, on_load
        self.loaded: set[str] = set()  # names this resolver loaded (they may be unloaded since)
        self._loads: dict[str, asyncio.Task] = {}

    async def load(self, name: str) -> bool:
        """Whether `name` is now a loaded adapter from DIR (False: DIR has no such adapter
        directory). A directory that cannot be served raises an ApiError naming the problem."""
        task = self._loads.get(name)
        if task is None:
            task = asyncio.ensure_future(self._load(name))
            task.add_done_callback(_retrieve)
            self._loads[name] = task
        return await asyncio.shield(task)  # a client that leaves does not cancel the others'

    def candidate(self, name: str) -> Path | None:
        """DIR/name resolved, when name is one path component naming a directory inside DIR."""
        if name in ("", ".", "..") or any(ch in name for ch in "/\\\0"):
            return None
        try:
            path = (self.dir / name).resolve()
            found = path.is_dir()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
            return None
        return path if found and path.is_relative_to(self.dir) else None

    async def _load(self, name: str) -> bool:
        try:
            path = await asyncio.get_running_loop().run_in_executor(None, self.candidate, name)
            if path is None:
                return False
            if problem := adapter_name_problem(name):
                raise ApiError(HTTPStatus.BAD_REQUEST, f"adapter directory {name!r} in "
                               f"--lora-resolver-dir cannot be served: {problem}", "model")
            request = LoRARequest(lora_name=name, lora_int_id=0, lora_path=str(path),
                                  allowed_roots=(str(self.dir),))
            try:
                await self.engine.add_lora(request)
            except AdapterAlreadyExists:  # loaded meanwhile through /v1/load_lora_adapter
                return True
            except EngineError as exc:
                message = str(exc).replace(str(path), name)
                raise ApiError(engine_status(exc), f"adapter '{name}' in --lora-resolver-dir "
                                                   f"cannot be served: {message}",
                               "model") from exc
            logger.info("adapter %s loaded on demand from the resolver directory", name)
            self.loaded.add(name)
            self.on_load(name)
            return True
        finally:
            self._loads.pop(name, None)


def _retrieve(task: asyncio.Task) -> None:
    """Mark a failed load's error as seen when every request waiting on it has gone."""
    if not task.cancelled():
        task.exception()
