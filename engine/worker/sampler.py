"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-sequence seeds, logprobs.

A row's logits go through its grammar mask (structured outputs), then its logits processors
(penalties, logit_bias, min_tokens, bad_words, allowed_token_ids), then temperature and the
top-k / top-p / min-p filters. Logprobs are taken after the grammar mask and before the
processors: vLLM's default logprobs_mode, raw_logprobs.
"""

from __future__ import annotations

import torch

from loramux.engine.plan import SampleResult
from loramux.engine.request import SamplingParams, TokenLogprob
from loramux.engine.worker.logits_processors import ProcessedRow, apply_processors
from loramux.engine.worker.token_mask import apply_token_masks


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks of one row [V] (float32)."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first over p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(logits) by the exponential race: argmax(p / Exp(1))."""
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return torch.argmax(probs / noise)


class Sampler:
    """Chooses one token per row. Greedy rows share one argmax; sampled rows use their own
    generator when seeded, so a seeded sequence is reproducible whatever it is batched with.
    A row whose logits are not all finite is sampled as zeros and reported in `finite`.
    A row with a token mask (structured outputs) chooses among its allowed tokens only; the
    rows in `processed` go through their logits processors.
    """

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 token_masks: list[torch.Tensor | None] | None = None,
                 processed: list[ProcessedRow] | None = None) -> SampleResult:
        finite = torch.isfinite(logits).all(dim=-1)  # [B]
        raw = torch.where(finite[:, None], logits, 0.0)
        if token_masks is not None:
            apply_token_masks(raw, token_masks)
        logits = apply_processors(raw, processed) if processed else raw
        chosen = torch.argmax(logits, dim=-1)
        for row, (p, gen) in enumerate(zip(params, generators)):
            if not p.is_greedy:
                chosen[row] = _draw(_filter(logits[row], p), gen)
        token_ids = chosen.tolist()
        return SampleResult(token_ids, self._logprobs(raw, chosen, token_ids, params),
                            finite.tolist())

    @staticmethod
    def _logprobs(logits: torch.Tensor, chosen: torch.Tensor, token_ids: list[int],
                  params: list[SamplingParams]) -> list[TokenLogprob | None]:
        """Log-probabilities of the model's distribution after any grammar mask, before the
        processors and sampling filters (vLLM's raw_logprobs)."""
        want = [p.logprobs for p in params]
        if all(k is None for k in want):
            return [None] * len(params)
        logp = torch.log_softmax(logits, dim=-1)
        k_max = max(k or 0 for k in want)
        top_v, top_i = torch.topk(logp, k_max, dim=-1) if k_max else (None, None)
        chosen_lp = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
        top_v = top_v.tolist() if k_max else None
        top_i = top_i.tolist() if k_max else None
        out: list[TokenLogprob | None] = []
        for row, k in enumerate(want):
            if k is None:
                out.append(None)
                continue
            top = list(zip(top_i[row][:k], top_v[row][:k])) if k else []
            out.append(TokenLogprob(token_ids[row], chosen_lp[row], top))
        return out
