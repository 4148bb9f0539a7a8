"""The names clients may put in `model`: the base model's served names and loaded adapters.

The engine holds the adapters (engine.list_loras() is the truth; the engine assigns their
lora_int_ids); this module resolves names, confines runtime loads to --allowed-lora-roots (the
directory here; the engine's reader checks every file it opens, re-reads too, against the same
roots), and phrases the not-found / already-loaded answers exactly as vLLM does.
"""

from __future__ import annotations

from dataclasses import replace
from http import HTTPStatus
from pathlib import Path

from engine.request import LoRARequest
from server.errors import ApiError, model_not_found
from server.protocol import LoadLoRAAdapterRequest
from server.responses import ModelCard
from server.settings import LoraModule, Settings


class ModelRegistry:
    def __init__(self, engine, settings: Settings) -> None:
        self.engine, self.settings = engine, settings
        self.roots = tuple(root.resolve() for root in settings.allowed_lora_roots)

    def _adapters(self) -> dict[str, LoRARequest]:
        return {lora.lora_name: lora for lora in self.engine.list_loras()}

    def resolve(self, model: str) -> str | None:
        """The adapter a request runs with: None for the base model; 404 for unknown names."""
        if model in self.settings.served_model_names:
            return None
        if model in self._adapters():
            return model
        raise model_not_found(model, self.settings.base_name)

    def cards(self) -> list[ModelCard]:
        s = self.settings
        base = [ModelCard(id=name, root=s.model, max_model_len=self.engine.max_model_len)
                for name in s.served_model_names]
        return base + [ModelCard(id=lora.lora_name, root=lora.lora_path,
                                 parent=lora.base_model_name or s.base_name)
                       for lora in self._adapters().values()]

    def _confined(self, raw: str) -> str:
        """The resolved path (symlinks followed), which must lie under an allowed root."""
        path = Path(raw).expanduser().resolve()
        if self.roots and not any(path.is_relative_to(root) for root in self.roots):
            raise ApiError(HTTPStatus.FORBIDDEN,
                           "lora_path is outside the directories allowed by "
                           "--allowed-lora-roots", "lora_path")
        return str(path)

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
        request = body.lora_request(self._confined(body.lora_path))
        await self.engine.add_lora(replace(request, allowed_roots=tuple(map(str, self.roots))))

    async def unload(self, name: str) -> None:
        if name not in self._adapters():
            raise ApiError(HTTPStatus.NOT_FOUND, f"The lora adapter '{name}' cannot be found.",
                           "lora_name")
        await self.engine.remove_lora(name)

    async def load_static(self, m: LoraModule) -> None:
        """One --lora-modules item (trusted: the operator's command line, so no root check)."""
        await self.engine.add_lora(LoRARequest(
            lora_name=m.name, lora_int_id=0,
            lora_path=str(Path(m.path).expanduser().resolve()),
            base_model_name=m.base_model_name, is_3d_lora_weight=m.is_3d_lora_weight))
