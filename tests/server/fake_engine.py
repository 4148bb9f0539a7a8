"""A stand-in for engine.Engine with failures on demand, for what a real engine rarely does:
refuse work (503), crash on a bug (500), or fail in the middle of a stream."""

from __future__ import annotations

from loramux.engine import EngineStats, RequestOutput
from loramux.engine.request import CompletionOutput, TokenLogprob


class FakeEngine:
    max_model_len = 64
    is_alive = True

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.fail_before: Exception | None = None  # raised before the first output
        self.fail_after: Exception | None = None  # raised after the first output
        self.logprob: float | None = None  # every token's logprob (and its one alternative)
        self.aborted: list[str] = []
        self.started = False

    async def generate(self, prompt_token_ids, params, lora=None, request_id=None):
        if self.fail_before is not None:
            raise self.fail_before
        token = prompt_token_ids[-1]
        entry = [] if self.logprob is None else [TokenLogprob(token, self.logprob,
                                                              [(token, self.logprob)])]
        for step in range(1, params.max_tokens + 1):
            done = step == params.max_tokens
            choice = CompletionOutput(index=0, text=" x" * step, token_ids=[token] * step,
                                      text_delta=" x", token_ids_delta=[token],
                                      logprobs=entry * step if entry else None,
                                      logprobs_delta=entry,
                                      finish_reason="length" if done else None)
            yield RequestOutput(request_id, list(prompt_token_ids), [choice], finished=done)
            if self.fail_after is not None:
                raise self.fail_after

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def list_loras(self) -> list:
        return []

    def stats(self) -> EngineStats:
        return EngineStats(max_loras=1)
