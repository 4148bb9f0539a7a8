"""The names clients may put in `model`: the base model's served names, loaded adapters, and
(with --lora-resolver-dir) adapters loaded on their first request by server/resolver.py.

The engine holds the adapters (engine.list_loras() is the truth; the engine assigns their
lora_int_ids); this module resolves names, confines runtime loads to --allowed-lora-roots (the
directory here; the engine's reader checks every file it opens, re-reads too, against the same
roots), and phrases the not-found / already-loaded answers exactly as vLLM does.
"""

from __future__ import annotations

import os
from dataclasses import replace
from http import HTTPStatus
from pathlib import Path

from loramux.engine.errors import EngineError
from loramux.engine.request import LoRARequest
from loramux.server.errors import ApiError, model_not_found
from loramux.server.metrics import ServerMetrics
from loramux.server.protocol import LoadLoRAAdapterRequest
from loramux.server.redaction import PathRedactor
from loramux.server.resolver import AdapterResolver
from loramux.server.responses import ModelCard
from loramux.server.settings import LoraModule, Settings


class ModelRegistry:
    def __init__(self, engine, settings: Settings, metrics: ServerMetrics,
                 redactor: PathRedactor) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.redactor = redactor
        self.roots = tuple(root.resolve() for root in settings.allowed_lora_roots)
        self.resolver = (None if settings.lora_resolver_dir is None else
                         AdapterResolver(settings.lora_resolver_dir, engine, metrics.track))
        for name in settings.served_model_names:
            metrics.track(name)

    def _adapters(self) -> dict[str, LoRARequest]:
        return {lora.lora_name: lora for lora in self.engine.list_loras()}

    async def resolve(self, model: str) -> str | None:
        """The adapter a request runs with: None for the base model; 404 for unknown names
        (after the resolver directory, if any, had no adapter of that name either)."""
        if model in self.settings.served_model_names:
            return None
        if model in self._adapters():
            return model
        if self.resolver is not None and await self.resolver.load(model):
            return model
        raise model_not_found(model, self.settings.base_name)

    def cards(self) -> list[ModelCard]:
        s = self.settings
        r = self.redactor
        base = [ModelCard(id=name, root=r.model_root(name, s.model),
                          max_model_len=self.engine.max_model_len)
                for name in s.served_model_names]
        return base + [ModelCard(id=lora.lora_name, root=r.adapter_root(lora.lora_name,
                                                                         lora.lora_path),
                                 parent=lora.base_model_name or s.base_name)
                       for lora in self._adapters().values()]

    def _adapter_path(self, raw: str) -> str:
        """The resolved path (symlinks followed) of a runtime load, confined to the allowed
        roots. A path outside them is refused before the filesystem is touched; every path that
        is not an adapter directory gets the same 404, so answers tell no more about the
        server's files than whether an adapter is there."""
        lexical = Path(os.path.abspath(Path(raw).expanduser()))
        self._check_confined(lexical)
        try:
            path = lexical.resolve()
            found = path.is_dir() and (path / "adapter_config.json").is_file()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long, NUL
            found = False
        if found:
            self._check_confined(path)
            return str(path)
        raise ApiError(HTTPStatus.NOT_FOUND,
                       f"no adapter at lora_path '{raw}': it must name a readable directory "
                       "holding adapter_config.json", "lora_path")

    def _check_confined(self, path: Path) -> None:
        if self.roots and not any(path.is_relative_to(root) for root in self.roots):
            raise ApiError(HTTPStatus.FORBIDDEN,
                           "lora_path is outside the directories allowed by "
                           "--allowed-lora-roots", "lora_path")

    async def load(self, body: LoadLoRAAdapterRequest) -> None:
        name = body.lora_name
        if name in self.settings.served_model_names:
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"'{name}' is the base model's name; choose another lora_name",
                           "lora_name")
        if name in self._adapters() and not body.load_inplace:
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"The lora adapter '{name}' has already been loaded. If you want to "
                           f"load the adapter in place, set 'load_inplace' to True.",
                           "lora_name")
        path = self._adapter_path(body.lora_path)
        request = replace(body.lora_request(path), allowed_roots=tuple(map(str, self.roots)))
        try:
            await self.engine.add_lora(request)
        except EngineError as exc:  # say it in the client's words, not the resolved path
            raise type(exc)(str(exc).replace(path, body.lora_path)) from exc
        self.metrics.track(name)

    async def unload(self, name: str) -> None:
        if name not in self._adapters():
            raise ApiError(HTTPStatus.NOT_FOUND, f"The lora adapter '{name}' cannot be found.",
                           "lora_name")
        await self.engine.remove_lora(name)
        self.metrics.forget(name)

    async def load_static(self, m: LoraModule) -> None:
        """One --lora-modules item (trusted: the operator's command line, so no root check)."""
        path = Path(m.path).expanduser()
        try:
            path = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop: the engine says the path is missing
            pass
        await self.engine.add_lora(LoRARequest(
            lora_name=m.name, lora_int_id=0, lora_path=str(path),
            base_model_name=m.base_model_name, is_3d_lora_weight=m.is_3d_lora_weight))
        self.metrics.track(m.name)
