"""Greedy generation with logits processors equals a reference loop that runs transformers'
logits (fp32, CPU) through each processor's formula (tests/logits_reference.py), with rows
with and without processors in one batch, under chunked prefill and preemption."""

from __future__ import annotations

import pytest
import torch

from loramux.engine import LLM, SamplingParams
from loramux.engine.demo import ensure_demo
from tests.engine.conftest import PROMPTS
from tests.logits_reference import Rules, greedy
from tests.tiny import load_reference

MAX_TOKENS = 10
EOS = 1  # tests/tiny.py

CASES = {  # name: (SamplingParams fields, Rules)
    "repetition": ({"repetition_penalty": 1.8}, Rules(repetition_penalty=1.8)),
    "frequency": ({"frequency_penalty": 1.2}, Rules(frequency_penalty=1.2)),
    "presence": ({"presence_penalty": 1.5}, Rules(presence_penalty=1.5)),
    "logit-bias": ({"logit_bias": {17: 4.0, 300: -50.0, 88: -3.0}},
                   Rules(logit_bias={17: 4.0, 300: -50.0, 88: -3.0})),
    "allowed": ({"allowed_token_ids": [17, 88, 203, 318, 401]},
                Rules(allowed_token_ids=(17, 88, 203, 318, 401))),
    "mixed": ({"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.4,
               "logit_bias": {17: 2.0}},
              Rules(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.4,
                    logit_bias={17: 2.0})),
}


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("qwen3_moe")


@pytest.fixture(scope="module")
def reference(path):
    return load_reference(path)


def run(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def expected(reference, rules: list[Rules]) -> list[list[int]]:
    return [greedy(reference, p, MAX_TOKENS, r) for p, r in zip(PROMPTS, rules)]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_with_a_processor_equals_the_reference_loop(path, reference, case):
    fields, rules = CASES[case]
    llm = LLM(path, block_size=4, num_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **fields)
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    # prompts 0 and 2 with the processor, 1 and 3 without, in the same steps
    got = run(llm, [params, plain, params, plain])
    assert got == expected(reference, [rules, Rules(), rules, Rules()])
    unprocessed = expected(reference, [Rules()] * 4)
    assert got[0] != unprocessed[0] or got[2] != unprocessed[2], "the case must matter"


def test_processors_survive_chunked_prefill_and_preemption(path, reference):
    fields, rules = CASES["mixed"]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **fields)
    llm = LLM(path, block_size=2, num_blocks=16, max_num_batched_tokens=5)
    assert run(llm, [params] * 4) == expected(reference, [rules] * 4)
    assert llm.core.scheduler.num_preemptions > 0
    # every history left is of a sequence finished in the last step, which the next plan releases
    assert set(llm.core.worker._histories) <= set(llm.core._released)


def test_min_tokens_holds_back_eos_and_stop_ids(path, reference):
    plain = run(LLM(path), [SamplingParams(temperature=0, max_tokens=MAX_TOKENS)] * 4)
    stop = plain[2][1]  # without min_tokens, prompt 2 stops at its second token
    llm = LLM(path)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=6,
                            stop_token_ids=(stop,))
    got = run(llm, [params] * 4)
    rules = Rules(min_tokens=6, stop_ids=(EOS, stop))
    want = [greedy(reference, p, MAX_TOKENS, rules, stop_ids=(EOS, stop)) for p in PROMPTS]
    assert got == want
    assert len(got[2]) >= 6 and stop not in got[2][:6]


def test_logprobs_are_the_models_before_the_processors(path, reference):
    llm = LLM(path)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=1, logprobs=2,
                                                    logit_bias={300: -100.0, 5: 100.0}))
    entry = out[0].outputs[0].logprobs[0]
    raw = torch.log_softmax(reference(torch.tensor([PROMPTS[0]])).logits[0, -1].float(), -1)
    assert entry.token_id == 5  # sampled from the biased logits ...
    assert entry.logprob == pytest.approx(raw[5].item(), abs=1e-4)  # ... reported raw
    assert [t for t, _ in entry.top] == torch.topk(raw, 2).indices.tolist()


def test_bad_words_are_never_produced(tmp_path_factory):
    demo = ensure_demo(tmp_path_factory.mktemp("demo"))
    llm, reference = LLM(str(demo.model_dir)), load_reference(demo.model_dir)
    tok = llm.tokenizer
    prompt = tok.encode("hello world the model")
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                  ignore_eos=True))[0].outputs[0]
    first, second = plain.token_ids[2], plain.token_ids[3]
    pair = f"{tok.decode([first])} {tok.decode([second])}"  # a two-word bad word
    single = tok.decode([plain.token_ids[6]])
    assert tok.encode(pair, add_special_tokens=False) == [first, second]
    assert tok.encode(" " + single, add_special_tokens=False) == [plain.token_ids[6]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            bad_words=(pair, single))
    got = llm.generate([prompt], params)[0].outputs[0].token_ids
    words = ((first, second), (plain.token_ids[6],))
    assert got == greedy(reference, prompt, 12, Rules(bad_words=words))
    assert got != plain.token_ids and plain.token_ids[6] not in got
    assert all(got[i:i + 2] != [first, second] for i in range(len(got) - 1))
