"""GET /v1/models: the base model's card, then one card per loaded adapter."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.responses import ModelList
from server.state import ServerState, get_state, require_api_key

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/models")
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    return ModelList(data=state.models.cards())
