"""A per-sequence state kind other than KV: declared by a layer, sized by the memory plan,
admitted, freed and preempted by the scheduler, and read from its slot by the layer.

FakeRecurrence is a tiny recurrent mixer with an fp32 running state beside a bf16 window of the
last two inputs (the dtypes of a Gated DeltaNet's recurrent and conv states). Added to one layer
of the tiny Qwen3-MoE model, its state must carry over prefill chunks and restart after
preemption, so chunked or preempted runs give the tokens of an unconstrained run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramux.engine import LLM, SamplingParams
from loramux.engine.worker import worker as worker_module
from loramux.engine.config import CacheConfig, SchedulerConfig
from loramux.engine.memory import MemoryPlan, MemoryPools, PagedKV, StateSpec, StateTensor, plan_memory
from loramux.engine.scheduler import Scheduler
from loramux.engine.sequence import SeqStatus
from loramux.engine.worker.memory import allocate_memory
from tests.engine.conftest import PROMPTS
from tests.engine.test_scheduler import seq

KIND = "fake_recurrent"


class FakeRecurrence(nn.Module):
    """out_t = s_t + w_t.sum(0), with s_t = s_{t-1} / 2 + x_t (fp32) and w_t the last two
    inputs rounded to bf16. x [T, H] -> [T, H]."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.seen_slots: set[int] = set()

    def memory_spec(self) -> StateSpec:
        return StateSpec(KIND, (StateTensor("recurrent", (self.hidden,), torch.float32),
                                StateTensor("window", (2, self.hidden), torch.bfloat16)))

    def bind_memory(self, tensors: dict[str, torch.Tensor]) -> None:
        self.recurrent, self.window = tensors["recurrent"], tensors["window"]

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        meta = ctx.states[KIND]
        out = torch.empty_like(x)
        start = 0
        for i, q_len in enumerate(ctx.attn.query_lens_host):
            slot = meta.slots_host[i]
            self.seen_slots.add(slot)
            fresh = meta.fresh_host[i]
            zeros = x.new_zeros(3, self.hidden, dtype=torch.float32)
            s = zeros[0] if fresh else self.recurrent[slot].clone()
            w = zeros[1:] if fresh else self.window[slot].float()
            for t in range(start, start + q_len):
                s = s / 2 + x[t].float()
                w = torch.stack([w[1], x[t].to(torch.bfloat16).float()])
                out[t] = (s + w.sum(0)).to(x.dtype)
            self.recurrent[slot], self.window[slot] = s, w.to(torch.bfloat16)
            start += q_len
        return out


def add_recurrence(attn: nn.Module, hidden: int) -> FakeRecurrence:
    """Make `attn` return its output plus half a FakeRecurrence's of the same input."""
    attn.recurrence = FakeRecurrence(hidden)  # a submodule: the model finds its memory_spec
    attend = attn.forward
    attn.forward = lambda x, ctx: attend(x, ctx) + 0.5 * attn.recurrence(x, ctx)
    return attn.recurrence


def pools(num_blocks: int, num_state_slots: int) -> MemoryPools:
    return MemoryPools(MemoryPlan(4, num_blocks, {KIND: num_state_slots}))


def test_admission_waits_for_a_state_slot_and_finish_frees_it():
    memory = pools(64, num_state_slots=2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), memory)
    a, b, c = seq(0), seq(1), seq(2)
    for s in (a, b, c):
        sched.add(s)
    batch, _ = sched.schedule()
    # KV blocks and max_num_seqs allow all three; the state pool holds two.
    assert [item.seq for item in batch.items] == [a, b]
    assert {a.state_slots[KIND], b.state_slots[KIND]} == {0, 1}
    assert c.status is SeqStatus.WAITING and memory.states[KIND].num_free == 0
    freed = a.state_slots[KIND]
    sched.finish(a)
    assert a.state_slots == {} and memory.states[KIND].num_free == 1
    sched.schedule()
    assert c.status is SeqStatus.RUNNING and c.state_slots[KIND] == freed


def test_preemption_frees_the_state_slot():
    memory = pools(3, num_state_slots=2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), memory)
    first, second = seq(0), seq(1)
    sched.add(first)
    sched.add(second)
    sched.schedule()
    for s in (first, second):  # both finish their prompt and grow by 4 tokens: 4 blocks
        s.num_computed = 4
        s.output += [7, 7, 7, 7]
    sched.schedule()
    assert second.status is SeqStatus.WAITING and second.state_slots == {}
    assert memory.states[KIND].num_free == 1 and sched.num_preemptions == 1
    sched.finish(first)
    sched.finish(second)
    assert memory.states[KIND].num_free == 2 and memory.blocks.num_free == 3


def test_plan_sizes_state_pools_from_the_budget_and_allocates_their_dtypes():
    kv = PagedKV(num_kv_heads=2, head_dim=8, dtype=torch.float32)  # 128 B a token
    recurrent = FakeRecurrence(hidden=256)  # 1024 B fp32 + 1024 B bf16 a slot
    specs = [kv, recurrent.memory_spec(), kv, recurrent.memory_spec()]
    cache = CacheConfig(block_size=4)
    roomy = plan_memory(specs, cache, budget=2**20, max_model_len=64, max_num_seqs=8)
    assert roomy.state_slots == {KIND: 8} and roomy.num_blocks == 16 * 8
    # 16 blocks of 1 KiB hold one full sequence; 10 KiB left: two slots of 4 KiB
    tight = plan_memory(specs, cache, budget=26 * 2**10, max_model_len=64, max_num_seqs=8)
    assert tight.state_slots == {KIND: 2} and tight.num_blocks == 18
    allocate_memory([recurrent], tight, torch.device("cpu"))
    assert recurrent.recurrent.shape == (3, 256) and recurrent.recurrent.dtype == torch.float32
    assert recurrent.window.shape == (3, 2, 256) and recurrent.window.dtype == torch.bfloat16


def inject_recurrence(monkeypatch) -> list[FakeRecurrence]:
    """Engines built from now on get a FakeRecurrence beside layer 1's attention."""
    built = []

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append(add_recurrence(model.model.layers[1].self_attn, model.config.hidden_size))
        return model

    real_build = worker_module.build_model
    monkeypatch.setattr(worker_module, "build_model", build)
    return built


@pytest.fixture
def recurrent_model(monkeypatch):
    return inject_recurrence(monkeypatch)


def greedy(path, **kwargs) -> tuple[list[list[int]], LLM]:
    # eager: the fake layer loops over host metadata, which a CUDA graph would freeze
    llm = LLM(path, block_size=2, enforce_eager=True, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    return [out.outputs[0].token_ids for out in outs], llm


def test_recurrent_state_survives_chunks_and_restarts_after_preemption(checkpoint,
                                                                       recurrent_model):
    path = checkpoint("qwen3_moe")
    plain, llm = greedy(path, num_blocks=64)
    assert llm.core.pools.plan.state_slots == {KIND: llm.core.config.scheduler.max_num_seqs}
    chunked, _ = greedy(path, num_blocks=64, max_num_batched_tokens=5)
    preempted, llm = greedy(path, num_blocks=16)  # 32 token slots for four sequences of <= 23
    assert llm.core.scheduler.num_preemptions > 0
    assert chunked == plain and preempted == plain
    pool = llm.core.pools.states[KIND]
    assert pool.num_free == pool.size
    assert all(fake.seen_slots for fake in recurrent_model)
    one_slot, _ = greedy(path, num_blocks=64, max_num_seqs=1)
    assert one_slot == plain  # one state slot, reused by every sequence in turn


def test_the_fake_recurrence_changes_the_tokens(checkpoint):
    """Guards the test above: without the recurrence the tokens differ."""
    path = checkpoint("qwen3_moe")
    with pytest.MonkeyPatch.context() as mp:
        inject_recurrence(mp)
        with_state, _ = greedy(path, num_blocks=64)
    assert greedy(path, num_blocks=64)[0] != with_state
