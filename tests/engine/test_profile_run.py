"""The profile run the memory plan measures activations with: the largest step the scheduler
may build, on throwaway pools, leaving the engine as it was."""

from __future__ import annotations

import pytest
import torch

from loramux.engine import LLM, SamplingParams
from loramux.engine.memory.plan import state_kinds
from loramux.engine.worker.profile_run import largest_step
from tests.engine.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.mark.parametrize("tokens,seqs,max_len", [(2048, 256, 4096), (100, 3, 4096),
                                                 (4096, 2, 1000), (8, 64, 4096)])
def test_largest_step_fills_the_token_budget_over_disjoint_pools(tokens, seqs, max_len):
    memory, step = largest_step(tokens, seqs, max_len, 16, ["gdn"], 3)
    want_tokens = min(tokens, min(seqs, tokens) * max_len)
    assert len(step.token_ids) == len(step.positions) == sum(step.query_lens) == want_tokens
    assert step.num_seqs == min(seqs, tokens) == len(step.samples)
    assert max(step.query_lens) - min(step.query_lens) <= 1 and max(step.query_lens) <= max_len
    assert step.context_lens == step.query_lens  # whole prompts: every row is fresh
    blocks = [b for table in step.block_tables for b in table]
    assert sorted(blocks) == list(range(memory.num_blocks))  # disjoint, all inside the pool
    for table, n in zip(step.block_tables, step.query_lens):
        assert len(table) * 16 >= n
    assert step.state_slots == {"gdn": list(range(step.num_seqs))}
    assert memory.state_slots == {"gdn": step.num_seqs} and memory.adapter_slots == 3
    assert set(step.adapter_slots) <= {0, 1, 2} and -1 not in step.adapter_slots
    # the first prompt's tokens are scored (prompt logprobs): the most logits rows a step has
    assert [(r.row, len(r.targets)) for r in step.prompt_logprobs] == (
        [(0, step.query_lens[0] - 1)] if step.query_lens[0] > 1 else [])


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
def test_profile_run_leaves_the_engine_as_it_was(checkpoint, arch):
    """The run executes (hybrid states, LoRA on every token); re-allocating the real plan
    afterwards serves the same greedy tokens as before."""
    llm = LLM(checkpoint(arch), max_loras=2, max_lora_rank=8, max_num_batched_tokens=64,
              max_num_seqs=4)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    worker, plan = llm.core.worker, llm.core.pools.plan
    kinds = list(state_kinds([m.memory_spec() for m in worker.model.memory_modules()]))
    assert (arch == "qwen3_5_moe") == bool(kinds)
    trial_bytes, activations = worker.profile_run(kinds)
    assert trial_bytes > 0 and activations == 0  # not measured off CUDA
    worker.allocate(plan)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_memory_plan_leaves_room_for_the_measured_activations(checkpoint):
    """On CUDA the plan subtracts the profile run's peak, which grows with the step's tokens."""
    peaks = {}
    for tokens in (256, 4096):
        llm = LLM(checkpoint("qwen3_moe"), max_num_batched_tokens=tokens, max_num_seqs=8)
        peaks[tokens] = llm.core.worker.activation_bytes
        del llm
        torch.cuda.empty_cache()
    assert 0 < peaks[256] < peaks[4096]
