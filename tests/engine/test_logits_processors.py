"""Logits processors (engine/processors.py, engine/worker/logits_processors.py) against the
token-by-token oracle in tests/logits_reference.py, on random logits."""

from __future__ import annotations

import pytest
import torch

from loramux.engine.errors import InvalidRequest
from loramux.engine.processors import bad_words_token_ids, processor_params
from loramux.engine.request import SamplingParams
from loramux.engine.worker.logits_processors import OutputHistory, apply_processors
from tests.logits_reference import Rules, process

V = 64
EOS = (1,)
PROMPT = [3, 4, 5, 4, 9]


def history(tokens: list[int]) -> OutputHistory:
    out = OutputHistory()
    for token in tokens:
        out.append(token)
    return out


def check(params: SamplingParams, rules: Rules, output: list[int], seed: int = 0) -> None:
    """Row 1 of three carries the processors; rows 0 and 2 must come out unchanged."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(seed)) * 3
    before = logits.clone()
    spec = processor_params(params, PROMPT, None, EOS, V)
    got = apply_processors(logits, [(1, spec, history(output))])
    assert torch.equal(logits, before), "the input logits must not change"
    torch.testing.assert_close(got[[0, 2]], before[[0, 2]], rtol=0, atol=0)
    want = process(before[1], PROMPT, output, rules).float()
    torch.testing.assert_close(got[1], want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[1], before[1]), "the case must change the row"


OUTPUT = [7, 4, 7, 7, 12]


@pytest.mark.parametrize("params, rules", [
    (SamplingParams(repetition_penalty=1.7), Rules(repetition_penalty=1.7)),
    (SamplingParams(repetition_penalty=0.6), Rules(repetition_penalty=0.6)),
    (SamplingParams(frequency_penalty=1.3), Rules(frequency_penalty=1.3)),
    (SamplingParams(frequency_penalty=-0.8), Rules(frequency_penalty=-0.8)),
    (SamplingParams(presence_penalty=1.9), Rules(presence_penalty=1.9)),
    (SamplingParams(logit_bias={5: 100.0, 60: -42.5, 0: 3.0}),
     Rules(logit_bias={5: 100.0, 60: -42.5, 0: 3.0})),
    (SamplingParams(allowed_token_ids=[2, 7, 63]), Rules(allowed_token_ids=(2, 7, 63))),
    (SamplingParams(min_tokens=6, stop_token_ids=(8, 9)),
     Rules(min_tokens=6, stop_ids=(1, 8, 9))),
    (SamplingParams(repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=-0.3,
                    logit_bias={4: 2.0, 7: -1.0, 30: 5.0}, allowed_token_ids=[4, 7, 30, 31],
                    min_tokens=9),
     Rules(repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=-0.3,
           logit_bias={4: 2.0, 7: -1.0, 30: 5.0}, allowed_token_ids=(4, 7, 30, 31),
           min_tokens=9, stop_ids=(1,))),
], ids=["repetition", "repetition-below-1", "frequency", "frequency-negative", "presence",
        "logit-bias", "allowed", "min-tokens", "all-at-once"])
def test_each_processor_equals_its_formula(params, rules):
    for seed in range(3):
        check(params, rules, OUTPUT, seed)


def test_min_tokens_lets_eos_through_once_reached():
    params = SamplingParams(min_tokens=len(OUTPUT))
    spec = processor_params(params, PROMPT, None, EOS, V)
    logits = torch.zeros(1, V)
    assert apply_processors(logits, [(0, spec, history(OUTPUT[:-1]))])[0, 1] == float("-inf")
    assert apply_processors(logits, [(0, spec, history(OUTPUT))])[0, 1] == 0


class WordTokenizer:
    """Spells each character as one token (a space is 0), with a leading-space form for the
    first letter of a word that follows a space (its id + 32), as BPE vocabularies have."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, spaced = [], False
        for ch in text:
            if ch == " ":
                spaced = True
                continue
            ids.append(ord(ch) - ord("a") + 1 + (32 if spaced else 0))
            spaced = False
        return ids


def test_bad_words_are_spelled_as_vllm_does_and_mask_their_last_token():
    words = bad_words_token_ids(WordTokenizer(), ["ab", " c"])
    assert words == ((1, 2), (33, 2), (3,), (35,))
    params = SamplingParams(bad_words=("ab", " c"))
    spec = processor_params(params, PROMPT, WordTokenizer(), EOS, V)
    assert spec.bad_words == words
    rules, inf = Rules(bad_words=words), float("-inf")
    for output in ([5, 1], [5, 33], [9], []):
        logits = torch.randn(1, V)
        got = apply_processors(logits, [(0, spec, history(output))])[0]
        assert torch.equal(got, process(logits[0], PROMPT, output, rules).float())
        assert (got[2] == inf) == (output[-1:] in ([1], [33]))  # "b" only after "a"
        assert got[3] == got[35] == inf  # a one-token word always


def test_token_ids_outside_the_vocabulary_are_named():
    for params, field in [(SamplingParams(logit_bias={3: 1.0, V: 1.0, -2: 1.0}), "logit_bias"),
                          (SamplingParams(allowed_token_ids=[1, V + 5]), "allowed_token_ids"),
                          (SamplingParams(bad_words=("zz",)), "bad_words")]:
        with pytest.raises(InvalidRequest, match=field) as err:
            processor_params(params, PROMPT, WordTokenizer(), EOS, 20)
        assert "outside the vocabulary" in str(err.value)
    with pytest.raises(InvalidRequest, match=r"\[-2, 64\]"):
        processor_params(SamplingParams(logit_bias={3: 1.0, V: 1.0, -2: 1.0}), PROMPT, None,
                         EOS, V)


@pytest.mark.parametrize("fields, message", [
    ({"presence_penalty": 2.5}, "presence_penalty must be in"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"logit_bias": {4: 101}}, r"logit_bias of token ids \[4\]"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens must be <= max_tokens"),
    ({"bad_words": ("ok", " ")}, "bad_words must not hold"),
    ({"allowed_token_ids": []}, "allowed_token_ids must list"),
])
def test_out_of_range_values_are_refused(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**fields)


def test_requests_without_processors_carry_none():
    assert processor_params(SamplingParams(), PROMPT, None, EOS, V) is None
    assert processor_params(SamplingParams(repetition_penalty=1.0, logit_bias={}), PROMPT,
                            None, EOS, V) is None
    spec = processor_params(SamplingParams(frequency_penalty=0.1), PROMPT, None, EOS, V)
    assert spec.prompt_tokens == ()  # only repetition_penalty reads the prompt
