"""POST /v1/completions and /v1/chat/completions: resolve model, tokenize, run, answer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.formats import ChatFormatter, CompletionFormatter, Formatter
from server.generation import Generation
from server.prompt import chat_prompt_ids, completion_prompt_ids
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.responses import random_id
from server.state import ServerState, State, require_api_key
from server.streaming import sse_response

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post("/completions")
async def create_completion(body: CompletionRequest, request: Request, state: State):
    lora = state.models.resolve(body.model)
    prompt_ids = completion_prompt_ids(state.engine.tokenizer, body.prompt)
    formatter = CompletionFormatter(state.engine.tokenizer, random_id("cmpl"), body.model,
                                    want_logprobs=body.logprobs is not None)
    return await _run(state, request, body, prompt_ids, lora, formatter)


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: State):
    lora = state.models.resolve(body.model)
    prompt_ids = chat_prompt_ids(state.engine.tokenizer, body.messages, body.chat_template_kwargs)
    formatter = ChatFormatter(state.engine.tokenizer, random_id("chatcmpl"), body.model,
                              want_logprobs=body.logprobs)
    return await _run(state, request, body, prompt_ids, lora, formatter)


async def _run(state: ServerState, request: Request,
               body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
               lora: str | None, formatter: Formatter):
    params = body.sampling_params()
    generation = Generation(state.engine, formatter.id, lora, state.metrics.timer(body.model))
    await generation.start(request, prompt_ids, params)
    if body.stream:
        return sse_response(generation, formatter, body.n, body.include_usage)
    return formatter.response(await generation.final(request))
