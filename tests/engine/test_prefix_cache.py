"""Automatic prefix caching: the block pool's counts and LRU eviction, the scheduler's use of
cached prefixes, and whole runs on a tiny model (fp32, CPU) whose greedy outputs with caching
equal those without, equal transformers / PEFT, never cross an adapter identity (base, 2D, 3D,
a reloaded registration), and stay right under eviction, preemption and aborts."""

from __future__ import annotations

import logging

import pytest
import torch

from loramux.engine import LLM, LoRARequest, SamplingParams
from loramux.engine.config import SchedulerConfig
from loramux.engine.core import EngineCore
from loramux.engine.llm import make_config
from loramux.engine.memory import BlockAllocator, MemoryPlan, MemoryPools
from loramux.engine.scheduler import Scheduler
from tests.adapters import make_2d_adapter, make_peft_3d_adapter, merged_reference, peft_merged
from tests.engine.test_scheduler import FakeLora, seq
from tests.poison import run
from tests.tiny import load_reference

PREFIX = [50 + (7 * i) % 400 for i in range(40)]  # 10 blocks of 4
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=6, ignore_eos=True)
KW = dict(block_size=4, max_num_batched_tokens=16, max_num_seqs=8, max_loras=2,
          max_lora_rank=8, enable_mixed_moe_lora_format=True)


def prompts(count: int, suffix_len: int = 3, prefix=PREFIX) -> list[list[int]]:
    return [prefix + [300 + 10 * i + j for j in range(suffix_len)] for i in range(count)]


def hits(llm: LLM) -> tuple[int, int]:
    stats = llm.core.stats()
    return stats.prefix_cache_queries_total, stats.prefix_cache_hits_total


def token_ids(outs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outs]


def fed_tokens(core: EngineCore) -> list[int]:
    """Counts, appended to as the worker runs: tokens fed to the model per step."""
    fed: list[int] = []
    execute = core.worker.execute

    def counting(plan):
        fed.append(len(plan.token_ids))
        return execute(plan)
    core.worker.execute = counting
    return fed


@pytest.fixture(scope="module")
def setup(checkpoint, tmp_path_factory):
    path = checkpoint("qwen3_moe")
    hf = load_reference(path)
    root = tmp_path_factory.mktemp("prefix-adapters")
    a2d = LoRARequest("a2d", 1, str(make_2d_adapter(hf, root / "a2d", r=4, alpha=8, seed=2)))
    a3d = LoRARequest("a3d", 2, str(make_peft_3d_adapter(hf, root / "a3d", r=4, alpha=8,
                                                         seed=1)))
    return path, hf, {"base": None, "a2d": a2d, "a3d": a3d}


# --- the block pool ------------------------------------------------------------------------
def test_shared_blocks_are_counted_and_stay_cached_when_freed():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    first: list[int] = []
    alloc.grow(first, 8)
    alloc.set_key(first[0], "k0")
    alloc.set_key(first[1], "k1")
    second: list[int] = []
    assert alloc.can_share(first, 12) and not alloc.can_share(first, 17)
    alloc.share(second, first)
    alloc.grow(second, 12)
    shared = list(first)
    assert second[:2] == shared and alloc.num_free == 1
    alloc.free(first)
    assert alloc.num_free == 1  # still held by second
    alloc.free(second)
    assert alloc.num_free == 4 and alloc.usage == 0.0
    assert [alloc.lookup("k0"), alloc.lookup("k1")] == shared
    third: list[int] = []
    alloc.share(third, shared[:1])  # a free cached block is taken back
    assert alloc.num_free == 3
    alloc.grow(third, 16)  # the other cached one is evicted last
    assert alloc.lookup("k1") is None and alloc.num_free == 0


def test_free_cached_blocks_are_evicted_last_and_tail_first():
    alloc = BlockAllocator(num_blocks=4, block_size=1)
    table: list[int] = []
    alloc.grow(table, 3)
    for i, block in enumerate(table):
        alloc.set_key(block, f"k{i}")
    head = list(table)
    alloc.free(table)
    fresh: list[int] = []
    alloc.grow(fresh, 1)  # the unkeyed block goes first: nothing is evicted
    assert fresh == [3] and all(alloc.lookup(f"k{i}") == head[i] for i in range(3))
    alloc.grow(fresh, 2)  # then the tail of the freed prefix
    assert alloc.lookup("k2") is None and alloc.lookup("k0") == head[0]
    alloc.grow(fresh, 4)
    assert alloc.lookup("k0") is None and alloc.lookup("k1") is None and alloc.num_free == 0
    with pytest.raises(RuntimeError, match="exhausted"):
        alloc.grow(fresh, 5)


# --- the scheduler -------------------------------------------------------------------------
def caching_scheduler(num_blocks: int = 64) -> Scheduler:
    memory = MemoryPools(MemoryPlan(4, num_blocks, {}, 2, prefix_caching=True))
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), memory,
                     FakeLora(memory.adapters))


def test_a_sequence_admitted_later_in_the_same_step_shares_the_blocks_being_computed():
    sched = caching_scheduler()
    first, second = seq(0, prompt_len=10), seq(1, prompt_len=10)
    sched.add(first)
    sched.add(second)
    batch, _ = sched.schedule()
    assert [(i.seq, i.num_tokens) for i in batch.items] == [(first, 10), (second, 2)]
    assert second.block_table[:2] == first.block_table[:2] and second.num_computed == 8
    assert sched.pools.blocks.num_free == 64 - 4
    prefix = sched.pools.prefix
    assert (prefix.queries, prefix.hits) == (20, 8)


def test_a_fully_cached_prompt_still_computes_its_last_token_and_identities_never_mix():
    sched = caching_scheduler()
    sched.add(seq(0, prompt_len=8))
    sched.schedule()
    again, other = seq(1, prompt_len=8), seq(2, prompt_len=8, adapter="x")
    sched.add(again)
    sched.add(other)
    batch, _ = sched.schedule()
    fed = {i.seq: i.num_tokens for i in batch.items}
    assert fed[again] == 4 and again.num_computed == 4  # block 1 is recomputed, not shared
    assert fed[other] == 8 and other.num_computed == 0  # another identity: no hit


def test_a_preempted_sequence_finds_its_own_blocks_again_uncounted():
    sched = caching_scheduler(num_blocks=5)
    first, second = seq(0, prompt_len=8), seq(1, prompt_len=8, adapter="y")
    sched.add(first)
    sched.add(second)
    sched.schedule()
    for s in (first, second):
        s.num_computed, s.output = 8, [7, 7, 7]
    batch, _ = sched.schedule()  # first grows by a block: second is preempted
    assert [i.seq for i in batch.items] == [first] and second.preempted
    sched.finish(first)
    batch, _ = sched.schedule()
    assert [(i.seq, i.num_tokens) for i in batch.items] == [(second, 3)]
    assert second.num_computed == 8 and sched.pools.prefix.queries == 16


# --- whole runs ----------------------------------------------------------------------------
def workload(adapters: dict) -> tuple[list, list, list]:
    """Prompts sharing PREFIX (and parts of it) under base, 2D and 3D, greedy and seeded."""
    batch = prompts(3) + [PREFIX, PREFIX[:37], PREFIX[:12] + [9, 9, 9, 9, 9]]
    items = [(p, lora, params) for lora in adapters.values() for p in batch
             for params in (GREEDY, SEEDED)]
    return [i[0] for i in items], [i[2] for i in items], [i[1] for i in items]


def test_outputs_with_caching_equal_outputs_without(setup):
    path, _, adapters = setup
    on, off = LLM(path, **KW), LLM(path, enable_prefix_caching=False, **KW)
    assert on.core.pools.prefix is not None and off.core.pools.prefix is None
    ps, params, loras = workload(adapters)
    for _ in range(2):  # the second round starts from a warm cache
        assert token_ids(on.generate(ps, params, loras)) == token_ids(
            off.generate(ps, params, loras))
    queries, found = hits(on)
    assert queries == 2 * sum(map(len, ps)) and found > queries // 2
    assert hits(off) == (0, 0)
    assert on.core.pools.blocks.num_free == on.core.pools.blocks.num_blocks


def reference(hf, adapter: LoRARequest | None, prompt: list[int]) -> list[int]:
    model = hf if adapter is None else (peft_merged(hf, adapter.lora_path)
                                        if adapter.lora_name == "a3d"
                                        else merged_reference(hf, adapter.lora_path))
    out = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens,
                         do_sample=False)
    return out[0, len(prompt):].tolist()


def test_one_prefix_under_base_2d_and_3d_gives_each_its_own_continuation(setup):
    path, hf, adapters = setup
    llm = LLM(path, **KW)
    first, second = prompts(2)
    got: dict[str, list[list[int]]] = {}
    for name, adapter in adapters.items():  # the prefix is cached under another identity
        before = hits(llm)
        got[name] = token_ids(llm.generate([first], GREEDY, adapter))
        assert hits(llm)[1] == before[1], name
    for name, adapter in adapters.items():  # now under its own
        before = hits(llm)
        got[name] += token_ids(llm.generate([second], GREEDY, adapter))
        assert hits(llm)[1] - before[1] == len(PREFIX), name
    for name, adapter in adapters.items():
        assert got[name] == [reference(hf, adapter, p) for p in (first, second)], name
    assert len({tuple(map(tuple, g)) for g in got.values()}) == 3


def test_an_inplace_reload_never_serves_blocks_of_the_old_weights(setup):
    path, hf, adapters = setup
    llm = LLM(path, **KW)
    old, new = adapters["a2d"], adapters["a3d"]
    prompt = prompts(1)
    llm.generate(prompt, GREEDY, LoRARequest("t", 0, old.lora_path))
    before = hits(llm)
    assert token_ids(llm.generate(prompt, GREEDY, "t")) == [reference(hf, old, prompt[0])]
    assert hits(llm)[1] > before[1]  # the same registration hits
    reload = LoRARequest("t", 0, new.lora_path, load_inplace=True)
    llm.core.lora.register(reload, llm.core.lora.read(reload))
    before = hits(llm)
    assert token_ids(llm.generate(prompt, GREEDY, "t")) == [reference(hf, new, prompt[0])]
    assert hits(llm)[1] == before[1]


def test_a_shared_prefix_is_computed_once(setup):
    """The issue's 64 requests x (2048 shared + 128 distinct tokens), at 16 x (64 + 8)."""
    path, _, _ = setup
    count, prefix = 16, [60 + i for i in range(64)]
    batch = prompts(count, suffix_len=8, prefix=prefix)
    one_token = SamplingParams(temperature=0, max_tokens=1)
    results, fed = {}, {}
    for caching in (True, False):
        llm = LLM(path, block_size=4, max_num_batched_tokens=64, max_num_seqs=count,
                  enable_prefix_caching=caching)
        fed[caching] = fed_tokens(llm.core)
        results[caching] = token_ids(llm.generate(batch, one_token))
        if caching:
            assert hits(llm) == (count * 72, (count - 1) * 64)
    assert results[True] == results[False]
    assert sum(fed[True]) == 64 + count * 8 and sum(fed[False]) == count * 72


def test_prompt_logprobs_are_scored_from_computed_positions_only(setup):
    """A request for prompt logprobs takes no cached blocks before its unscored positions (a
    recompute after preemption may take the ones it has scored); its plain siblings may."""
    path, _, _ = setup
    batch = prompts(2)
    scoring = SamplingParams(n=2, temperature=0, max_tokens=3, prompt_logprobs=2)
    off = LLM(path, enable_prefix_caching=False, **KW).generate(batch[:1], scoring)[0]
    for num_blocks in (None, 13):  # roomy, and so tight that the two samples preempt
        llm = LLM(path, **dict(KW, num_blocks=num_blocks))
        llm.generate(batch, GREEDY)  # the prompt is cached before the scoring request
        before = hits(llm)
        out = llm.generate(batch[:1], scoring)[0]
        assert [(e.token_id, e.rank) for e in out.prompt_logprobs[1:]] == [
            (e.token_id, e.rank) for e in off.prompt_logprobs[1:]]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(
            out.prompt_logprobs[1:], off.prompt_logprobs[1:])) < 1e-5
        assert token_ids([out]) == token_ids([off])
        if num_blocks is None:
            assert hits(llm)[1] - before[1] == len(PREFIX)  # the second sample's hits only
        else:
            assert llm.core.scheduler.num_preemptions > 0


def test_eviction_and_preemption_under_a_tiny_pool_keep_outputs_right(setup):
    path, _, adapters = setup
    ps, params, loras = workload(adapters)
    ps, params, loras = ps[::2], params[::2], loras[::2]  # greedy only: 18 requests
    tight = dict(KW, num_blocks=24, max_num_seqs=4)
    roomy = LLM(path, **KW)
    llms = {"tight": LLM(path, **tight), "off": LLM(path, enable_prefix_caching=False, **tight)}
    want = token_ids(roomy.generate(ps, params, loras)) * 2
    for llm in llms.values():
        assert token_ids(llm.generate(ps, params, loras) + llm.generate(ps, params, loras)) \
            == want
    core = llms["tight"].core
    assert core.scheduler.num_preemptions > 0
    roomy.generate(ps, params, loras)
    assert 0 < hits(llms["tight"])[1] < hits(roomy)[1]  # evictions cost hits, never answers
    assert core.pools.blocks.num_free == core.pools.blocks.num_blocks


def test_aborts_mid_prefill_release_shared_blocks(setup):
    path, _, adapters = setup
    core = EngineCore(make_config(path, **KW))
    batch = prompts(6)
    want = token_ids(LLM(path, enable_prefix_caching=False, **KW).generate(batch, GREEDY))
    for i, prompt in enumerate(batch):
        core.add_request(f"r{i}", prompt, GREEDY)
    for _ in range(3):
        core.step()
    for i in (0, 2, 5):  # the first one computed the prefix the others share
        core.abort(f"r{i}")
    done = run(core, [(f"again{i}", p, None, GREEDY) for i, p in enumerate(batch)])
    assert [done[f"again{i}"].outputs[0].token_ids for i in range(6)] == want
    assert [done[f"r{i}"].outputs[0].token_ids for i in (1, 3, 4)] == [want[1], want[3], want[4]]
    assert core.pools.blocks.num_free == core.pools.blocks.num_blocks


def test_hybrid_models_keep_prefix_caching_off_and_say_so(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="loramux.engine.memory.plan"):
        llm = LLM(checkpoint("qwen3_5_moe_text"), block_size=4)
    assert llm.core.pools.prefix is None and not llm.core.stats().prefix_caching
    lines = [r.getMessage() for r in caplog.records if "prefix caching is off" in r.getMessage()]
    assert len(lines) == 1 and "gated_deltanet" in lines[0]
