"""Penalties, logit_bias, min_tokens, bad_words and allowed_token_ids through the openai SDK
against a real server: greedy text equals transformers' logits run through each processor's
formula (tests/logits_reference.py); bad values are 400s naming the field."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from loramux.engine.processors import bad_words_token_ids
from tests.logits_reference import Rules, greedy

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tokenizer(demo):
    return AutoTokenizer.from_pretrained(demo.model_dir)


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer.encode("the the the the", add_special_tokens=False)  # greedy repeats


def text_of(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """What the server's detokenizer gives for `tokens` after `prompt`."""
    return tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)):]


def complete(client, prompt: list[int], **fields) -> str:
    native = {k: fields.pop(k) for k in ("presence_penalty", "frequency_penalty", "logit_bias")
              if k in fields}
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True, **fields},
                                      **native)
    return reply.choices[0].text


@pytest.mark.parametrize("fields, rules", [
    ({"presence_penalty": 1.5}, Rules(presence_penalty=1.5)),
    ({"frequency_penalty": 1.2}, Rules(frequency_penalty=1.2)),
    ({"repetition_penalty": 1.6}, Rules(repetition_penalty=1.6)),
    ({"logit_bias": {"12": 6, "37": -100}}, Rules(logit_bias={12: 6.0, 37: -100.0})),
    ({"allowed_token_ids": [12, 40, 41, 77, 90]},
     Rules(allowed_token_ids=(12, 40, 41, 77, 90))),
], ids=["presence", "frequency", "repetition", "logit-bias", "allowed"])
def test_greedy_with_a_processor_equals_the_reference(client, hf_demo, tokenizer, prompt,
                                                      fields, rules):
    plain = greedy(hf_demo, prompt, MAX_TOKENS, Rules())
    assert complete(client, prompt) == text_of(tokenizer, prompt, plain)
    want = greedy(hf_demo, prompt, MAX_TOKENS, rules)
    assert want != plain, "the case must change the output"
    assert complete(client, prompt, **fields) == text_of(tokenizer, prompt, want)


def test_min_tokens_holds_back_the_stop_ids(client, hf_demo, tokenizer, prompt):
    plain = greedy(hf_demo, prompt, MAX_TOKENS, Rules())
    stop = plain[3]
    eos = (tokenizer.eos_token_id,)
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"stop_token_ids": [stop]})
    assert reply.usage.completion_tokens == plain.index(stop) + 1 < 6
    want = greedy(hf_demo, prompt, MAX_TOKENS, Rules(min_tokens=6, stop_ids=(stop, *eos)),
                  stop_ids=(stop, *eos))
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0,
                                      extra_body={"stop_token_ids": [stop], "min_tokens": 6})
    assert reply.usage.completion_tokens == len(want) >= 6
    assert reply.choices[0].text == text_of(tokenizer, prompt, want)


def test_bad_words_in_chat(client, hf_demo, tokenizer, server):
    messages = [{"role": "user", "content": "the the the the"}]
    with server.http() as http:
        prompt = http.post("/tokenize", json={"model": "demo", "messages": messages,
                                               "add_generation_prompt": True}).json()["tokens"]
    plain = greedy(hf_demo, prompt, MAX_TOKENS, Rules())
    words = [tokenizer.decode([plain[1]]).strip(), tokenizer.decode(plain[3:5])]
    rules = Rules(bad_words=bad_words_token_ids(tokenizer, words), frequency_penalty=0.5)
    want = greedy(hf_demo, prompt, MAX_TOKENS, rules)
    assert want != plain
    reply = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        frequency_penalty=0.5, extra_body={"bad_words": words, "ignore_eos": True})
    assert reply.choices[0].message.content == text_of(tokenizer, prompt, want)


@pytest.mark.parametrize("fields, message", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"the": 3}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias of token ids [5] must be in [-100, 100]"),
    ({"logit_bias": {"5": 1, "70000": 2}}, "logit_bias: token ids [70000] are outside the vocab"),
    ({"allowed_token_ids": [3, -4]}, "allowed_token_ids: token ids [-4] are outside the vocab"),
    ({"allowed_token_ids": []}, "allowed_token_ids must list"),
    ({"min_tokens": 9}, "min_tokens must be <= max_tokens"),
    ({"bad_words": ["  "]}, "bad_words"),
])
def test_bad_values_are_400s_naming_the_field(client, prompt, fields, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                  extra_body=fields)
    assert message in err.value.message
