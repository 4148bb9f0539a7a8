"""Greedy generation under continuous batching equals transformers, token for token (fp32)."""

from __future__ import annotations

import pytest
import torch

from loramux.engine import LLM, SamplingParams
from tests.engine.conftest import ARCHS, PROMPTS
from tests.tiny import load_reference

MAX_TOKENS = 12


def reference_tokens(path: str, prompts: list[list[int]]) -> list[list[int]]:
    model = load_reference(path)
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


def engine_tokens(path: str, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(checkpoint, arch, fused):
    path = checkpoint(arch, fused)
    tokens, llm = engine_tokens(path, block_size=4, num_blocks=64)
    assert tokens == reference_tokens(path, PROMPTS)
    assert llm.core.native_layout == ("3d" if fused else "2d")


@pytest.mark.parametrize("arch", ARCHS + ("qwen3_5_moe", "qwen3_next", "qwen3_vl_moe"))
def test_first_step_logprobs_match_transformers(checkpoint, arch):
    path = checkpoint(arch)
    llm = LLM(path)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=5))
    model = load_reference(path)
    for prompt, out in zip(PROMPTS, outs):
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
        ref = torch.log_softmax(logits, dim=-1)
        lp = out.outputs[0].logprobs[0]
        top_ids = [t for t, _ in lp.top]
        assert top_ids == torch.topk(ref, 5).indices.tolist()
        got = torch.tensor([v for _, v in lp.top])
        torch.testing.assert_close(got, ref[top_ids], atol=1e-4, rtol=0)
        assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-4


def test_preemption_keeps_outputs(checkpoint):
    path = checkpoint("qwen3_moe")
    expected = reference_tokens(path, PROMPTS)
    # 2-token blocks, 16 blocks = 32 token slots for four sequences of up to 25 tokens.
    tokens, llm = engine_tokens(path, block_size=2, num_blocks=16)
    assert llm.core.scheduler.num_preemptions > 0
    assert tokens == expected
    assert llm.core.pools.blocks.num_free == 16


def test_chunked_prefill_keeps_outputs(checkpoint):
    path = checkpoint("mixtral", True)
    expected = reference_tokens(path, PROMPTS)
    tokens, _ = engine_tokens(path, block_size=4, num_blocks=64, max_num_batched_tokens=5)
    assert tokens == expected


def test_max_num_seqs_limits_the_running_set(checkpoint):
    path = checkpoint("olmoe")
    expected = reference_tokens(path, PROMPTS)
    llm = LLM(path, max_num_seqs=2)
    for p in PROMPTS:
        llm.core.add_request(str(len(llm.core.requests)), p,
                             SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    peak, results = 0, {}
    while llm.core.has_work():
        for out in llm.core.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        peak = max(peak, len(llm.core.scheduler.running))
    assert peak == 2
    assert [results[str(i)] for i in range(4)] == expected
