"""Structured outputs through the openai SDK against a real server: the tiny random model
writes valid output only because the grammar's mask leaves it nothing else to write."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "rain"],
          "properties": {"city": {"type": "string", "maxLength": 8},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14},
                         "rain": {"type": "boolean"}}}
JSON_SCHEMA = {"type": "json_schema",
               "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# The chat server runs the qwen3 reasoning parser: with thinking on, a grammar waits for the
# model's </think> (tests/server/test_tools_and_reasoning.py), so these chats turn it off.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def chat(chat_server) -> openai.OpenAI:
    return chat_server.client()


def test_json_schema_is_valid_on_base_2d_and_3d_adapters_in_one_batch(chat):
    def ask(job):
        model, seed = job
        reply = chat.chat.completions.create(model=model, messages=MESSAGES, max_tokens=150,
                                             temperature=1.0, seed=seed,
                                             response_format=JSON_SCHEMA, extra_body=NO_THINKING)
        return model, reply.choices[0]

    jobs = [(model, seed) for seed in (1, 2) for model in ("chat", "a2d", "a3d")]
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: they share decode steps
        answers = list(pool.map(ask, jobs))
    texts = set()
    for model, choice in answers:
        assert choice.finish_reason == "stop", (model, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        texts.add(choice.message.content)
    assert len(texts) > 1  # the adapters and seeds do change what is written


def test_json_object_and_streamed_json_schema(chat):
    reply = chat.completions.create(model="a3d", prompt="data:", max_tokens=150, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(reply.choices[0].text), dict)
    stream = chat.chat.completions.create(model="a2d", messages=MESSAGES, max_tokens=150,
                                          temperature=0, response_format=JSON_SCHEMA,
                                          stream=True, extra_body=NO_THINKING)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("body, check", [
    ({"structured_outputs": {"choice": ["sunny", "rainy"]}}, lambda t: t in ("sunny", "rainy")),
    ({"guided_choice": ["sunny", "rainy"]}, lambda t: t in ("sunny", "rainy")),
    ({"structured_outputs": {"regex": r"[0-9]{2}:[0-9]{2} [AP]M"}},
     lambda t: re.fullmatch(r"[0-9]{2}:[0-9]{2} [AP]M", t)),
    ({"guided_regex": r"[a-z]{3,6}"}, lambda t: re.fullmatch(r"[a-z]{3,6}", t)),
    ({"structured_outputs": {"grammar": 'root ::= "north" | "south" | "deg" [0-9] [0-9]'}},
     lambda t: t in ("north", "south") or re.fullmatch("deg[0-9]{2}", t)),
    ({"guided_grammar": 'start: "(" /[0-9]{1,2}/ "," /[0-9]{1,2}/ ")"'},
     lambda t: re.fullmatch(r"\([0-9]{1,2},[0-9]{1,2}\)", t)),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None
     and t == json.dumps(json.loads(t), separators=(",", ":"), ensure_ascii=False)),
    ({"guided_json": json.dumps(SCHEMA)},
     lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_choice_regex_grammar_and_json_in_every_spelling(chat, body, check, route):
    if route == "chat":
        reply = chat.chat.completions.create(model="a2d", messages=MESSAGES, max_tokens=150,
                                             temperature=1.0, seed=4,
                                             extra_body={**body, **NO_THINKING})
        text = reply.choices[0].message.content
    else:
        reply = chat.completions.create(model="chat", prompt="The answer:", max_tokens=150,
                                        temperature=1.0, seed=4, extra_body=body)
        text = reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop" and check(text), text


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema: invalid JSON schema"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema object"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs: invalid regex"),
    ({"guided_regex": "[a-"}, "guided_regex: invalid regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "invalid grammar"),
    ({"structured_outputs": {"choice": []}}, "at least one"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structural_tag"),
    ({"guided_json": "{not json"}, "guided_json: the JSON schema is not JSON"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "only one"),
])
def test_an_invalid_structure_is_a_400_naming_the_problem(chat, body, message):
    with pytest.raises(openai.BadRequestError) as err:
        chat.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=5,
                                     extra_body=body)
    assert message in err.value.message


def test_a_model_whose_tokenizer_llguidance_cannot_read_refuses_structure(client):
    """The demo's word-level tokenizer has no byte-level spelling of its tokens."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=5,
                                       response_format={"type": "json_object"})
    assert "structured outputs are not available for this model" in err.value.message
