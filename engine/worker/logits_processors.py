"""Logits processors: penalties, logit_bias, min_tokens, bad_words and allowed_token_ids on the
logits rows of the sampling rows whose SampleRow carries ProcessorParams (engine/processors.py).

Applied after any grammar mask and before temperature, top-k, top-p and min-p, in vLLM's order:
1. allowed_token_ids: every other token gets -inf;
2. bad_words: the last token of each word whose other tokens end the output so far gets -inf
   (a one-token word always);
3. min_tokens: while the output is shorter, EOS and the stop token ids get -inf;
4. logit_bias: added;
5. repetition_penalty p over the tokens of prompt + output: a positive logit is divided by p,
   any other multiplied by p;
6. frequency and presence penalties over the output tokens (OpenAI's formula):
   logit - count * frequency_penalty - (count > 0) * presence_penalty.
Each step is one indexed write over all such rows. The worker keeps the output tokens of each
sequence with processors (OutputHistory: host data grown by one token a step, like its
generators), so no step copies a whole output; the prompt tokens come in the ProcessorParams.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from loramux.engine.processors import ProcessorParams


@dataclass(slots=True)
class OutputHistory:
    """The tokens one sequence has sampled so far, and how often each."""

    tokens: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.counts[token] += 1


ProcessedRow = tuple[int, ProcessorParams, OutputHistory]  # (logits row, params, history)


def apply_processors(logits: torch.Tensor, rows: list[ProcessedRow]) -> torch.Tensor:
    """A float32 copy of logits [B, V] with each listed row processed (steps 1-6 above)."""
    out = logits.to(torch.float32, copy=True)
    allowed = [(r, p.allowed_token_ids) for r, p, _ in rows if p.allowed_token_ids is not None]
    if allowed:
        keep = torch.zeros(len(allowed), out.shape[1], dtype=torch.bool, device=out.device)
        keep[_pairs([(i, ids) for i, (_, ids) in enumerate(allowed)], out)] = True
        index = _tensor([r for r, _ in allowed], out)
        out[index] = out[index].masked_fill(~keep, float("-inf"))
    banned = _pairs([(r, _banned(p, h)) for r, p, h in rows], out)
    out.index_put_(banned, torch.tensor(float("-inf"), device=out.device))
    bias = [(r, t, b) for r, p, _ in rows for t, b in p.logit_bias]
    if bias:
        out.index_put_(_columns(bias, out), _tensor([b for *_, b in bias], out, torch.float32),
                       accumulate=True)
    repeated = [(r, t, p.repetition_penalty) for r, p, h in rows if p.repetition_penalty != 1.0
                for t in set(p.prompt_tokens).union(h.counts)]
    if repeated:
        where = _columns(repeated, out)
        penalty = _tensor([v for *_, v in repeated], out, torch.float32)
        values = out[where]
        out[where] = torch.where(values > 0, values / penalty, values * penalty)
    penalties = [(r, t, c * p.frequency_penalty + p.presence_penalty) for r, p, h in rows
                 if p.frequency_penalty or p.presence_penalty for t, c in h.counts.items()]
    if penalties:
        out.index_put_(_columns(penalties, out),
                       -_tensor([v for *_, v in penalties], out, torch.float32), accumulate=True)
    return out


def _banned(params: ProcessorParams, history: OutputHistory) -> list[int]:
    """Tokens masked for bad_words and min_tokens, given the output so far."""
    tokens = history.tokens
    banned = [word[-1] for word in params.bad_words
              if len(word) == 1 or tuple(tokens[-(len(word) - 1):]) == word[:-1]]
    if len(tokens) < params.min_tokens:
        banned += params.min_tokens_banned
    return banned


def _pairs(entries: list[tuple[int, object]], like: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index tensors of every token of every (row, tokens) entry."""
    rows = [r for r, tokens in entries for _ in tokens]
    return _tensor(rows, like), _tensor([t for _, tokens in entries for t in tokens], like)


def _columns(triples: list[tuple[int, int, float]], like: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return _tensor([r for r, *_ in triples], like), _tensor([t for _, t, _ in triples], like)


def _tensor(values: list, like: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device)
