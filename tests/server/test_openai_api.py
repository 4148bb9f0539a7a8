"""The OpenAI surface, driven by the official client against a real demo server."""

from __future__ import annotations

import openai
import pytest
import transformers

MODELS = ("demo", "demo-2d", "demo-3d")
MESSAGES = [{"role": "user", "content": "hello world, what is the model"}]
PROMPT = "the model and the adapter"
NO_EOS = {"extra_body": {"ignore_eos": True}}  # the random demo may pick EOS early


def chat_text(client, model: str, **kwargs) -> str:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                           temperature=0, **NO_EOS, **kwargs)
    return reply.choices[0].message.content


def completion_text(client, model: str, prompt=PROMPT, **kwargs) -> str:
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                      **NO_EOS, **kwargs)
    return reply.choices[0].text


@pytest.mark.parametrize("srv", ["open_server", "server"])
def test_models_lists_base_then_adapters(request, srv, demo):
    """`root` is the path, or with --allowed-lora-roots (paths redacted) the name."""
    cards = request.getfixturevalue(srv).client().models.list().data
    redacted = srv == "server"
    assert [c.id for c in cards][:1] == ["demo"]
    by_id = {c.id: c for c in cards}
    assert by_id["demo"].parent is None
    assert by_id["demo"].root == "demo" if redacted else str(demo.model_dir)
    assert by_id["demo"].max_model_len == 2048
    for name in ("demo-2d", "demo-3d"):
        assert by_id[name].parent == "demo"
        assert by_id[name].root == name if redacted else str(demo.adapters[name].resolve())


@pytest.mark.parametrize("model", MODELS)
def test_chat_completion(client, model):
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                           temperature=0, **NO_EOS)
    assert reply.object == "chat.completion" and reply.model == model
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


@pytest.mark.parametrize("model", MODELS)
def test_text_completion(client, model):
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                      **NO_EOS)
    assert reply.object == "text_completion" and reply.choices[0].text.strip()
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6


def test_each_adapter_changes_the_answer(client):
    answers = {model: completion_text(client, model) for model in MODELS}
    assert len(set(answers.values())) == len(MODELS), answers


@pytest.mark.parametrize("model", MODELS)
def test_chat_stream_equals_answer_and_reports_usage(client, model):
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, **NO_EOS)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_text(client, model)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completion_stream_without_usage(client):
    chunks = list(client.completions.create(model="demo-3d", prompt=PROMPT, max_tokens=8,
                                            temperature=0, stream=True, **NO_EOS))
    assert "".join(c.choices[0].text for c in chunks) == completion_text(client, "demo-3d")
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_prompt_as_token_ids(client, demo):
    ids = transformers.AutoTokenizer.from_pretrained(demo.model_dir).encode(PROMPT)
    assert completion_text(client, "demo-2d", prompt=ids) == completion_text(client, "demo-2d")


def test_stop_string_ends_the_answer(client):
    full = completion_text(client, "demo")
    stop = full.split()[2]
    reply = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0,
                                      stop=[stop], **NO_EOS)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text
    assert full.startswith(choice.text)


def test_n_choices_are_reproducible_with_a_seed(client):
    def sample():
        reply = client.completions.create(model="demo-3d", prompt=PROMPT, max_tokens=8, n=3,
                                          temperature=1.0, top_p=0.95, seed=7, **NO_EOS)
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    first = sample()
    assert len(first) == 3 and sample() == first


def test_chat_logprobs_spell_the_answer(client):
    reply = client.chat.completions.create(model="demo-2d", messages=MESSAGES, max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=3,
                                           **NO_EOS)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_completion_logprobs(client):
    reply = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0,
                                      logprobs=2, **NO_EOS)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text
    assert len(lp.token_logprobs) == 5 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_max_completion_tokens(client):
    reply = client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0,
                                           max_completion_tokens=3, **NO_EOS)
    assert reply.usage.completion_tokens == 3


def test_unknown_model_is_404_naming_model(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nosuch", messages=MESSAGES)
    assert err.value.status_code == 404 and err.value.body["param"] == "model"
    assert "nosuch" in err.value.body["message"]


def test_wrong_api_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="demo", prompt=PROMPT)


def test_health_version_and_metrics_need_no_key(server):
    import httpx

    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200, path
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_invalid_bodies_are_400_in_the_openai_envelope(server):
    with server.http() as http:
        missing = http.post("/v1/chat/completions", json={"model": "demo"})
        batch = http.post("/v1/completions", json={"model": "demo", "prompt": ["a", ""]})
        not_json = http.post("/v1/completions", content=b"{", headers={
            "Content-Type": "application/json"})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "body.messages"
    assert missing.json()["error"]["type"] == "BadRequestError"
    assert batch.status_code == 400 and "must not be empty" in batch.json()["error"]["message"]
    assert not_json.status_code == 400


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"n": 0},
                                 {"max_tokens": 0}, {"logprobs": 99}])
def test_bad_sampling_parameters_are_400(client, bad):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt=PROMPT, **bad)


def test_prompt_too_long_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="demo", prompt="the " * 3000, max_tokens=4)
    assert err.value.status_code == 400


def test_unknown_route_uses_the_envelope(server):
    with server.http() as http:
        reply = http.get("/v1/nothing-here")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == 404
