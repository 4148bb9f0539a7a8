"""RequestOutput -> OpenAI objects, for chat and for text completions.

A formatter belongs to one request. In a stream it turns each RequestOutput's deltas into
chunks (one per choice that changed) and remembers which choices already reported their
finish_reason; without a stream it turns the final RequestOutput into the response.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from pydantic import BaseModel

from loramux.engine.request import CompletionOutput, RequestOutput, TokenLogprob
from loramux.server.reasoning import ReasoningSplitter, split_reasoning
from loramux.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatLogprobToken,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    PromptLogprob,
    ToolCall,
    TopLogprob,
    UsageInfo,
)
from loramux.server.tool_calls import ToolCallStream, parse_tool_calls


def usage_of(*outs: RequestOutput) -> UsageInfo:
    """Token counts of one request, or summed over the requests of a prompt batch."""
    prompt = sum(len(out.prompt_token_ids) for out in outs)
    completion = sum(len(choice.token_ids) for out in outs for choice in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


_CONTEXT = 8  # tokens of left context when spelling one token (spaces depend on it)


class _Formatter:
    def __init__(self, tokenizer, response_id: str, model: str, want_logprobs: bool) -> None:
        self.tokenizer, self.id, self.model = tokenizer, response_id, model
        self.want_logprobs = want_logprobs
        self._reported_finish: set[int] = set()

    def _pieces(self, out: RequestOutput, choice: CompletionOutput,
                entries: list[TokenLogprob]) -> list[tuple[str, list[tuple[str, float]]]]:
        """Spell each logprob entry (the choice's last len(entries) tokens)."""
        token_ids = out.prompt_token_ids[-_CONTEXT:] + choice.token_ids
        return self._spell(token_ids, len(token_ids) - len(entries), entries)

    def _spell(self, token_ids: list[int], start: int, entries: list[TokenLogprob]
               ) -> list[tuple[str, list[tuple[str, float]]]]:
        """Spell entry i (token_ids[start + i]) and its alternatives as the text each adds
        after its left context, so a leading space is kept."""
        spelled = []
        for i, entry in enumerate(entries):
            prefix = token_ids[max(0, start + i - _CONTEXT): start + i]
            before = self.tokenizer.decode(prefix)
            spell = partial(self._piece, prefix, before)
            spelled.append((spell(entry.token_id), [(spell(t), lp) for t, lp in entry.top]))
        return spelled

    def _piece(self, prefix: list[int], before: str, token_id: int) -> str:
        text = self.tokenizer.decode(prefix + [token_id])
        return text[len(before):] if text.startswith(before) else self.tokenizer.decode([token_id])

    def _changed(self, out: RequestOutput) -> list[CompletionOutput]:
        """Choices with new text or tokens, or a finish_reason not yet reported."""
        changed = []
        for choice in out.outputs:
            newly_finished = choice.finished and choice.index not in self._reported_finish
            if choice.text_delta or choice.token_ids_delta or newly_finished:
                changed.append(choice)
            if newly_finished:
                self._reported_finish.add(choice.index)
        return changed

    def visible(self, out: RequestOutput) -> RequestOutput:
        """The output as the answer shows it (usage counts what is shown)."""
        return out

    def opening(self, n: int) -> list[BaseModel]:
        return []

    def closing(self, outs: list[RequestOutput], include_usage: bool) -> list[BaseModel]:
        """What a stream sends after the last outputs (one per prompt of the request): the
        usage chunk, summed over them, when it was asked for."""
        return [self.usage_chunk(*outs)] if include_usage else []


_Piece = tuple[str, float | None, dict[str, float] | None]  # token text, logprob, top logprobs


class CompletionFormatter(_Formatter):
    """One prompt's choices; in a batch of prompts, prompt i's choices start at index i * n.

    echo: the prompt's text, put before each choice's text (in a stream, in its first chunk),
    and with logprobs the prompt tokens' entries before the choice's (the first None);
    echo_only (max_tokens 0): the prompt alone, the token generated for it is not shown.
    """

    def __init__(self, tokenizer, response_id: str, model: str, want_logprobs: bool,
                 first_index: int = 0, echo: str | None = None, echo_only: bool = False) -> None:
        super().__init__(tokenizer, response_id, model, want_logprobs)
        self.first_index, self.echo, self.echo_only = first_index, echo, echo_only
        self._offsets: dict[int, int] = {}
        self._echoed: set[int] = set()
        self._prompt_spelled: list[tuple[str, list[tuple[str, float]]]] | None = None

    def visible(self, out: RequestOutput) -> RequestOutput:
        if not self.echo_only:
            return out
        hidden = {"text": "", "token_ids": [], "text_delta": "", "token_ids_delta": [],
                  "logprobs_delta": []}
        return dataclasses.replace(out, outputs=[dataclasses.replace(
            c, logprobs=None if c.logprobs is None else [], **hidden) for c in out.outputs])

    def _prompt_pieces(self, out: RequestOutput) -> list[tuple[str, list[tuple[str, float]]]]:
        """The prompt's scored tokens (all but the first) spelled, once per request."""
        if self._prompt_spelled is None:
            self._prompt_spelled = self._spell(out.prompt_token_ids, 1, out.prompt_logprobs[1:])
        return self._prompt_spelled

    def _logprobs(self, out: RequestOutput, choice: CompletionOutput,
                  entries: list[TokenLogprob], echo: bool) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        pieces: list[_Piece] = []
        if echo and out.prompt_logprobs is not None:
            pieces.append((self.tokenizer.decode(out.prompt_token_ids[:1]), None, None))
            pieces += [(token, e.logprob, dict(top)) for (token, top), e in zip(
                self._prompt_pieces(out), out.prompt_logprobs[1:], strict=True)]
        pieces += [(token, e.logprob, dict(top)) for (token, top), e in zip(
            self._pieces(out, choice, entries), entries, strict=True)]
        offset, text_offset = self._offsets.get(choice.index, 0), []
        for token, _, _ in pieces:
            text_offset.append(offset)
            offset += len(token)
        self._offsets[choice.index] = offset
        # built whole so that validation floors non-finite logprobs (responses.Logprob)
        return CompletionLogprobs(tokens=[p[0] for p in pieces],
                                  token_logprobs=[p[1] for p in pieces],
                                  top_logprobs=[p[2] for p in pieces], text_offset=text_offset)

    def _prompt_logprobs(self, out: RequestOutput) -> list[dict[str, PromptLogprob] | None] | None:
        """vLLM's prompt_logprobs: each scored prompt token first, then its position's top-k."""
        if out.prompt_logprobs is None:
            return None
        field: list[dict[str, PromptLogprob] | None] = [None]
        for entry, (token, top) in zip(out.prompt_logprobs[1:], self._prompt_pieces(out),
                                       strict=True):
            ranked = {str(entry.token_id): PromptLogprob(logprob=entry.logprob, rank=entry.rank,
                                                         decoded_token=token)}
            for rank, ((token_id, lp), (text, _)) in enumerate(zip(entry.top, top), 1):
                ranked.setdefault(str(token_id), PromptLogprob(logprob=lp, rank=rank,
                                                               decoded_token=text))
            field.append(ranked)
        return field

    def _choice(self, out: RequestOutput, c: CompletionOutput, text: str,
                entries: list[TokenLogprob], **extra) -> CompletionChoice:
        """A choice whose text (a delta in a stream) is preceded by the echo the first time."""
        echo = self.echo is not None and c.index not in self._echoed
        if echo:
            self._echoed.add(c.index)
            text = self.echo + text
        return CompletionChoice(index=self.first_index + c.index, text=text,
                                logprobs=self._logprobs(out, c, entries, echo),
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                **extra)

    def chunks(self, out: RequestOutput) -> list[CompletionResponse]:
        out = self.visible(out)
        return [CompletionResponse(id=self.id, model=self.model, choices=[
            self._choice(out, c, c.text_delta, c.logprobs_delta)]) for c in self._changed(out)]

    def usage_chunk(self, *outs: RequestOutput) -> CompletionResponse:
        return CompletionResponse(id=self.id, model=self.model, choices=[],
                                  usage=usage_of(*map(self.visible, outs)))

    def response(self, out: RequestOutput) -> CompletionResponse:
        out = self.visible(out)
        choices = [self._choice(out, c, c.text, c.logprobs or [],
                                prompt_logprobs=self._prompt_logprobs(out))
                   for c in out.outputs]
        return CompletionResponse(id=self.id, model=self.model, choices=choices,
                                  usage=usage_of(out))


class ChatFormatter(_Formatter):
    """tools: parse Hermes tool calls out of the text (server/tool_calls.py); thinking: with
    --reasoning-parser, whether the request thinks (server/reasoning.py), None without it."""

    def __init__(self, tokenizer, response_id: str, model: str, want_logprobs: bool,
                 tools: bool = False, thinking: bool | None = None) -> None:
        super().__init__(tokenizer, response_id, model, want_logprobs)
        self.tools, self.thinking = tools, thinking
        self._reasoning: dict[int, ReasoningSplitter] = {}
        self._calls: dict[int, ToolCallStream] = {}

    def _logprobs(self, out: RequestOutput, choice: CompletionOutput,
                  entries: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        content = []
        for (token, top), entry in zip(self._pieces(out, choice, entries), entries, strict=True):
            content.append(ChatLogprobToken(
                token=token, logprob=entry.logprob, bytes=list(token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                              for t, lp in top]))
        return ChatLogprobs(content=content)

    def opening(self, n: int) -> list[ChatCompletionChunk]:
        """vLLM and OpenAI open each choice with a role-only delta."""
        return [ChatCompletionChunk(id=self.id, model=self.model, choices=[ChatStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(n)]

    def chunks(self, out: RequestOutput) -> list[ChatCompletionChunk]:
        return [ChatCompletionChunk(id=self.id, model=self.model, choices=[ChatStreamChoice(
            index=c.index, delta=self._delta(c), logprobs=self._logprobs(out, c, c.logprobs_delta),
            finish_reason=self._finish_reason(c, bool(self._stream_calls(c).calls)),
            stop_reason=c.stop_reason)]) for c in self._changed(out)]

    def _stream_calls(self, choice: CompletionOutput) -> ToolCallStream:
        return self._calls.setdefault(choice.index, ToolCallStream())

    def _delta(self, choice: CompletionOutput) -> DeltaMessage:
        """The choice's text delta split into reasoning, content and tool-call pieces."""
        reasoning, content = "", choice.text_delta
        if self.thinking is not None:
            splitter = self._reasoning.setdefault(choice.index, ReasoningSplitter(self.thinking))
            reasoning, content = splitter.feed(content)
            if choice.finished:
                more = splitter.finish()
                reasoning, content = reasoning + more[0], content + more[1]
        calls = []
        if self.tools:
            stream = self._stream_calls(choice)
            content, calls = stream.feed(content)
            if choice.finished:
                more, more_calls = stream.finish()
                content, calls = content + more, calls + more_calls
        return DeltaMessage(
            content=content if content or not (reasoning or calls) else None,
            reasoning_content=reasoning or None, reasoning=reasoning or None,
            tool_calls=[DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                                      function=DeltaFunctionCall(name=d.name,
                                                                 arguments=d.arguments))
                        for d in calls] or None)

    @staticmethod
    def _finish_reason(choice: CompletionOutput, called: bool) -> str | None:
        """vLLM's: a choice that stopped after calling tools finished with tool_calls."""
        return "tool_calls" if called and choice.finish_reason == "stop" else choice.finish_reason

    def _message(self, choice: CompletionOutput) -> tuple[AssistantMessage, bool]:
        reasoning, content = (None, choice.text) if self.thinking is None \
            else split_reasoning(choice.text, self.thinking)
        calls = []
        if self.tools and content:
            content, calls = parse_tool_calls(content)
        message = AssistantMessage(content=content, reasoning_content=reasoning,
                                   reasoning=reasoning, tool_calls=[
                                       ToolCall(id=c.id, function=FunctionCall(
                                           name=c.name, arguments=c.arguments)) for c in calls])
        return message, bool(calls)

    def usage_chunk(self, *outs: RequestOutput) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[],
                                   usage=usage_of(*outs))

    def response(self, out: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for c in out.outputs:
            message, called = self._message(c)
            choices.append(ChatChoice(index=c.index, message=message,
                                      logprobs=self._logprobs(out, c, c.logprobs or []),
                                      finish_reason=self._finish_reason(c, called),
                                      stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=self.id, model=self.model, choices=choices,
                                      usage=usage_of(out))


Formatter = ChatFormatter | CompletionFormatter
