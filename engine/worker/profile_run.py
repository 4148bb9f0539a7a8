"""The profile run: the largest step the scheduler may build, once, on throwaway pools, so the
memory plan can leave room for its activations before it sizes the KV cache and state pools.

The step holds max_num_batched_tokens tokens (no more than max_model_len a sequence) split as
evenly as possible over min(max_num_seqs, tokens) whole-prompt sequences, every token on an adapter slot (LoRA on when
the engine has slots), every sequence sampling, and the first one scoring its prompt tokens (a
chunk of prompt logprobs, the most logits rows one step may hold): the most rows of logits, the
most MoE pairs and LoRA work at once. Attention memory does not grow with the context (the prefill kernel keeps a
tile per program), so this bounds every step the scheduler can form.
"""

from __future__ import annotations

from loramux.engine.memory import MemoryPlan
from loramux.engine.plan import PromptLogprobsRow, SampleRow, StepPlan
from loramux.engine.request import SamplingParams

_GREEDY = SamplingParams(temperature=0.0)
MAX_LOGPROBS = 20  # the most top tokens a request may ask for at each position


def largest_step(max_tokens: int, max_seqs: int, max_model_len: int, block_size: int,
                 state_kinds: list[str], num_adapter_slots: int) -> tuple[MemoryPlan, StepPlan]:
    """The pools the step needs (nothing more) and the step itself."""
    num_seqs = max(1, min(max_seqs, max_tokens))
    max_tokens = min(max_tokens, num_seqs * max_model_len)  # no sequence past max_model_len
    lens = [max_tokens // num_seqs + (i < max_tokens % num_seqs) for i in range(num_seqs)]
    tables, num_blocks = [], 0
    for n in lens:
        blocks = -(-n // block_size)
        tables.append(list(range(num_blocks, num_blocks + blocks)))
        num_blocks += blocks
    slot = (lambda i: i % num_adapter_slots) if num_adapter_slots else (lambda i: -1)
    step = StepPlan(
        token_ids=[0] * max_tokens,
        positions=[p for n in lens for p in range(n)],
        adapter_slots=[slot(i) for i, n in enumerate(lens) for _ in range(n)],
        query_lens=lens, context_lens=list(lens), block_tables=tables,
        state_slots={kind: list(range(num_seqs)) for kind in state_kinds},
        samples=[SampleRow(row=i, seq_id=i, params=_GREEDY, seed=None)
                 for i in range(num_seqs)],
        prompt_logprobs=[PromptLogprobsRow(row=0, offset=0, targets=(0,) * (lens[0] - 1),
                                           num_top=MAX_LOGPROBS)] if lens[0] > 1 else [])
    memory = MemoryPlan(block_size, num_blocks, {kind: num_seqs for kind in state_kinds},
                        num_adapter_slots)
    return memory, step
