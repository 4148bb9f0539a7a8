"""POST /v1/responses: OpenAI's Responses API for text, run as a chat request."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.generation import Generation
from server.prompt import chat_prompt_ids
from server.responses_api import ResponsesFormatter, ResponsesRequest
from server.state import State, require_api_key
from server.streaming import sse_response

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post("/responses")
async def create_response(body: ResponsesRequest, request: Request, state: State):
    lora = state.models.resolve(body.model)
    prompt_ids = chat_prompt_ids(state.engine.tokenizer, body.messages())
    formatter = ResponsesFormatter(state.engine.tokenizer, body.model, body)
    generation = Generation(state.engine, formatter.id, lora, state.metrics.timer(body.model))
    await generation.start(request, prompt_ids, body.sampling_params())
    if body.stream:
        return sse_response([(generation, formatter)], 1, include_usage=True)
    return formatter.response(await generation.final(request))
