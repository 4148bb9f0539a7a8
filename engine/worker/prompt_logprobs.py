"""Prompt logprobs: the log-probability of each prompt token given the tokens before it, with
its rank and the most likely tokens at its position (echo + logprobs, vLLM's prompt_logprobs).

A plan's PromptLogprobsRow names the row's tokens whose logits are scored and the prompt tokens
they predict (engine/plan.py); chunked prefill scores each chunk's positions in its own step.
Logits are computed for those positions only, a few hundred positions at a time so that a long
prompt never holds [T, V] logits at once, and are the model's raw distribution (as the sampled
tokens' logprobs: no processors, no sampling filters).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch

from loramux.engine.plan import PromptLogprobsRow, StepPlan
from loramux.engine.request import TokenLogprob

_POSITIONS_AT_ONCE = 256  # [256, V] float32 logits: 150 MB at a 150k vocabulary


def score_prompt_tokens(hidden: torch.Tensor, plan: StepPlan,
                        compute_logits: Callable[[torch.Tensor], torch.Tensor],
                        ) -> list[list[TokenLogprob]]:
    """For each of the plan's prompt_logprobs rows, a TokenLogprob per target, in order.
    hidden: [T, H] the step's hidden states (eager: one row per token)."""
    starts = [0, *accumulate(plan.query_lens)]
    index = [starts[r.row] + r.offset + i for r in plan.prompt_logprobs
             for i in range(len(r.targets))]
    targets = [t for r in plan.prompt_logprobs for t in r.targets]
    num_top = max(r.num_top for r in plan.prompt_logprobs)
    scored: list[TokenLogprob] = []
    for at in range(0, len(index), _POSITIONS_AT_ONCE):
        rows = torch.tensor(index[at:at + _POSITIONS_AT_ONCE], device=hidden.device)
        wanted = torch.tensor(targets[at:at + _POSITIONS_AT_ONCE], device=hidden.device)
        scored += _score(compute_logits(hidden[rows]), wanted, num_top)
    return _split(scored, plan.prompt_logprobs)


def _score(logits: torch.Tensor, targets: torch.Tensor, num_top: int) -> list[TokenLogprob]:
    logp = torch.log_softmax(logits.float(), dim=-1)  # [P, V]
    chosen = logp.gather(1, targets[:, None])  # [P, 1]
    ranks = (logp > chosen).sum(dim=1) + 1
    top_v, top_i = torch.topk(logp, num_top, dim=-1)
    return [TokenLogprob(t, lp, list(zip(ids, vals)), rank) for t, lp, rank, ids, vals in zip(
        targets.tolist(), chosen.squeeze(1).tolist(), ranks.tolist(), top_i.tolist(),
        top_v.tolist())]


def _split(scored: list[TokenLogprob], rows: list[PromptLogprobsRow]) -> list[list[TokenLogprob]]:
    """Per row, its entries, with each row's own number of top tokens."""
    out, at = [], 0
    for row in rows:
        entries = scored[at:at + len(row.targets)]
        at += len(row.targets)
        out.append([TokenLogprob(e.token_id, e.logprob, e.top[:row.num_top], e.rank)
                    for e in entries])
    return out
