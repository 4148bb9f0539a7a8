"""/tokenize, /detokenize and /ping on a real demo server, and chat_template_kwargs."""

from __future__ import annotations

import pytest
import transformers

from loramux.engine.errors import InvalidRequest
from loramux.server.prompt import chat_prompt_ids
from loramux.server.protocol import ChatMessage

MESSAGES = [{"role": "user", "content": "hello world, what is the model"}]


@pytest.fixture(scope="module")
def tokenizer(demo):
    return transformers.AutoTokenizer.from_pretrained(demo.model_dir)


def test_tokenize_a_prompt_as_the_tokenizer_does(server, tokenizer):
    with server.http() as http:
        reply = http.post("/tokenize", json={"model": "demo-2d", "prompt": "the model",
                                             "return_token_strs": True}).json()
    ids = tokenizer.encode("the model")
    assert reply == {"count": len(ids), "max_model_len": 2048, "tokens": ids,
                     "token_strs": tokenizer.convert_ids_to_tokens(ids)}


def test_tokenize_chat_counts_what_the_chat_route_prefills(server, client):
    with server.http() as http:
        reply = http.post("/tokenize", json={"model": "demo", "messages": MESSAGES}).json()
    usage = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1).usage
    assert reply["count"] == usage.prompt_tokens == len(reply["tokens"])
    assert reply["token_strs"] is None


def test_detokenize_inverts_tokenize(server, tokenizer):
    ids = tokenizer.encode("the expert and the adapter")
    with server.http() as http:
        reply = http.post("/detokenize", json={"model": "demo", "tokens": ids})
    assert reply.status_code == 200 and reply.json() == {"prompt": tokenizer.decode(ids)}


@pytest.mark.parametrize("path, body, status, words", [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "`nope` does not exist"),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "outside the vocabulary"),
    ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": True,
                   "continue_final_message": True}, 400, "cannot both be true"),
])
def test_token_routes_refuse_bad_input(server, path, body, status, words):
    with server.http() as http:
        reply = http.post(path, json=body)
    assert reply.status_code == status and words in reply.json()["error"]["message"]


def test_token_routes_need_the_api_key(server):
    with server.http() as http:
        reply = http.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": ""})
    assert reply.status_code == 401


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_ping_is_health_without_a_key(server, method):
    with server.http() as http:
        assert http.request(method, "/ping", headers={"Authorization": ""}).status_code == 200


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")


def test_chat_template_kwargs_reach_the_template(demo):
    """Qwen3's switch: `enable_thinking: false` pre-fills an empty think block."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo.model_dir)
    tokenizer.chat_template = THINKING_TEMPLATE
    messages = [ChatMessage(**m) for m in MESSAGES]
    plain = chat_prompt_ids(tokenizer, messages)
    off = chat_prompt_ids(tokenizer, messages, {"enable_thinking": False})
    think = tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert off == plain + think and think
    with pytest.raises(InvalidRequest, match="may not set add_generation_prompt"):
        chat_prompt_ids(tokenizer, messages, {"add_generation_prompt": False})


def test_chat_template_kwargs_are_accepted_by_the_chat_route(client):
    reply = client.chat.completions.create(
        model="demo-3d", messages=MESSAGES, max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.usage.completion_tokens >= 1
