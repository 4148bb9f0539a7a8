"""Prompts to token ids, on the server side: the chat template, or a completion prompt."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from jinja2 import TemplateError

from loramux.engine.errors import InvalidRequest, PromptTooLong
from loramux.server.protocol import ChatMessage

# apply_chat_template's own arguments: request fields set these, chat_template_kwargs may not.
_TEMPLATE_ARGS = {"conversation", "messages", "tokenize", "add_generation_prompt",
                  "continue_final_message", "tools", "documents", "chat_template",
                  "return_dict", "return_tensors", "padding", "truncation", "max_length",
                  "tokenizer_kwargs"}


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], template_kwargs: dict | None = None,
                    *, add_generation_prompt: bool = True, continue_final_message: bool = False,
                    check_text: Callable[[str], None] | None = None,
                    chat_template: str | None = None,
                    tools: list[dict] | None = None) -> list[int]:
    """Render the tokenizer's chat template (by default with the assistant's turn opened), then
    encode. `template_kwargs` (vLLM's `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`)
    become variables of the template; they cannot override the arguments named here.
    `check_text` sees the rendered text before it is encoded (PromptBound.check).
    `chat_template` (--chat-template) replaces the tokenizer's own; `tools` (OpenAI's tool
    definitions) are the template's `tools`."""
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise InvalidRequest("this model's tokenizer has no chat template; use /v1/completions")
    if add_generation_prompt and continue_final_message:
        raise InvalidRequest("add_generation_prompt and continue_final_message cannot both be "
                             "true")
    reserved = sorted(set(template_kwargs or {}) & _TEMPLATE_ARGS)
    if reserved:
        raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(reserved)}")
    try:
        text = tokenizer.apply_chat_template(
            [m.template_dict() for m in messages], add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False,
            chat_template=chat_template, tools=tools, **(template_kwargs or {}))
    except (TemplateError, ValueError) as exc:
        raise InvalidRequest(f"the chat template rejected the messages: {exc}") from exc
    if check_text is not None:
        check_text(text)
    # The template already wrote any BOS; encoding must not add a second one.
    return tokenizer.encode(text, add_special_tokens=False)


def check_token_ids(tokenizer, ids: list[int], field: str) -> None:
    """Token ids outside the vocabulary are a 400 naming them."""
    vocab = len(tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"{field}: token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {vocab})")


def completion_prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """Text is encoded as vLLM does (special tokens added); token ids must be in the vocab."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    check_token_ids(tokenizer, prompt, "prompt")
    return list(prompt)


# A normalizer may compose up to 3 code points into one (NFC: Hangul L+V+T jamo), so a token of
# L characters can stand for up to 4 L characters of input (rounded up, for safety).
_NORMALIZATION = 4


class PromptBound:
    """Refuses, before any tokenizing, a text that cannot fit max_model_len: a text of N
    characters encodes to at least ceil(N / (4 L)) tokens, L the longest vocabulary entry in
    characters (in bytes for byte-level BPE, whose entries spell one character per byte), 4 for
    normalization. Assumes the tokenizer drops no input characters (true of byte-level BPE and
    SentencePiece; a whitespace-splitting word-level tokenizer may see mostly-blank texts
    refused that would have fit)."""

    def __init__(self, tokenizer, max_model_len: int) -> None:
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        self.chars_per_token = _NORMALIZATION * max((len(t) for t in vocab), default=1)
        self.max_model_len = max_model_len

    def check(self, text: str, max_tokens: int | None) -> None:
        prompt = -(-len(text) // self.chars_per_token)
        completion = max_tokens or 1
        if prompt + completion > self.max_model_len:
            raise PromptTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested at least {prompt + completion} tokens (at least {prompt} in the "
                f"prompt, {completion} for the completion). Please reduce the length of the "
                "prompt or completion.")


class Prompts:
    """Prompts of the generation routes to token ids, off the event loop: the chat template
    and the tokenizer run on `workers` threads of their own (Rust tokenizers release the GIL,
    so streams go on meanwhile), and texts that cannot fit are refused before tokenizing."""

    def __init__(self, tokenizer, max_model_len: int, chat_template: str | None = None,
                 workers: int = 2) -> None:
        self.tokenizer, self.bound = tokenizer, PromptBound(tokenizer, max_model_len)
        self.chat_template = chat_template
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenizer")

    async def _run(self, work, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, partial(work, *args, **kwargs))

    async def completion(self, prompt: str | list[int], max_tokens: int | None) -> list[int]:
        if isinstance(prompt, str):
            self.bound.check(prompt, max_tokens)
        return await self._run(completion_prompt_ids, self.tokenizer, prompt)

    async def chat(self, messages: list[ChatMessage], template_kwargs: dict | None,
                   max_tokens: int | None, tools: list[dict] | None = None) -> list[int]:
        return await self._run(chat_prompt_ids, self.tokenizer, messages, template_kwargs,
                               check_text=partial(self.bound.check, max_tokens=max_tokens),
                               chat_template=self.chat_template, tools=tools)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
