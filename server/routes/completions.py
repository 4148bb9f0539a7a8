"""POST /v1/completions and /v1/chat/completions: resolve model, tokenize, run, answer.

A completions `prompt` list is a batch: one engine request per prompt, all submitted at once,
answered as vLLM does with `n` choices per prompt (prompt i's at indices i*n .. i*n+n-1) and the
usage summed.
"""

from __future__ import annotations

import dataclasses
from http import HTTPStatus as S

from fastapi import APIRouter, Depends, Request

from loramux.engine.errors import InvalidRequest
from loramux.engine.request import SamplingParams, StructuredOutputs
from loramux.server.errors import documented
from loramux.server.formats import ChatFormatter, CompletionFormatter, Formatter, usage_of
from loramux.server.generation import Generation, final_all, start_all
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest
from loramux.server.reasoning import think_end_token
from loramux.server.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    random_id,
)
from loramux.server.state import ServerState, State, require_api_key
from loramux.server.streaming import event_stream, sse_response
from loramux.server.tool_calls import tags_are_tokens, tool_call_grammar

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=documented(
    S.BAD_REQUEST, S.UNAUTHORIZED, S.NOT_FOUND, S.CONFLICT, S.REQUEST_ENTITY_TOO_LARGE,
    S.SERVICE_UNAVAILABLE))


@router.post("/completions", responses=event_stream(CompletionResponse, CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request, state: State):
    lora = await state.models.resolve(body.model)
    body = body.with_defaults(state.settings.sampling_defaults)
    tokenizer, response_id = state.engine.tokenizer, random_id("cmpl")
    max_tokens = body.sampling_params().max_tokens
    given = body.prompts()
    prompts = [await state.prompts.completion(p, max_tokens) for p in given]
    formatters = [CompletionFormatter(tokenizer, response_id, body.model,
                                      want_logprobs=body.logprobs is not None,
                                      first_index=i * body.n, echo=_echo(body, text, ids, state),
                                      echo_only=body.echo_only)
                  for i, (text, ids) in enumerate(zip(given, prompts, strict=True))]
    return await _run(state, request, body, prompts, lora, formatters)


def _echo(body: CompletionRequest, prompt: str | list[int], ids: list[int],
          state: ServerState) -> str | None:
    """The text echo puts first: the prompt as sent, or token ids decoded (as vLLM)."""
    if not body.echo:
        return None
    return prompt if isinstance(prompt, str) else state.engine.tokenizer.decode(ids)


@router.post("/chat/completions",
             responses=event_stream(ChatCompletionResponse, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: State):
    lora = await state.models.resolve(body.model)
    body = body.with_defaults(state.settings.sampling_defaults)
    params = _reasoning_first(body, _chat_params(body, state), state)
    prompt_ids = await state.prompts.chat(body.messages, body.chat_template_kwargs,
                                          params.max_tokens, body.template_tools())
    formatter = ChatFormatter(state.engine.tokenizer, random_id("chatcmpl"), body.model,
                              want_logprobs=body.logprobs,
                              tools=body.effective_tool_choice != "none",
                              thinking=_thinking(body, params, state))
    return await _run(state, request, body, [prompt_ids], lora, [formatter], params)


def _thinking(body: ChatCompletionRequest, params: SamplingParams,
              state: ServerState) -> bool | None:
    """None without --reasoning-parser. A grammar (structured output, required or named tool
    choice) that holds from the first token leaves the output no reasoning."""
    if not state.settings.reasoning_parser:
        return None
    grammar = params.structured_outputs
    return body.thinking and (grammar is None or grammar.start_after is not None)


def _reasoning_first(body: ChatCompletionRequest, params: SamplingParams,
                     state: ServerState) -> SamplingParams:
    """With --reasoning-parser and thinking on, a grammar starts after the model's `</think>`
    (as vLLM's structured outputs do by default): the reasoning is free, the answer follows
    the grammar. A tokenizer without a `</think>` token keeps the grammar from the start."""
    grammar = params.structured_outputs
    if grammar is None or not state.settings.reasoning_parser or not body.thinking:
        return params
    end = think_end_token(state.engine.tokenizer)
    if end is None:
        return params
    return dataclasses.replace(params, structured_outputs=dataclasses.replace(
        grammar, start_after=end))

def _chat_params(body: ChatCompletionRequest, state: ServerState) -> SamplingParams:
    """The request's sampling; tool_choice required or named adds the grammar of its calls."""
    params, choice, settings = body.sampling_params(), body.effective_tool_choice, state.settings
    if choice == "auto" and not (settings.enable_auto_tool_choice and settings.tool_call_parser):
        raise InvalidRequest('"auto" tool choice requires --enable-auto-tool-choice and '
                             "--tool-call-parser to be set")
    if choice in ("none", "auto"):
        return params
    grammar = tool_call_grammar([t.function.model_dump() for t in body.tools],
                                None if choice == "required" else choice,
                                body.parallel_tool_calls, tags_are_tokens(state.engine.tokenizer))
    return dataclasses.replace(params, structured_outputs=StructuredOutputs(
        grammar=grammar, source="tool_choice"))


async def _run(state: ServerState, request: Request,
               body: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
               lora: str | None, formatters: list[Formatter],
               params: SamplingParams | None = None):
    params, rid = params or body.sampling_params(), formatters[0].id
    generations = [Generation(state.engine, rid if len(prompts) == 1 else f"{rid}-{i}", lora,
                              state.metrics.timer(body.model), state.drain)
                   for i in range(len(prompts))]
    await start_all(request, list(zip(generations, prompts, strict=True)), params)
    if body.stream:
        return sse_response(list(zip(generations, formatters, strict=True)), body.n,
                            body.include_usage, state.redactor.text)
    outs = await final_all(request, generations)
    if len(outs) == 1:
        return formatters[0].response(outs[0])
    answers = [f.response(out) for f, out in zip(formatters, outs, strict=True)]
    shown = [f.visible(out) for f, out in zip(formatters, outs, strict=True)]
    return answers[0].model_copy(update={"choices": [c for a in answers for c in a.choices],
                                         "usage": usage_of(*shown)})
