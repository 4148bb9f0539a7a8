"""Prompts to token ids, on the server side: the chat template, or a completion prompt."""

from __future__ import annotations

from jinja2 import TemplateError

from engine.errors import InvalidRequest
from server.protocol import ChatMessage

# apply_chat_template's own arguments: request fields set these, chat_template_kwargs may not.
_TEMPLATE_ARGS = {"conversation", "messages", "tokenize", "add_generation_prompt",
                  "continue_final_message", "tools", "documents", "chat_template",
                  "return_dict", "return_tensors", "padding", "truncation", "max_length",
                  "tokenizer_kwargs"}


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], template_kwargs: dict | None = None,
                    *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> list[int]:
    """Render the tokenizer's chat template (by default with the assistant's turn opened), then
    encode. `template_kwargs` (vLLM's `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`)
    become variables of the template; they cannot override the arguments named here."""
    if not getattr(tokenizer, "chat_template", None):
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
            **(template_kwargs or {}))
    except (TemplateError, ValueError) as exc:
        raise InvalidRequest(f"the chat template rejected the messages: {exc}") from exc
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
