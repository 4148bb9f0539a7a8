"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (mounted only when runtime LoRA
updating is allowed). Success answers are vLLM's plain-text sentences."""

from __future__ import annotations

from http import HTTPStatus as S

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from loramux.server.errors import documented
from loramux.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from loramux.server.state import State, require_api_key

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=documented(
    S.BAD_REQUEST, S.UNAUTHORIZED, S.NOT_FOUND, S.REQUEST_ENTITY_TOO_LARGE,
    S.SERVICE_UNAVAILABLE))


@router.post("/load_lora_adapter", response_class=PlainTextResponse,
             responses=documented(S.FORBIDDEN))
async def load_lora_adapter(body: LoadLoRAAdapterRequest, state: State) -> str:
    await state.models.load(body)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, state: State) -> str:
    await state.models.unload(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
