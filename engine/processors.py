"""Logits processors on the engine (host) side: a request's sampling fields resolved once into
plain data that rides in each of its sampling rows (engine/plan.py) and that the worker applies
(engine/worker/logits_processors.py).

Resolving checks every token id against the model's vocabulary (a 400 naming the field and the
ids), tokenizes `bad_words` as vLLM does, collects the tokens `min_tokens` holds back (EOS and
stop token ids) and, for `repetition_penalty`, the distinct prompt tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from loramux.engine.errors import InvalidRequest
from loramux.engine.request import SamplingParams


@dataclass(frozen=True, slots=True)
class ProcessorParams:
    """What the worker needs to process one request's logits rows (shared by its n samples)."""

    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    prompt_tokens: tuple[int, ...]  # distinct prompt token ids; () unless repetition_penalty
    logit_bias: tuple[tuple[int, float], ...]  # (token id, bias)
    min_tokens: int
    min_tokens_banned: tuple[int, ...]  # EOS and stop token ids, masked until min_tokens
    bad_words: tuple[tuple[int, ...], ...]  # token sequences; the last token is the one masked
    allowed_token_ids: tuple[int, ...] | None


def processor_params(params: SamplingParams, prompt: list[int], tokenizer,
                     eos_ids: Iterable[int], vocab_size: int) -> ProcessorParams | None:
    """The request's processors, or None when it asks for none (its rows then pay nothing)."""
    if not params.has_processors:
        return None
    bad_words = bad_words_token_ids(tokenizer, params.bad_words) if params.bad_words else ()
    _check_ids("logit_bias", [token for token, _ in params.logit_bias], vocab_size)
    _check_ids("allowed_token_ids", params.allowed_token_ids or (), vocab_size)
    _check_ids("bad_words", [token for word in bad_words for token in word], vocab_size)
    repeats = params.repetition_penalty != 1.0
    return ProcessorParams(
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        prompt_tokens=tuple(sorted(set(prompt))) if repeats else (),
        logit_bias=params.logit_bias, min_tokens=params.min_tokens,
        min_tokens_banned=tuple(sorted({*eos_ids, *params.stop_token_ids})),
        bad_words=bad_words, allowed_token_ids=params.allowed_token_ids)


def bad_words_token_ids(tokenizer, words: Iterable[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's rule: each word (left-stripped) as it tokenizes at the start of a text, and with
    a leading space when that gives a different first token and as many tokens (the form the
    word takes in the middle of a text)."""
    if tokenizer is None:
        raise InvalidRequest("bad_words: this model has no tokenizer to spell them with")
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if not bare:
            raise InvalidRequest(f"bad_words: {word!r} spells no token")
        sequences.append(bare)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    return tuple(sequences)


def _check_ids(field: str, token_ids: Iterable[int], vocab_size: int) -> None:
    bad = sorted({t for t in token_ids if not 0 <= t < vocab_size})
    if bad:
        raise InvalidRequest(f"{field}: token ids {bad} are outside the vocabulary "
                             f"(0 to {vocab_size - 1})")
