"""Prompt logprobs equal transformers' (fp32, CPU) to 1e-4, across chunked prefill and
preemption, with rank and top-k; requests without them add nothing to the plans."""

from __future__ import annotations

import pytest
import torch

from loramux.engine import LLM, SamplingParams
from tests.engine.conftest import PROMPTS
from tests.tiny import load_reference

LONG = list(range(30, 67))  # 37 tokens: several chunks at a 5-token budget


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("qwen3_moe")


@pytest.fixture(scope="module")
def reference(path):
    return load_reference(path)


def reference_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[P - 1, V]: row i is the distribution of prompt token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def check(out, model, k: int) -> None:
    prompt = out.prompt_token_ids
    ref = reference_logprobs(model, prompt)
    scored = out.prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None
    for i, entry in enumerate(scored[1:]):
        assert entry.token_id == prompt[i + 1]
        assert abs(entry.logprob - ref[i, prompt[i + 1]].item()) < 1e-4
        assert entry.rank == int((ref[i] > ref[i, prompt[i + 1]]).sum()) + 1
        assert [t for t, _ in entry.top] == torch.topk(ref[i], k).indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in entry.top]),
                                   torch.topk(ref[i], k).values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", [
    {},
    {"max_num_batched_tokens": 5},
    {"max_num_batched_tokens": 7, "block_size": 2, "num_blocks": 30},
], ids=["one-step", "chunked", "chunked-preempted"])
def test_prompt_logprobs_equal_transformers(path, reference, config):
    llm = LLM(path, **config)
    prompts = [LONG, *PROMPTS]
    params = [SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=k, ignore_eos=True)
              for k in (3, 0, 1, 5, 2)]
    for out, p in zip(llm.generate(prompts, params), params):
        check(out, reference, p.prompt_logprobs)
    if "num_blocks" in config:
        assert llm.core.scheduler.num_preemptions > 0


def test_n_samples_share_one_scoring_and_others_pay_nothing(path, reference):
    llm = LLM(path, max_num_batched_tokens=8)
    plans = []
    execute = llm.core.worker.execute
    llm.core.worker.execute = lambda plan: plans.append(plan) or execute(plan)
    outs = llm.generate([LONG, PROMPTS[0]], [
        SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=4, prompt_logprobs=1),
        SamplingParams(temperature=0, max_tokens=4)])
    check(outs[0], reference, 1)
    assert outs[1].prompt_logprobs is None
    # each position scored once, by one of the three samples; the other request never
    scored = [row for plan in plans for row in plan.prompt_logprobs]
    assert sum(len(row.targets) for row in scored) == len(LONG) - 1
    assert all(len(plan.prompt_logprobs) <= 1 for plan in plans)
    assert any(not plan.prompt_logprobs for plan in plans)  # decode steps carry none
