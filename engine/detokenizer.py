"""Incremental detokenization that never emits half a UTF-8 character, plus stop strings."""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token, for correct spacing


class IncrementalDetokenizer:
    """Turns output token ids into text one step at a time.

    Text for new tokens is the difference between decoding a window that includes them and the
    same window without them; while the window ends in an incomplete character (U+FFFD) nothing
    is emitted. Stop strings truncate the text; while running, the last len(stop)-1 characters
    are held back so a stop string is never streamed in part. As in vLLM, stop strings are
    looked for only from the token after the first `min_tokens` on, in text that ends there.
    """

    def __init__(self, tokenizer, prompt: list[int], stop: tuple[str, ...],
                 skip_special_tokens: bool = True, include_stop: bool = False,
                 min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.skip_special = skip_special_tokens
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.min_ids = len(self.ids) + min_tokens  # stop strings count from the next token on

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string it completed, if any."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        start = max(0, len(self.text) - self.holdback)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._find_stop(start) if len(self.ids) > self.min_ids else None

    def _find_stop(self, start: int) -> str | None:
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at >= 0:
                self.text = self.text[: at + len(stop) if self.include_stop else at]
                return stop
        return None

    def delta(self, finished: bool) -> str:
        """Text not yet handed out; holds back a possible stop-string prefix unless finished."""
        upto = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
