"""echo and prompt logprobs on /v1/completions through the openai SDK: loglikelihoods computed
as lm-eval's local-completions computes them (a batch of prompts, echo, logprobs 1, max_tokens
1) equal transformers + PEFT's (fp32, CPU) to 1e-4 on a 3D adapter; echo text in answers and
streams; vLLM's prompt_logprobs; max_tokens 0 with echo."""

from __future__ import annotations

import copy

import openai
import peft
import pytest
import torch
from transformers import AutoTokenizer

ADAPTER = "demo-3d"
PAIRS = [  # (context, continuation) as lm-eval sends them: token ids, the context first
    ("the model is a small", " expert"),
    ("hello world the", " answer is right"),
    ("we know the", " server"),
    ("a long time ago the people of the city", " learn to read and write"),
]


@pytest.fixture(scope="module")
def tokenizer(demo):
    return AutoTokenizer.from_pretrained(demo.model_dir)


@pytest.fixture(scope="module")
def peft_model(hf_demo, demo):
    return peft.PeftModel.from_pretrained(copy.deepcopy(hf_demo), demo.adapters[ADAPTER]).eval()


@pytest.fixture(scope="module")
def requests(tokenizer) -> list[tuple[list[int], int]]:
    """(prompt ids, context length) per pair."""
    out = []
    for context, continuation in PAIRS:
        ctx = tokenizer.encode(context, add_special_tokens=False)
        out.append((ctx + tokenizer.encode(continuation, add_special_tokens=False), len(ctx)))
    return out


def reference_token_logprobs(model, prompt: list[int]) -> list[float]:
    """log p(prompt[i] | prompt[:i]) for i >= 1."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1).tolist()


def test_loglikelihoods_equal_transformers_peft(client, peft_model, hf_demo, requests):
    reply = client.completions.create(model=ADAPTER, prompt=[p for p, _ in requests], echo=True,
                                      logprobs=1, max_tokens=1, temperature=0, seed=1234)
    assert len(reply.choices) == len(requests)
    for choice, (prompt, ctxlen) in zip(sorted(reply.choices, key=lambda c: c.index), requests):
        got = choice.logprobs.token_logprobs
        assert len(got) == len(prompt) + 1 and got[0] is None
        assert choice.logprobs.top_logprobs[0] is None
        want = reference_token_logprobs(peft_model, prompt)
        torch.testing.assert_close(torch.tensor(got[1:-1]), torch.tensor(want), atol=1e-4,
                                   rtol=0)
        # lm-eval's loglikelihood: the continuation's sum, without the generated token
        assert abs(sum(got[ctxlen:-1]) - sum(want[ctxlen - 1:])) < 1e-4
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])
        base = reference_token_logprobs(hf_demo, prompt)
        assert max(abs(a - b) for a, b in zip(want, base)) > 1e-2, "the adapter must matter"


def test_echo_with_zero_max_tokens_answers_the_prompt_alone(client, peft_model, requests,
                                                            tokenizer):
    prompt, _ = requests[3]
    reply = client.completions.create(model=ADAPTER, prompt=prompt, echo=True, logprobs=2,
                                      max_tokens=0)
    choice = reply.choices[0]
    assert choice.text == tokenizer.decode(prompt)
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(prompt)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]),
                               torch.tensor(reference_token_logprobs(peft_model, prompt)),
                               atol=1e-4, rtol=0)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0"):
        client.completions.create(model=ADAPTER, prompt=prompt, max_tokens=0)


def test_echo_puts_the_prompt_before_the_completion_also_in_a_stream(client):
    prompt = "the model is a small"
    plain = client.completions.create(model=ADAPTER, prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    echoed = client.completions.create(model=ADAPTER, prompt=prompt, max_tokens=6,
                                       temperature=0, echo=True, logprobs=0,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens == 6
    chunks = list(client.completions.create(model=ADAPTER, prompt=prompt, max_tokens=6,
                                            temperature=0, echo=True, stream=True, n=2,
                                            extra_body={"ignore_eos": True}))
    for index in (0, 1):
        texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].index == index]
        assert texts[0].startswith(prompt) and "".join(texts) == echoed.choices[0].text


def test_vllm_prompt_logprobs_field(client, peft_model, requests):
    prompt, _ = requests[1]
    reply = client.completions.create(model=ADAPTER, prompt=prompt, max_tokens=2,
                                      extra_body={"prompt_logprobs": 2})
    choice = reply.choices[0]
    assert choice.logprobs is None and choice.text is not None
    field = choice.model_extra["prompt_logprobs"]
    assert len(field) == len(prompt) and field[0] is None
    with torch.no_grad():
        logits = peft_model(torch.tensor([prompt])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    for i, entry in enumerate(field[1:]):
        token = prompt[i + 1]
        mine = entry[str(token)]
        assert abs(mine["logprob"] - logp[i, token].item()) < 1e-4
        assert mine["rank"] == int((logp[i] > logp[i, token]).sum()) + 1
        top = torch.topk(logp[i], 2).indices.tolist()
        assert {int(k) for k in entry} == {token, *top}
        assert [entry[str(t)]["rank"] for t in top if t != token] == \
            [r for r, t in enumerate(top, 1) if t != token]


def test_prompt_logprobs_stay_refused_on_chat(client):
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs: not supported"):
        client.chat.completions.create(model=ADAPTER, max_tokens=1, extra_body={
            "prompt_logprobs": 1}, messages=[{"role": "user", "content": "hi"}])
