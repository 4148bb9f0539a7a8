"""A completions `prompt` list is a batch: n choices per prompt, in order, as vLLM answers."""

from __future__ import annotations

import httpx
import openai
import pytest

NO_EOS = {"ignore_eos": True}
PROMPTS = ["the model", "the expert and the adapter", "hello world"]


def one(client, model: str, prompt, n: int = 1, max_tokens: int = 5) -> list[str]:
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                      temperature=0, n=n, extra_body=NO_EOS)
    return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]


@pytest.mark.parametrize("model", ["demo", "demo-2d", "demo-3d"])
def test_a_batch_answers_each_prompt_as_alone(client, model):
    reply = client.completions.create(model=model, prompt=PROMPTS, max_tokens=5, temperature=0,
                                      extra_body=NO_EOS)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [one(client, model, p)[0] for p in PROMPTS]
    assert reply.usage.completion_tokens == 15
    alone = [client.completions.create(model=model, prompt=p, max_tokens=1).usage.prompt_tokens
             for p in PROMPTS]
    assert reply.usage.prompt_tokens == sum(alone)


def test_token_id_batches_and_n_per_prompt(client):
    ids = [[5, 6, 7], [8, 9]]
    reply = client.completions.create(model="demo-2d", prompt=ids, max_tokens=4, n=2,
                                      temperature=0, extra_body=NO_EOS)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.text for c in reply.choices]
    assert texts[:2] == one(client, "demo-2d", ids[0], n=2, max_tokens=4)
    assert texts[2:] == one(client, "demo-2d", ids[1], n=2, max_tokens=4)


def test_a_streamed_batch_interleaves_chunks_and_sums_the_usage(client):
    stream = client.completions.create(model="demo-3d", prompt=PROMPTS, max_tokens=5,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body=NO_EOS)
    texts, usage = ["", "", ""], None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == [one(client, "demo-3d", p)[0] for p in PROMPTS]
    assert usage.completion_tokens == 15


def test_a_prompt_too_long_in_a_batch_fails_the_request_and_frees_the_others(server, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt=["the model", "the " * 3000],
                                  max_tokens=4)
    metrics = httpx.get(server.url + "/metrics").text
    running = [line for line in metrics.splitlines()
               if line.startswith("vllm:num_requests_running")]
    assert running and float(running[0].split()[-1]) == 0.0
    assert one(client, "demo", "the model")[0]  # the engine serves on


def test_too_many_prompts_is_a_400(server):
    with server.http() as http:
        reply = http.post("/v1/completions", json={"model": "demo", "prompt": ["a"] * 257})
    assert reply.status_code == 400 and "at most 256 prompts" in reply.json()["error"]["message"]
