"""OpenAI's Responses API (`POST /v1/responses`), text in and text out, over the same engine
requests as chat: the body, its mapping onto chat messages, and the formatter.

`input` is a string (one user turn) or a list of message items (`role` + `content` as a string
or `input_text` / `output_text` parts); `instructions` becomes a leading system message. Nothing
is stored, so `previous_response_id` and `store`-dependent features are refused. A stream is
the event sequence OpenAI sends: `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then
`response.completed` (or `response.incomplete` when `max_output_tokens` cut the answer).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from loramux.engine.request import RequestOutput, SamplingParams
from loramux.server.formats import ChatFormatter
from loramux.server.protocol import ChatMessage, _GenerationRequest
from loramux.server.responses import random_id

_TEXT_PARTS = {"input_text", "output_text", "text"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class ResponsesRequest(_GenerationRequest):
    """POST /v1/responses. Sampling fields as on the chat route (vLLM extras too), n = 1."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    n: Literal[1] = 1
    _max_tokens_field: ClassVar[str] = "max_output_tokens"

    @field_validator("input")
    @classmethod
    def _text_messages(cls, input_: str | list[dict[str, Any]]) -> Any:
        if isinstance(input_, list):
            for i, item in enumerate(input_):
                _message(i, item)
        return input_

    @field_validator("previous_response_id")
    @classmethod
    def _nothing_stored(cls, previous: str | None) -> None:
        if previous is not None:
            raise ValueError("not supported: loramux stores no responses; send the whole "
                             "conversation in `input`")
        return previous

    @field_validator("text")
    @classmethod
    def _plain_text(cls, text: dict | None) -> dict | None:
        if text and text.get("format", {"type": "text"}).get("type") != "text":
            raise ValueError("text.format: only {'type': 'text'} is supported")
        return text

    def messages(self) -> list[ChatMessage]:
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) \
            else self.input
        head = [ChatMessage(role="system", content=self.instructions)] if self.instructions \
            else []
        return head + [_message(i, item) for i, item in enumerate(items)]

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_output_tokens, None)


def _message(index: int, item: dict[str, Any]) -> ChatMessage:
    """One input item as a chat message; anything but a text message is a 400 naming it."""
    where = f"input[{index}]"
    if item.get("type", "message") != "message" or item.get("role") not in _ROLES:
        raise ValueError(f"{where}: only message items with role user, assistant, system or "
                         f"developer are supported (got type {item.get('type', 'message')!r}, "
                         f"role {item.get('role')!r})")
    content = item.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content):
            raise ValueError(f"{where}.content: only text parts are supported")
        content = "".join(str(part.get("text", "")) for part in content)
    elif not isinstance(content, str):
        raise ValueError(f"{where}.content: a string or a list of text parts is required")
    return ChatMessage(role=_ROLES[item["role"]], content=content)


class ResponseEvent(BaseModel):
    """One streamed event; its `type` is also the SSE `event:` name."""

    model_config = {"extra": "allow"}
    type: str
    sequence_number: int


class ResponsesFormatter(ChatFormatter):
    """RequestOutput -> a Responses object, or its stream of events (one output message)."""

    def __init__(self, tokenizer, model: str, body: ResponsesRequest) -> None:
        super().__init__(tokenizer, random_id("resp"), model, want_logprobs=False)
        self.body, self.item_id, self.created = body, random_id("msg"), int(time.time())
        self._sequence = 0

    def _event(self, type_: str, **fields: Any) -> ResponseEvent:
        event = ResponseEvent(type=f"response.{type_}", sequence_number=self._sequence, **fields)
        self._sequence += 1
        return event

    def _item(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [_text_part(text)]
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant",
                "content": content}

    def _object(self, out: RequestOutput | None) -> dict:
        choice = out.outputs[0] if out is not None else None
        cut = choice is not None and choice.finish_reason == "length"
        status = "in_progress" if choice is None else "incomplete" if cut else "completed"
        prompt = len(out.prompt_token_ids) if out is not None else 0
        made = len(choice.token_ids) if choice is not None else 0
        b = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "temperature": b.temperature, "top_p": b.top_p, "parallel_tool_calls": False,
            "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}},
            "truncation": "disabled", "metadata": {}, "previous_response_id": None,
            "output": [] if choice is None else [self._item(choice.text, status)],
            "usage": None if out is None else {
                "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": made, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + made},
        }

    def response(self, out: RequestOutput) -> dict:
        return self._object(out)

    def opening(self, n: int) -> list[ResponseEvent]:
        at = {"output_index": 0}
        return [self._event("created", response=self._object(None)),
                self._event("in_progress", response=self._object(None)),
                self._event("output_item.added", **at, item=self._item(None, "in_progress")),
                self._event("content_part.added", item_id=self.item_id, **at, content_index=0,
                            part=_text_part(""))]

    def chunks(self, out: RequestOutput) -> list[ResponseEvent]:
        return [self._event("output_text.delta", item_id=self.item_id, output_index=0,
                            content_index=0, delta=c.text_delta, logprobs=[])
                for c in self._changed(out) if c.text_delta]

    def closing(self, outs: list[RequestOutput], include_usage: bool) -> list[ResponseEvent]:
        out, = outs
        final = self._object(out)
        text, at = out.outputs[0].text, {"item_id": self.item_id, "output_index": 0}
        return [self._event("output_text.done", **at, content_index=0, text=text, logprobs=[]),
                self._event("content_part.done", **at, content_index=0, part=_text_part(text)),
                self._event("output_item.done", output_index=0, item=final["output"][0]),
                self._event(final["status"], response=final)]


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
