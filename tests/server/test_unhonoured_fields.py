"""Known OpenAI / vLLM fields that loramux does not implement are refused, never ignored."""

from __future__ import annotations

import openai
import pytest

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("field, value", [
    ("guided_decoding_backend", "xgrammar"), ("functions", [{"name": "f"}]),
    ("prompt_logprobs", 1), ("best_of", 2), ("use_beam_search", True), ("echo", True),
])
def test_a_field_that_asks_for_something_unimplemented_is_a_400_naming_it(client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2,
                                       extra_body={field: value})
    assert f"{field}: not supported" in err.value.message


@pytest.mark.parametrize("field, value", [
    ("tools", []), ("tool_choice", "none"),
    ("response_format", {"type": "text"}), ("best_of", 1), ("prompt_logprobs", None),
    ("echo", False),
])
def test_the_same_field_with_its_neutral_value_is_accepted(client, field, value):
    reply = client.completions.create(model="demo-2d", prompt="the model", max_tokens=2,
                                      extra_body={field: value})
    assert reply.usage.completion_tokens >= 1


def test_tools_are_refused_where_only_chat_honours_them(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="demo", prompt="hi", max_tokens=2, extra_body={
            "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert "tools: not supported" in err.value.message
