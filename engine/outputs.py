"""Per-request state in the engine, and the RequestOutput events built from it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loramux.engine.request import CompletionOutput, RequestOutput
from loramux.engine.sequence import Sequence, SeqStatus


@dataclass
class RequestState:
    request_id: str
    prompt: list[int]
    seqs: list[Sequence]
    lora_name: str | None
    metrics: dict = field(default_factory=lambda: {"arrival": time.monotonic()})
    emitted_tokens: list[int] = field(default_factory=list)  # per sequence
    error: Exception | None = None

    def __post_init__(self) -> None:
        self.emitted_tokens = [0] * len(self.seqs)

    @property
    def finished(self) -> bool:
        return all(s.status is SeqStatus.FINISHED for s in self.seqs)

    def output(self) -> RequestOutput:
        """An event with each sample's cumulative state and what changed since the last one."""
        now = time.monotonic()
        if any(s.output for s in self.seqs):
            self.metrics.setdefault("first_token", now)
            self.metrics["last_token"] = now
        finished = self.finished
        if finished:
            self.metrics["finished"] = now
        choices = [self._choice(i) for i in range(len(self.seqs))]
        scored = self.seqs[0].prompt_logprobs
        return RequestOutput(self.request_id, self.prompt, choices, finished, self.lora_name,
                             None if scored is None else [None, *scored], dict(self.metrics),
                             self.error)

    def _choice(self, i: int) -> CompletionOutput:
        seq = self.seqs[i]
        done = seq.status is SeqStatus.FINISHED
        start = self.emitted_tokens[i]
        self.emitted_tokens[i] = len(seq.output)
        delta_text = seq.detok.delta(done)
        wants_logprobs = seq.params.logprobs is not None
        return CompletionOutput(
            index=seq.index,
            text=seq.detok.text[: seq.detok.emitted],
            token_ids=list(seq.output),
            logprobs=list(seq.logprobs) if wants_logprobs else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            text_delta=delta_text,
            token_ids_delta=seq.output[start:],
            logprobs_delta=seq.logprobs[start:] if wants_logprobs else [],
        )
