"""The StepPlans and AdapterOps of a run are all a worker needs: replayed into a fresh worker
built from the same checkpoint, they give the same tokens and logprobs.

The recorded run mixes base, 2D and 3D adapter requests over two adapter slots (three adapters:
evictions), greedy and seeded sampled requests with logprobs, prompt logprobs and penalties,
prefill chunked by a small token budget, and a KV cache small enough to force preemption. The
record goes through pickle, so nothing in it is a live engine object.
"""

from __future__ import annotations

import pickle

import pytest

from loramux.engine import LLM, LoRARequest, SamplingParams
from loramux.engine.plan import WriteAdapter
from loramux.engine.worker.worker import Worker
from tests.adapters import make_2d_adapter, make_peft_3d_adapter
from tests.engine.conftest import PROMPTS
from tests.tiny import load_reference


class Recorder:
    """Wraps a worker's apply and execute, keeping what went in and what came out."""

    def __init__(self, worker: Worker) -> None:
        self.events: list[tuple] = []
        self._apply, self._execute = worker.apply, worker.execute
        worker.apply, worker.execute = self.apply, self.execute

    def apply(self, ops):
        self.events.append(("apply", ops))
        self._apply(ops)

    def execute(self, plan):
        result = self._execute(plan)
        self.events.append(("execute", plan, result))
        return result


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory):
    hf = load_reference(checkpoint("qwen3_moe"))
    root = tmp_path_factory.mktemp("replay-adapters")
    return [LoRARequest("a2d", 1, str(make_2d_adapter(hf, root / "a2d", r=4, alpha=8, seed=2))),
            LoRARequest("a3d", 2, str(make_peft_3d_adapter(hf, root / "a3d", r=4, alpha=8,
                                                           seed=1))),
            LoRARequest("b2d", 3, str(make_2d_adapter(hf, root / "b2d", r=8, alpha=16, seed=3)))]


def recorded_run(path: str, adapters) -> tuple[LLM, list[tuple]]:
    llm = LLM(path, block_size=2, num_blocks=24, max_num_batched_tokens=12, max_num_seqs=4,
              max_loras=2, max_lora_rank=8, enable_mixed_moe_lora_format=True)
    recorder = Recorder(llm.core.worker)
    prompts = PROMPTS * 2
    loras = [None, adapters[0], adapters[1], adapters[2]] * 2
    params = [SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, logprobs=1,
                             ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=2, ignore_eos=True,
                             repetition_penalty=1.3, frequency_penalty=0.5)]
    llm.generate(prompts, [params[(i + i // 4) % 4] for i in range(len(prompts))], loras)
    return llm, pickle.loads(pickle.dumps(recorder.events))


def test_replayed_plans_give_the_same_tokens_and_logprobs(checkpoint, adapters):
    path = checkpoint("qwen3_moe")
    llm, events = recorded_run(path, adapters)
    core = llm.core
    plans = [event[1] for event in events if event[0] == "execute"]
    writes = [op for event in events if event[0] == "apply" for op in event[1]
              if isinstance(op, WriteAdapter)]
    # the run covers what it claims to
    assert core.scheduler.num_preemptions > 0 and core.lora.evictions_total > 0
    assert any(q > 1 and c > q for p in plans for q, c in zip(p.query_lens, p.context_lens))
    assert {any("gate_up_proj" in name for name in op.weights) for op in writes} == {True, False}
    assert any(row.seed is not None for p in plans for row in p.samples)
    assert any(p.prompt_logprobs for p in plans)
    assert any(row.processors is not None for p in plans for row in p.samples)

    fresh = Worker(core.config, core.model_config, core.max_model_len)
    fresh.allocate(core.pools.plan)
    for event in events:
        if event[0] == "apply":
            fresh.apply(event[1])
            continue
        _, plan, result = event
        replayed = fresh.execute(plan)
        assert replayed == result
