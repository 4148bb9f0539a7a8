"""POST /tokenize and /detokenize (vLLM's bodies), and /ping (SageMaker's health check).

`/tokenize` takes a completion body (`prompt`) or a chat body (`messages`, rendered with the
chat template exactly as /v1/chat/completions renders it) and answers
`{"count", "max_model_len", "tokens", "token_strs"}`; `/detokenize` takes `{"tokens"}` and
answers `{"prompt"}`. `model` is optional; when given it must name the base model or a loaded
adapter (404 otherwise), as on the generation routes. Tokenizing runs off the event loop.
"""

from __future__ import annotations

from http import HTTPStatus as S

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from loramux.server.errors import documented
from loramux.server.prompt import chat_prompt_ids, check_token_ids
from loramux.server.protocol import ChatMessage, _Body
from loramux.server.routes.health import health
from loramux.server.state import ServerState, State, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)], responses=documented(
    S.BAD_REQUEST, S.UNAUTHORIZED, S.NOT_FOUND, S.REQUEST_ENTITY_TOO_LARGE,
    S.SERVICE_UNAVAILABLE))
ping_router = APIRouter()


class TokenizeCompletionRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


async def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None:
        await state.models.resolve(model)


def _encode(tokenizer, body: TokenizeCompletionRequest | TokenizeChatRequest,
            chat_template: str | None) -> list[int]:
    if isinstance(body, TokenizeChatRequest):
        return chat_prompt_ids(tokenizer, body.messages, body.chat_template_kwargs,
                               add_generation_prompt=body.add_generation_prompt,
                               continue_final_message=body.continue_final_message,
                               chat_template=chat_template)
    return tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)


@router.post("/tokenize")
async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest,
                   state: State) -> TokenizeResponse:
    await _check_model(state, body.model)
    tokenizer = state.engine.tokenizer
    ids = await run_in_threadpool(_encode, tokenizer, body, state.prompts.chat_template)
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len,
                            tokens=ids, token_strs=strs)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State) -> DetokenizeResponse:
    await _check_model(state, body.model)
    tokenizer = state.engine.tokenizer
    check_token_ids(tokenizer, body.tokens, "tokens")
    return DetokenizeResponse(prompt=await run_in_threadpool(tokenizer.decode, body.tokens))


@ping_router.api_route("/ping", methods=["GET", "POST"], response_class=Response,
                       responses={200: {"description": "the engine loop runs (empty body)"},
                                  **documented(S.SERVICE_UNAVAILABLE)})
async def ping(state: State) -> Response:
    return await health(state)
