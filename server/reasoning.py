"""Qwen3's reasoning parser (`--reasoning-parser qwen3`): `<think>...</think>` out of content.

vLLM's rules: with thinking on (Qwen3's default), the output is reasoning up to the first
`</think>` (a leading `<think>` the model wrote itself is dropped) and content after it; an
output with no `</think>` is all reasoning (cut short while thinking). With
`chat_template_kwargs.enable_thinking: false` the template closes the think block in the prompt,
so the whole output is content. A stream is split by the same rules, one delta at a time: text
that may be the start of a tag is held back until the next delta decides it.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("qwen3",)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Feed output text deltas; get (reasoning, content) deltas back."""

    def __init__(self, thinking: bool = True) -> None:
        self._state = "start" if thinking else "content"
        self._held = ""

    def feed(self, delta: str) -> tuple[str, str]:
        text, self._held = self._held + delta, ""
        if self._state == "content":
            return "", text
        if self._state == "start":  # a <think> the model writes itself comes first
            stripped = text.lstrip()
            if len(stripped) < len(START) and START.startswith(stripped):
                self._held = text
                return "", ""
            self._state = "thinking"
            if stripped.startswith(START):
                text = stripped[len(START):]
        at = text.find(END)
        if at >= 0:
            self._state = "content"
            return text[:at], text[at + len(END):]
        keep = _partial_suffix(text, END)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], ""

    def finish(self) -> tuple[str, str]:
        """What was held back, at the end of the output: a partial tag is plain text."""
        held, self._held = self._held, ""
        if self._state == "content":
            return "", held
        return held, ""


def think_end_token(tokenizer) -> int | None:
    """The id of `</think>` when the tokenizer holds it as one added token (Qwen3's), else
    None."""
    added = tokenizer.get_added_vocab() if tokenizer is not None else {}
    return added.get(END)


def split_reasoning(text: str, thinking: bool = True) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; an empty part is None, as vLLM answers."""
    splitter = ReasoningSplitter(thinking)
    reasoning, content = splitter.feed(text)
    more_reasoning, more_content = splitter.finish()
    return (reasoning + more_reasoning) or None, (content + more_content) or None
