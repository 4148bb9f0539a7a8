"""Sampling parameters, stop conditions and incremental detokenization."""

from __future__ import annotations

import pytest

from loramux.engine import LLM, SamplingParams
from loramux.engine.demo import ensure_demo
from loramux.engine.detokenizer import IncrementalDetokenizer
from loramux.engine.errors import InvalidRequest, PromptTooLong
from tests.engine.conftest import PROMPTS


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("qwen2_moe"))


@pytest.fixture(scope="module")
def demo_llm(tmp_path_factory):
    return LLM(str(ensure_demo(tmp_path_factory.mktemp("demo")).model_dir))


def sample(llm, params, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    first, second = sample(llm, params), sample(llm, params)
    assert first == second
    other = sample(llm, SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=10))
    assert other != first


def test_top_k_one_equals_greedy(llm):
    greedy = sample(llm, SamplingParams(temperature=0, max_tokens=10))
    assert sample(llm, SamplingParams(temperature=1.5, top_k=1, seed=5, max_tokens=10)) == greedy
    assert sample(llm, SamplingParams(temperature=1.0, top_p=1e-6, seed=5,
                                      max_tokens=10)) == greedy
    assert sample(llm, SamplingParams(temperature=1.0, min_p=0.999, seed=5,
                                      max_tokens=10)) == greedy


def test_n_returns_distinct_samples(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.2, seed=7,
                                                    max_tokens=10))[0]
    samples = [tuple(c.token_ids) for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len(set(samples)) == 3


def test_logprobs_of_chosen_and_top_tokens(llm):
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for lp, token in zip(lps, out.outputs[0].token_ids):
        assert lp.token_id == token and len(lp.top) == 3
        assert lp.top[0][0] == token and lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_max_tokens_and_stop_token_ids(llm):
    greedy = sample(llm, SamplingParams(temperature=0, max_tokens=10))[0]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert out.token_ids == greedy[:3] and out.finish_reason == "length"
    stop_id = greedy[4]
    first = greedy.index(stop_id)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10,
                                                    stop_token_ids=(stop_id,)))[0].outputs[0]
    assert out.token_ids == greedy[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_string_truncates_text(demo_llm):
    tok = demo_llm.tokenizer
    prompt = tok.encode("hello world the model")
    full = demo_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16,
                                                      ignore_eos=True))[0].outputs[0]
    words = full.text.split()
    assert len(words) >= 6, full.text
    stop = words[4]
    cut = demo_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop=[stop],
                                                     ignore_eos=True))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]


def test_prompt_too_long_is_refused_and_engine_goes_on(checkpoint):
    llm = LLM(checkpoint("qwen3_moe"), max_model_len=16)
    with pytest.raises(PromptTooLong, match="maximum context length is 16"):
        llm.generate([list(range(3, 20))], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequest, match="token ids"):
        llm.generate([[100000]], SamplingParams(max_tokens=4))
    with pytest.raises(PromptTooLong, match="2 in the prompt, 20 for the completion"):
        llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20))
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=None,
                                                    ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(PROMPTS[1]) + len(out.outputs[0].token_ids) == 16


def test_invalid_sampling_params_are_named():
    with pytest.raises(InvalidRequest, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams(temperature=-1)


def test_incremental_detokenizer_never_splits_utf8():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = "héllo 😀 wörld ✓"
    ids = fast.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(fast, prompt=[], stop=())
    pieces = []
    for i, token in enumerate(ids):
        detok.add(token)
        pieces.append(detok.delta(finished=i == len(ids) - 1))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_never_streamed_in_part():
    class Chars:  # one character per token id
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    detok = IncrementalDetokenizer(Chars(), prompt=[], stop=("END",))
    streamed, stop = "", None
    for ch in "abcENxEND":
        stop = detok.add(ord(ch))
        streamed += detok.delta(finished=stop is not None)
        assert "abcENx".startswith(streamed)  # never streams text the stop string removes
        if stop:
            break
    assert stop == "END" and streamed == "abcENx"


def test_stop_strings_count_only_after_min_tokens():
    """As vLLM: a stop string is looked for once the output is longer than min_tokens, in text
    that ends in the new tokens (it may begin earlier)."""
    class Chars:  # one character per token id
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    def first_stop(text: str, min_tokens: int) -> tuple[int, str | None]:
        detok = IncrementalDetokenizer(Chars(), prompt=[], stop=("ab",), min_tokens=min_tokens)
        for n, ch in enumerate(text, 1):
            if detok.add(ord(ch)):
                return n, detok.text
        return len(text), None

    assert first_stop("xabyyabz", 0) == (3, "x")
    assert first_stop("xabyyabz", 3) == (7, "xabyy")  # "ab" within the first 3 is not a stop
    assert first_stop("xabyyabz", 2) == (3, "x")  # ends in the third token: counted
