"""Qwen3.5 / Qwen3-Next / Qwen3-VL-MoE served by the engine: greedy output for prompts of
different lengths submitted together equals transformers token for token (fp32, CPU, fla not
importable), and the same with chunked prefill cutting the prompts mid-way through the Gated
DeltaNet state and with preemption (state freed, recomputed). First-step logprobs within 1e-4:
tests/engine/test_generate_vs_hf.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from loramux.engine import LLM, SamplingParams
from tests.engine.conftest import PROMPTS
from tests.tiny import HYBRID_ARCHS, load_reference

MAX_TOKENS = 12
ARCHS = (*HYBRID_ARCHS, "qwen3_vl_moe")
KIND = "gated_deltanet"


@pytest.fixture(scope="module")
def reference(checkpoint):
    """reference(arch, fused) -> (path, greedy tokens of transformers for PROMPTS)."""
    made = {}

    def get(arch: str, fused: bool = False):
        if (arch, fused) not in made:
            path = checkpoint(arch, fused)
            model = load_reference(path)
            tokens = [model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS,
                                     do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
            made[arch, fused] = path, tokens
        return made[arch, fused]

    return get


def _generate(path: str, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].token_ids for o in outs], llm


def test_fla_is_not_importable():
    """The CPU oracle must be transformers' torch path (with fla importable it would bind fla)."""
    assert importlib.util.find_spec("fla") is None


@pytest.mark.parametrize("arch,fused", [(a, False) for a in ARCHS] + [("qwen3_5_moe", True)])
def test_greedy_matches_transformers(reference, arch, fused):
    path, expected = reference(arch, fused)
    tokens, llm = _generate(path, block_size=4, num_blocks=64)
    assert tokens == expected
    states = llm.core.pools.states
    assert set(states) == ({KIND} if arch in HYBRID_ARCHS else set())
    assert all(pool.num_free == pool.size for pool in states.values())  # all given back


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_chunked_prefill_cuts_the_state_mid_prompt(reference, arch):
    """5-token budget: the 8- and 13-token prompts are prefilled over several steps, and
    steps mix one sequence's prefill chunk with others' decode tokens."""
    path, expected = reference(arch)
    tokens, _ = _generate(path, block_size=4, num_blocks=64, max_num_batched_tokens=5)
    assert tokens == expected


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_preemption_recomputes_the_state(reference, arch):
    path, expected = reference(arch)
    # 2-token blocks, 16 blocks = 32 token slots for four sequences of up to 25 tokens.
    tokens, llm = _generate(path, block_size=2, num_blocks=16)
    assert llm.core.scheduler.num_preemptions > 0
    assert tokens == expected
    assert llm.core.pools.states[KIND].num_free == llm.core.pools.states[KIND].size


def test_triton_ops_match_transformers(reference):
    """The Triton ops (the interpreter here) on the hybrid's gated attention: partial rotary,
    zero-centred q/k and layer norms."""
    path, expected = reference("qwen3_5_moe")
    llm = LLM(path, block_size=4, num_blocks=64, kernel_backend="triton")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=3))
    assert [o.outputs[0].token_ids for o in outs] == [e[:3] for e in expected]
