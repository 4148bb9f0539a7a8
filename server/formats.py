"""RequestOutput -> OpenAI objects, for chat and for text completions.

A formatter belongs to one request. In a stream it turns each RequestOutput's deltas into
chunks (one per choice that changed) and remembers which choices already reported their
finish_reason; without a stream it turns the final RequestOutput into the response.
"""

from __future__ import annotations

from pydantic import BaseModel

from engine.request import CompletionOutput, RequestOutput, TokenLogprob
from server.responses import (
    AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatLogprobs,
    ChatLogprobToken, ChatStreamChoice, CompletionChoice, CompletionLogprobs, CompletionResponse,
    DeltaMessage, TopLogprob, UsageInfo,
)


def usage_of(out: RequestOutput) -> UsageInfo:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(choice.token_ids) for choice in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


class _Formatter:
    def __init__(self, tokenizer, response_id: str, model: str, want_logprobs: bool) -> None:
        self.tokenizer, self.id, self.model = tokenizer, response_id, model
        self.want_logprobs = want_logprobs
        self._reported_finish: set[int] = set()

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

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

    def opening(self, n: int) -> list[BaseModel]:
        return []


class CompletionFormatter(_Formatter):
    def __init__(self, tokenizer, response_id: str, model: str, want_logprobs: bool) -> None:
        super().__init__(tokenizer, response_id, model, want_logprobs)
        self._offsets: dict[int, int] = {}

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        result, offset = CompletionLogprobs(), self._offsets.get(index, 0)
        for entry in entries:
            token = self._token(entry.token_id)
            result.tokens.append(token)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append({self._token(t): lp for t, lp in entry.top})
            result.text_offset.append(offset)
            offset += len(token)
        self._offsets[index] = offset
        return result

    def chunks(self, out: RequestOutput) -> list[CompletionResponse]:
        return [CompletionResponse(id=self.id, model=self.model, choices=[CompletionChoice(
            index=c.index, text=c.text_delta, logprobs=self._logprobs(c.index, c.logprobs_delta),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
            for c in self._changed(out)]

    def usage_chunk(self, out: RequestOutput) -> CompletionResponse:
        return CompletionResponse(id=self.id, model=self.model, choices=[], usage=usage_of(out))

    def response(self, out: RequestOutput) -> CompletionResponse:
        choices = [CompletionChoice(index=c.index, text=c.text,
                                    logprobs=self._logprobs(c.index, c.logprobs or []),
                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in out.outputs]
        return CompletionResponse(id=self.id, model=self.model, choices=choices,
                                  usage=usage_of(out))


class ChatFormatter(_Formatter):
    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        token = self._token(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        return ChatLogprobs(content=[ChatLogprobToken(
            **self._top(e.token_id, e.logprob).model_dump(),
            top_logprobs=[self._top(t, lp) for t, lp in e.top]) for e in entries])

    def opening(self, n: int) -> list[ChatCompletionChunk]:
        """vLLM and OpenAI open each choice with a role-only delta."""
        return [ChatCompletionChunk(id=self.id, model=self.model, choices=[ChatStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(n)]

    def chunks(self, out: RequestOutput) -> list[ChatCompletionChunk]:
        return [ChatCompletionChunk(id=self.id, model=self.model, choices=[ChatStreamChoice(
            index=c.index, delta=DeltaMessage(content=c.text_delta),
            logprobs=self._logprobs(c.logprobs_delta), finish_reason=c.finish_reason,
            stop_reason=c.stop_reason)]) for c in self._changed(out)]

    def usage_chunk(self, out: RequestOutput) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=usage_of(out))

    def response(self, out: RequestOutput) -> ChatCompletionResponse:
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                              logprobs=self._logprobs(c.logprobs or []),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in out.outputs]
        return ChatCompletionResponse(id=self.id, model=self.model, choices=choices,
                                      usage=usage_of(out))
