"""POST /v1/responses through the official client: text, streamed events, refusals."""

from __future__ import annotations

import openai
import pytest

NO_EOS = {"extra_body": {"ignore_eos": True}}  # the random demo may pick EOS early
MESSAGES = [{"role": "user", "content": "hello world, what is the model"}]


def chat_text(client, model: str, messages, max_tokens: int) -> str:
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           max_tokens=max_tokens, **NO_EOS)
    return reply.choices[0].message.content


@pytest.mark.parametrize("model", ["demo", "demo-2d", "demo-3d"])
def test_a_response_is_the_chat_answer_to_the_same_turns(client, model):
    reply = client.responses.create(model=model, input=MESSAGES[0]["content"],
                                    instructions="be brief", max_output_tokens=6,
                                    temperature=0, **NO_EOS)
    turns = [{"role": "system", "content": "be brief"}, *MESSAGES]
    assert reply.object == "response" and reply.model == model
    assert reply.output_text == chat_text(client, model, turns, 6)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 6 and reply.usage.input_tokens > 0
    assert reply.usage.total_tokens == reply.usage.input_tokens + 6


def test_message_items_with_text_parts(client):
    items = [{"type": "message", "role": "developer", "content": "be brief"},
             {"role": "user", "content": [{"type": "input_text", "text": "hello world, "},
                                          {"type": "input_text", "text": "what is the model"}]}]
    reply = client.responses.create(model="demo-2d", input=items, max_output_tokens=5,
                                    temperature=0, **NO_EOS)
    turns = [{"role": "system", "content": "be brief"}, *MESSAGES]
    assert reply.output_text == chat_text(client, "demo-2d", turns, 5)


def test_a_streamed_response_sends_openai_events_in_order(client):
    stream = client.responses.create(model="demo-3d", input=MESSAGES[0]["content"],
                                     max_output_tokens=7, temperature=0, stream=True, **NO_EOS)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == chat_text(client, "demo-3d", MESSAGES, 7)
    assert events[-1].response.output_text == deltas and events[-1].response.usage.output_tokens == 7


def test_an_answer_that_stops_completes_and_the_stream_helper_returns_it(client):
    first = client.responses.create(model="demo", input="the model", max_output_tokens=6,
                                    temperature=0, **NO_EOS).output_text
    stop = first.split()[2]  # vLLM's `stop` field ends the answer there: status "completed"
    with client.responses.stream(model="demo", input="the model", max_output_tokens=6,
                                 temperature=0, extra_body={"ignore_eos": True,
                                                            "stop": [stop]}) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output_text == first[:first.index(stop)]


@pytest.mark.parametrize("extra, words", [
    ({"previous_response_id": "resp_1"}, "stores no responses"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "only message items"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "only text parts"),
    ({"text": {"format": {"type": "json_object"}}}, "only {'type': 'text'}"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools: not supported"),
    ({"model": "nope"}, "`nope` does not exist"),
])
def test_what_cannot_be_honoured_is_a_4xx_naming_it(server, extra, words):
    body = {"model": "demo", "input": "hello", "max_output_tokens": 2, **extra}
    with server.http() as http:
        reply = http.post("/v1/responses", json=body)
    assert reply.status_code in (400, 404) and words in reply.json()["error"]["message"]
