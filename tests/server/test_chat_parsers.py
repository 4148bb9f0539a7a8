"""The reasoning and tool-call parsers on fixed strings: whole outputs, and the same outputs
streamed in two and in single-character deltas split at every boundary."""

from __future__ import annotations

import json

import pytest

from loramux.server.reasoning import ReasoningSplitter, split_reasoning
from loramux.server.tool_calls import ToolCallStream, parse_tool_calls

REASONING_CASES = [  # text, thinking, (reasoning, content)
    ("<think>\nplan it\n</think>\n\nThe answer.", True, ("\nplan it\n", "\n\nThe answer.")),
    ("plan it</think>answer", True, ("plan it", "answer")),  # <think> was in the prompt
    ("  <think>a</think>b", True, ("a", "b")),
    ("still thinking <thi", True, ("still thinking <thi", None)),  # cut short: all reasoning
    ("<think>", True, (None, None)),
    ("no tags at all", False, (None, "no tags at all")),  # enable_thinking false
    ("a </think> b", False, (None, "a </think> b")),
    ("x</think>", True, ("x", None)),
    ("1 < 2 </ 3 </think>4", True, ("1 < 2 </ 3 ", "4")),
]


def _streamed(feed, finish, pieces):
    parts = [feed(p) for p in pieces] + [finish()]
    return tuple("".join(part[i] for part in parts) for i in range(2))


@pytest.mark.parametrize("text, thinking, expected", REASONING_CASES)
def test_reasoning_split_whole_and_streamed_at_every_boundary(text, thinking, expected):
    assert split_reasoning(text, thinking) == expected
    whole = tuple(part or "" for part in expected)
    for cut in range(len(text) + 1):
        splitter = ReasoningSplitter(thinking)
        assert _streamed(splitter.feed, splitter.finish, [text[:cut], text[cut:]]) == whole
    splitter = ReasoningSplitter(thinking)
    assert _streamed(splitter.feed, splitter.finish, list(text)) == whole


CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
         '"unit": {"deep": "}"}}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
         '"arguments": {}}\n</tool_call>')


def _stream_tool_calls(pieces):
    stream, content, calls = ToolCallStream(), "", {}
    for piece in [*pieces, None]:
        text, deltas = stream.feed(piece) if piece is not None else stream.finish()
        content += text
        for d in deltas:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id is not None:
                assert call["id"] is None and call["arguments"] == "", "id and name come first"
                call["id"], call["name"] = d.id, d.name
            call["arguments"] += d.arguments
    return content, [calls[i] for i in sorted(calls)]


def test_tool_calls_parsed_whole():
    content, calls = parse_tool_calls(CALLS)
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": {"deep": "}"}}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("text", [CALLS, CALLS.removesuffix("\n</tool_call>"),  # EOS, no close
                                  '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'])
def test_tool_calls_streamed_at_every_boundary_give_the_whole_parse(text):
    content, calls = parse_tool_calls(text)
    expected = [(c.name, json.loads(c.arguments)) for c in calls]
    assert expected
    for pieces in [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]:
        streamed_content, streamed = _stream_tool_calls(pieces)
        assert streamed_content == (content or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == expected


def test_text_without_calls_or_with_broken_calls_is_content():
    assert parse_tool_calls("just words <tool") == ("just words <tool", [])
    broken = '<tool_call>\n{"name": "f", "arguments": {"a": </tool_call>'
    assert parse_tool_calls(broken) == (broken, [])
    assert _stream_tool_calls(["a <tool", "s> b"]) == ("a <tools> b", [])
