"""Structured outputs in the engine: the grammar's bitmask reaches the sampler through the plan,
for base, 2D and 3D adapter rows in one batch, across chunked prefill and preemption, and a
recorded run with masks replays identically in a fresh worker."""

from __future__ import annotations

import json
import pickle
import re

import jsonschema
import llguidance
import llguidance.hf
import llguidance.torch
import pytest
import torch

from loramux.engine import LLM, LoRARequest, SamplingParams
from loramux.engine.errors import InvalidRequest
from loramux.engine.request import StructuredOutputs
from loramux.engine.worker.token_mask import apply_token_masks
from loramux.engine.worker.worker import Worker
from tests.chat_model import build_chat_model
from tests.engine.test_worker_replay import Recorder
from tests.tiny import load_reference

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "n": {"type": "integer", "minimum": -50, "maximum": 50},
                         "tags": {"type": "array", "items": {"enum": ["x", "yz"]},
                                  "maxItems": 3}}}
JSON = StructuredOutputs(json=json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("chat-model"))


def _llm(chat_model, **kwargs) -> LLM:
    return LLM(str(chat_model["model"]), max_loras=2, max_lora_rank=8,
               enable_mixed_moe_lora_format=True, **kwargs)


def _loras(chat_model):
    return [None, LoRARequest("a2d", 1, str(chat_model["a2d"])),
            LoRARequest("a3d", 2, str(chat_model["a3d"]))]


@pytest.mark.parametrize("vocab", [60, 70])  # masks of 2 words: 64 tokens, more and fewer
def test_apply_token_masks_matches_a_bit_by_bit_reference(vocab):
    logits = torch.randn(3, vocab)
    masks = [torch.randint(-2**31, 2**31 - 1, (2,), dtype=torch.int32), None,
             torch.randint(-2**31, 2**31 - 1, (2,), dtype=torch.int32)]
    out = logits.clone()
    apply_token_masks(out, masks)
    for row, mask in enumerate(masks):
        for token in range(vocab):
            word = token // 32
            allowed = mask is None or (word < len(mask)
                                       and (int(mask[word]) >> (token % 32)) & 1)
            expect = logits[row, token] if allowed else float("-inf")
            assert out[row, token] == expect, (row, token)


def test_json_schema_holds_for_base_2d_and_3d_rows_with_chunked_prefill_and_preemption(
        chat_model):
    llm = _llm(chat_model, block_size=2, num_blocks=80, max_num_batched_tokens=8,
               max_num_seqs=6)
    prompts = ["hello", "the weather in Paris is", "what is the answer"] * 2
    params = [SamplingParams(temperature=0, max_tokens=120, structured_outputs=JSON),
              SamplingParams(temperature=1.0, seed=11, max_tokens=120, structured_outputs=JSON)]
    outs = llm.generate(prompts, [params[i % 2] for i in range(6)], _loras(chat_model) * 2)
    assert llm.core.scheduler.num_preemptions > 0
    for out in outs:
        choice = out.outputs[0]
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), SCHEMA)


def test_greedy_structured_tokens_are_the_argmax_over_the_grammar_s_allowed_tokens(chat_model):
    """Against transformers: at each step the allowed set comes from an independent llguidance
    matcher fed the output so far; the engine's token is the reference argmax over that set."""
    llm = _llm(chat_model)
    tokenizer = llm.tokenizer
    prompt = tokenizer.encode("hello")
    spec = StructuredOutputs(regex=r"[a-z]{2,5}-[0-9]{2}")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20,
                                                structured_outputs=spec))[0].outputs[0]
    hf = load_reference(chat_model["model"])
    vocab = hf.config.vocab_size
    ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=[tokenizer.eos_token_id])
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_regex(spec.regex))
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    ids = list(prompt)
    for token in out.token_ids:
        llguidance.torch.fill_next_token_bitmask(matcher, mask)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        allowed = torch.tensor([(int(mask[0, t // 32]) >> (t % 32)) & 1 for t in range(vocab)],
                               dtype=torch.bool)
        assert token == int(torch.where(allowed, logits, float("-inf")).argmax())
        assert matcher.consume_token(token)
        ids.append(token)
    assert out.finish_reason == "stop" and matcher.is_stopped()


def test_a_grammar_with_start_after_is_free_up_to_that_token_then_holds(chat_model):
    """start_after (a reasoning model's </think>): the output equals the unconstrained one up to
    and including the token's first occurrence, and follows the grammar after it."""
    llm = _llm(chat_model)
    prompt = llm.tokenizer.encode("what is the answer")
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    cut = 3
    spec = StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}", start_after=free.token_ids[cut])
    assert spec == StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}")  # one compiled grammar
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40,
                                                structured_outputs=spec))[0].outputs[0]
    first = free.token_ids.index(spec.start_after)
    assert out.token_ids[:first + 1] == free.token_ids[:first + 1]
    answer = llm.tokenizer.decode(out.token_ids[first + 1:], skip_special_tokens=True)
    assert out.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", answer), answer


@pytest.mark.parametrize("spec, check", [
    (StructuredOutputs(choice=("red", "green", "blue")), lambda t: t in ("red", "green", "blue")),
    (StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: len(t) == 6 and t[3] == "-"),
    (StructuredOutputs(grammar='root ::= "yes" | "no" | "n" [0-9]'),
     lambda t: t in ("yes", "no") or (t[0] == "n" and t[1:].isdigit())),
    (StructuredOutputs(grammar='start: "(" NUMBER ")"\nNUMBER: /[0-9]{1,3}/'),
     lambda t: t[0] == "(" and t[-1] == ")" and t[1:-1].isdigit()),
    (StructuredOutputs(json_object=True), lambda t: isinstance(json.loads(t), dict)),
])
def test_each_kind_of_structure_is_followed(chat_model, spec, check):
    llm = _llm(chat_model)
    outs = llm.generate(["hello", "what"], [SamplingParams(temperature=0, max_tokens=200,
                                                           structured_outputs=spec),
                                            SamplingParams(temperature=1.0, seed=3,
                                                           max_tokens=200,
                                                           structured_outputs=spec)])
    for out in outs:
        assert out.outputs[0].finish_reason == "stop" and check(out.outputs[0].text), out


@pytest.mark.parametrize("spec, problem", [
    (StructuredOutputs(regex="a(b", source="guided_regex"), "guided_regex: invalid regex"),
    (StructuredOutputs(json='{"type": "objekt"}'), "invalid JSON schema"),
    (StructuredOutputs(json="{not json"), "not JSON"),
    (StructuredOutputs(grammar="root ::= missing"), "invalid grammar"),
])
def test_a_bad_structure_is_an_invalid_request_naming_the_field(chat_model, spec, problem):
    llm = _llm(chat_model)
    with pytest.raises(InvalidRequest, match=problem):
        llm.core.add_request("r", [1, 2], SamplingParams(structured_outputs=spec))
    assert not llm.core.has_work()


def test_structured_outputs_without_a_byte_level_tokenizer_are_refused(checkpoint):
    llm = LLM(checkpoint("qwen3_moe"))  # no tokenizer files
    with pytest.raises(InvalidRequest, match="not available for this model"):
        llm.core.add_request("r", [1, 2], SamplingParams(structured_outputs=JSON))


def test_a_recorded_run_with_token_masks_replays_identically(chat_model):
    llm = _llm(chat_model, block_size=2, num_blocks=24, max_num_batched_tokens=8,
               max_num_seqs=4)
    recorder = Recorder(llm.core.worker)
    params = [SamplingParams(temperature=0, max_tokens=30, logprobs=2, structured_outputs=JSON),
              SamplingParams(temperature=0.9, seed=5, max_tokens=30, logprobs=1,
                             structured_outputs=StructuredOutputs(regex=r"[a-z ]{4,20}\.")),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    llm.generate(["hello", "what is", "the"] * 2, params * 2, _loras(chat_model) * 2)
    events = pickle.loads(pickle.dumps(recorder.events))
    plans = [e[1] for e in events if e[0] == "execute"]
    assert any(row.token_mask is not None for p in plans for row in p.samples)
    assert any(row.token_mask is None for p in plans for row in p.samples)
    assert llm.core.scheduler.num_preemptions > 0
    core = llm.core
    fresh = Worker(core.config, core.model_config, core.max_model_len)
    fresh.allocate(core.pools.plan)
    for event in events:
        if event[0] == "apply":
            fresh.apply(event[1])
        else:
            assert fresh.execute(event[1]) == event[2]
