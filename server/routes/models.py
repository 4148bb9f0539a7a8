"""GET /v1/models: the base model's card, then one card per loaded adapter."""

from __future__ import annotations

from http import HTTPStatus as S

from fastapi import APIRouter, Depends

from loramux.server.errors import documented
from loramux.server.responses import ModelList
from loramux.server.state import State, require_api_key

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)],
                   responses=documented(S.UNAUTHORIZED, S.SERVICE_UNAVAILABLE))


@router.get("/models")
async def list_models(state: State) -> ModelList:
    return ModelList(data=state.models.cards())
