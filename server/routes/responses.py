"""POST /v1/responses: OpenAI's Responses API for text, run as a chat request."""

from __future__ import annotations

from http import HTTPStatus as S

from fastapi import APIRouter, Depends, Request

from loramux.server.errors import documented
from loramux.server.generation import Generation
from loramux.server.responses_api import ResponseEvent, ResponsesFormatter, ResponsesRequest
from loramux.server.state import State, require_api_key
from loramux.server.streaming import event_stream, sse_response

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=documented(
    S.BAD_REQUEST, S.UNAUTHORIZED, S.NOT_FOUND, S.CONFLICT, S.REQUEST_ENTITY_TOO_LARGE,
    S.SERVICE_UNAVAILABLE))


@router.post("/responses", responses=event_stream(None, ResponseEvent))
async def create_response(body: ResponsesRequest, request: Request, state: State):
    lora = await state.models.resolve(body.model)
    body = body.with_defaults(state.settings.sampling_defaults)
    params = body.sampling_params()
    prompt_ids = await state.prompts.chat(body.messages(), None, params.max_tokens)
    formatter = ResponsesFormatter(state.engine.tokenizer, body.model, body)
    generation = Generation(state.engine, formatter.id, lora, state.metrics.timer(body.model),
                            state.drain)
    await generation.start(request, prompt_ids, params)
    if body.stream:
        return sse_response([(generation, formatter)], 1, True, state.redactor.text)
    return formatter.response(await generation.final(request))
