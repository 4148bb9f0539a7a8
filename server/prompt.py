"""Prompts to token ids, on the server side: the chat template, or a completion prompt."""

from __future__ import annotations

from jinja2 import TemplateError

from engine.errors import InvalidRequest
from server.protocol import ChatMessage


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Render the tokenizer's chat template with the assistant's turn opened, then encode."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model's tokenizer has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template([m.template_dict() for m in messages],
                                             add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise InvalidRequest(f"the chat template rejected the messages: {exc}") from exc
    # The template already wrote any BOS; encoding must not add a second one.
    return tokenizer.encode(text, add_special_tokens=False)


def completion_prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """Text is encoded as vLLM does (special tokens added); token ids must be in the vocab."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    vocab = len(tokenizer)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    return list(prompt)
