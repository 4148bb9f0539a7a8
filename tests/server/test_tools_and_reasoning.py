"""Tool calls (Hermes format) and Qwen3 reasoning through the openai SDK against a real server.
The random model calls a tool only when tool_choice forces the grammar of the calls on it."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 8},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "required": ["tz"], "additionalProperties": False,
             "properties": {"tz": {"enum": ["UTC", "CET"]}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# With thinking on, a tool-call grammar waits for </think> (as in vLLM), which the random model
# never writes: the tool tests turn thinking off; test_a_grammar_starts_after_the_reasoning
# covers the grammar after a </think>.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def chat(chat_server) -> openai.OpenAI:
    return chat_server.client()


def _schema(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


@pytest.mark.parametrize("model", ["chat", "a2d", "a3d"])
def test_required_tool_choice_returns_valid_calls_and_a_round_trip_continues(chat, model):
    reply = chat.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                         tool_choice="required", max_tokens=300, seed=1,
                                         temperature=1.0, extra_body=NO_THINKING)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))
    first = choice.message.tool_calls[0]
    follow = ASK + [
        {"role": "assistant", "content": choice.message.content, "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in choice.message.tool_calls]},
        {"role": "tool", "tool_call_id": first.id, "content": '{"temp": 21}'}]
    again = chat.chat.completions.create(model=model, messages=follow, tools=TOOLS,
                                         tool_choice="none", max_tokens=5)
    assert again.usage.prompt_tokens > reply.usage.prompt_tokens
    assert again.choices[0].message.tool_calls == []


def test_named_tool_choice_streams_tool_call_deltas(chat):
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model="a3d", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=300,
                  temperature=0, extra_body=NO_THINKING)
    whole = chat.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert [c.function.name for c in whole] == ["get_weather"]
    calls, finish = {}, None
    for chunk in chat.chat.completions.create(**kwargs, stream=True):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": None, "arguments": ""})
            if delta.id:
                assert delta.function.name and not call["arguments"]
                call["name"] = delta.function.name
            call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == json.loads(whole[0].function.arguments)


@pytest.mark.parametrize("body, message", [
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "no tool named 'nope'"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined"),
])
def test_bad_tool_choices_are_400s(chat, body, message):
    with pytest.raises(openai.BadRequestError) as err:
        chat.chat.completions.create(model="chat", messages=ASK, max_tokens=5, extra_body=body)
    assert message in err.value.message


def test_auto_tool_choice_without_the_flags_is_a_400_as_in_vllm(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", messages=ASK, max_tokens=5, tools=TOOLS)
    assert '"auto" tool choice requires --enable-auto-tool-choice' in err.value.message


def test_auto_tool_choice_with_the_flags_answers_in_text_or_calls(chat):
    reply = chat.chat.completions.create(model="chat", messages=ASK, tools=TOOLS,
                                         max_tokens=8, temperature=0,
                                         extra_body={"chat_template_kwargs": {
                                             "enable_thinking": False}})
    assert reply.choices[0].message.tool_calls == []  # the random model writes no call
    assert reply.choices[0].message.content


def test_reasoning_goes_to_reasoning_content_unless_thinking_is_off(chat):
    kwargs = dict(model="a2d", messages=ASK, max_tokens=12, temperature=0)
    thinking = chat.chat.completions.create(**kwargs).choices[0].message
    # no </think> from the random model: all of it is reasoning cut short (vLLM's rule)
    assert thinking.content is None and thinking.model_extra["reasoning_content"]
    streamed = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or ""
                       for c in chat.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == thinking.model_extra["reasoning_content"]
    off = chat.chat.completions.create(**kwargs, extra_body={
        "chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
    assert off.content and off.model_extra["reasoning_content"] is None


@pytest.mark.parametrize("model", ["chat", "a3d"])
def test_a_grammar_starts_after_the_reasoning(chat_server, chat, model):
    """With the reasoning parser on, response_format holds after the model's </think> (as in
    vLLM): the first token is free to be </think> (logit_bias makes the random model write it,
    which JSON could not start with), reasoning_content stays empty and the content is valid.
    With thinking off the template closes the think block and the JSON starts at once."""
    end_id = httpx.post(f"{chat_server.url}/tokenize",
                        json={"prompt": "</think>", "add_special_tokens": False}).json()
    (end_id,) = end_id["tokens"]
    kwargs = dict(model=model, messages=ASK, max_tokens=200, temperature=0, logprobs=True,
                  response_format={"type": "json_schema", "json_schema": {
                      "name": "weather", "schema": WEATHER}},
                  logit_bias={str(end_id): 100})
    reply = chat.chat.completions.create(**kwargs).choices[0]
    assert reply.finish_reason == "stop", reply.message.content  # the structure is complete
    assert reply.logprobs.content[0].token == "</think>"
    assert not reply.message.model_extra["reasoning_content"]
    jsonschema.validate(json.loads(reply.message.content), WEATHER)
    off = chat.chat.completions.create(**kwargs, extra_body=NO_THINKING).choices[0]
    assert off.logprobs.content[0].token != "</think>"
    jsonschema.validate(json.loads(off.message.content), WEATHER)
    del kwargs["response_format"]
    kwargs.update(max_tokens=400, temperature=1.0, seed=1)  # as the required-choice test
    called = chat.chat.completions.create(**kwargs, tools=TOOLS, tool_choice="required")
    assert called.choices[0].logprobs.content[0].token == "</think>"
    assert called.choices[0].finish_reason == "tool_calls"
    for call in called.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))
