"""Tool calls in the Qwen3 / Hermes format (`--tool-call-parser hermes`), and the grammar that
forces them (`tool_choice` required or a named function).

The model writes each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
text before the first call is the message content. `ToolCallStream` parses output text one
delta at a time into content deltas and OpenAI tool-call deltas: a call's first delta carries
its index, id, type and name as soon as its header (`{"name": "...", "arguments": `) is read,
the next ones pieces of the arguments' JSON text, held back where they may end the call. A whole
output goes through the same parser (`parse_tool_calls`); there, as in vLLM, an output whose
calls are not valid JSON is content with no calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from loramux.engine.structured import JSON_WHITESPACE

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PARSERS = ("hermes",)
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCallDelta:
    """A piece of call `index`: id and name on its first delta, then argument text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class _Call:
    index: int
    id: str = field(default_factory=tool_call_id)
    name: str | None = None
    body: str = ""  # text after <tool_call>
    args_start: int = 0  # where the arguments begin in body, once the header is read
    sent: int = 0  # argument characters sent


class ToolCallStream:
    """Feed output text deltas; get (content delta, tool-call deltas) back."""

    def __init__(self) -> None:
        self._text = ""  # content not yet sent (may be the start of <tool_call>)
        self._call: _Call | None = None
        self.calls: list[_Call] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "", []
        while delta:
            if self._call is None:
                text = self._text + delta
                at = text.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(text, OPEN)
                    self._text = text[len(text) - keep:] if keep else ""
                    return content + self._content(text[:len(text) - keep]), deltas
                content += self._content(text[:at])
                self._text, delta = "", text[at + len(OPEN):]
                self._call = _Call(len(self.calls))
                self.calls.append(self._call)
            call = self._call
            body = call.body + delta
            at = body.find(CLOSE)
            call.body, delta = (body, "") if at < 0 else (body[:at], body[at + len(CLOSE):])
            deltas += self._progress(call, closed=at >= 0)
            if at >= 0:
                self._call = None
        return content, deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of the output: a call left open ends here; held-back text is content."""
        if self._call is not None:
            call, self._call = self._call, None
            return "", self._progress(call, closed=True)
        text, self._text = self._text, ""
        return self._content(text), []

    def _content(self, text: str) -> str:
        """Text between or after calls is dropped when blank (the model's separators)."""
        return text if not self.calls or text.strip() else ""

    def _progress(self, call: _Call, closed: bool) -> list[ToolCallDelta]:
        deltas = []
        if call.name is None:
            header = _HEADER.match(call.body)
            if header is None:
                return self._whole(call) if closed else []
            call.name, call.args_start = json.loads(f'"{header.group(1)}"'), header.end()
            deltas.append(ToolCallDelta(call.index, id=call.id, name=call.name))
        args = call.body[call.args_start:]
        end = len(_arguments(args)) if closed else _safe_length(args)
        if end > call.sent:
            deltas.append(ToolCallDelta(call.index, arguments=args[call.sent:end]))
            call.sent = end
        return deltas

    def _whole(self, call: _Call) -> list[ToolCallDelta]:
        """A closed call whose header was not in the usual order: parse it whole."""
        try:
            obj = json.loads(call.body)
            name, args = obj["name"], obj.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            return []
        if not isinstance(name, str):
            return []
        call.name = name
        text = json.dumps(args, ensure_ascii=False)
        call.body, call.args_start, call.sent = text, 0, len(text)
        return [ToolCallDelta(call.index, id=call.id, name=name, arguments=text)]


def _arguments(args: str) -> str:
    """The arguments' JSON of a closed call's text after the header: less the `}` that closes
    the call object, and the blanks around it."""
    args = args.rstrip()
    return args[:-1].rstrip() if args.endswith("}") else args


def _safe_length(args: str) -> int:
    """How much of an open call's argument text may be sent: all but a tail that could be the
    end of the call (`}`, blanks, the start of `</tool_call>`)."""
    end = len(args) - _partial_suffix(args, CLOSE)
    end = len(args[:end].rstrip())
    if end and args[end - 1] == "}":
        end -= 1
    return end


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole output. Calls whose arguments are not JSON objects, or that
    have no name, make the whole output content (vLLM's rule)."""
    stream = ToolCallStream()
    content, _ = stream.feed(text)
    more, _ = stream.finish()
    content += more
    calls = []
    for call in stream.calls:
        arguments = _arguments(call.body[call.args_start:]) if call.args_start else call.body
        try:
            valid = call.name is not None and isinstance(json.loads(arguments), dict)
        except ValueError:
            valid = False
        if not valid:
            return text or None, []
        calls.append(ParsedCall(call.id, call.name, arguments))
    return content or None, calls


def tags_are_tokens(tokenizer) -> bool:
    """Whether the tokenizer has `<tool_call>` and `</tool_call>` as added tokens (Qwen's)."""
    added = tokenizer.get_added_vocab() if tokenizer is not None else {}
    return OPEN in added and CLOSE in added


def tool_call_grammar(tools: list[dict], only: str | None, parallel: bool,
                      tag_tokens: bool) -> str:
    """A Lark grammar (llguidance's dialect) of one or more calls in the Hermes format, each of a
    given tool with arguments valid for its parameters schema; `only` names the one tool
    allowed (tool_choice naming a function), which is then called once. tag_tokens: the
    tokenizer has `<tool_call>` and `</tool_call>` as tokens of their own (Qwen's added
    tokens), which the grammar must then name as tokens, not as text."""
    chosen = [t for t in tools if only is None or t["name"] == only]
    schema = {"x-guidance": {"whitespace_flexible": True, "whitespace_pattern": JSON_WHITESPACE},
              "oneOf": [{"type": "object", "additionalProperties": False,
                         "required": ["name", "arguments"],
                         "properties": {"name": {"const": t["name"]},
                                        "arguments": t.get("parameters") or {"type": "object"}}}
                        for t in chosen]}
    repeat = ' ("\\n" call)*' if parallel and only is None else ""
    open_, close = (OPEN, CLOSE) if tag_tokens else (json.dumps(OPEN), json.dumps(CLOSE))
    return (f"start: call{repeat}\n"
            f'call: {open_} "\\n" body "\\n" {close}\n'
            f"body: %json {json.dumps(schema)}\n")
