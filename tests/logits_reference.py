"""The logits processors written out token by token from their definitions (vLLM's semantics,
OpenAI's penalty formula), by code of their own: the oracle for engine/worker/logits_processors.py
and for greedy generation with processors (transformers' logits run through it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


@dataclass
class Rules:
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()  # what min_tokens holds back: EOS and stop token ids
    bad_words: tuple[tuple[int, ...], ...] = ()  # as token sequences
    allowed_token_ids: tuple[int, ...] | None = None


def process(logits: torch.Tensor, prompt: list[int], output: list[int],
            rules: Rules) -> torch.Tensor:
    """One row [V] processed: a float64 copy, every token looked at one by one."""
    row = [float(v) for v in logits]
    inf = float("-inf")
    counts = Counter(output)
    for token in range(len(row)):
        if rules.allowed_token_ids is not None and token not in rules.allowed_token_ids:
            row[token] = inf
    for word in rules.bad_words:
        *prefix, last = word
        if len(output) >= len(prefix) and output[len(output) - len(prefix):] == prefix:
            row[last] = inf
    if len(output) < rules.min_tokens:
        for token in rules.stop_ids:
            row[token] = inf
    for token, bias in (rules.logit_bias or {}).items():
        row[token] += bias
    seen = set(prompt) | set(output)
    for token in range(len(row)):
        if token in seen:
            p = rules.repetition_penalty
            row[token] = row[token] / p if row[token] > 0 else row[token] * p
        row[token] -= counts[token] * rules.frequency_penalty
        row[token] -= (counts[token] > 0) * rules.presence_penalty
    return torch.tensor(row, dtype=torch.float64)


def greedy(model, prompt: list[int], max_tokens: int, rules: Rules,
           stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy tokens of a transformers model with the rules applied at every step; stops after
    a token of stop_ids."""
    output: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([prompt + output])).logits[0, -1].float()
            token = int(torch.argmax(process(logits, prompt, output, rules)))
            output.append(token)
            if token in stop_ids:
                break
    return output
