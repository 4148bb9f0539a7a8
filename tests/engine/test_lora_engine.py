"""LoRA through the whole engine: 2D and 3D adapters alone and in mixed batches, equal to
transformers + PEFT (3D) and to merged-weight references (both layouts), under slot eviction,
CPU-cache misses, runtime load/unload and in-place reload."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch

from loramux.engine import LLM, Engine, LoRARequest, SamplingParams
from loramux.engine.errors import AdapterLoadError, AdapterNotFound
from loramux.engine.config import make_config
from tests.adapters import (make_2d_adapter, make_peft_3d_adapter, merged_reference, peft_merged,
                            split_3d_to_2d)
from tests.engine.conftest import PROMPTS
from tests.tiny import load_reference

GREEDY = SamplingParams(temperature=0, max_tokens=10)


def hf_tokens(model, prompts=PROMPTS) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def setups(checkpoint, tmp_path_factory):
    """setups(arch) -> (checkpoint path, {"3d", "2d", "split"}: adapter dirs, hf model)."""
    @functools.cache
    def get(arch):
        path = checkpoint(arch)
        hf = load_reference(path)
        root = tmp_path_factory.mktemp(f"adapters-{arch}")
        a3 = make_peft_3d_adapter(hf, root / "a3d", r=4, alpha=8, seed=1)
        a2 = make_2d_adapter(hf, root / "a2d", r=4, alpha=8, seed=2)
        split = split_3d_to_2d(a3, root / "split", mixtral_names=arch == "mixtral")
        return (path, {"3d": str(a3), "2d": str(a2), "split": str(split)}, hf)

    return get


def lora(name: str, path: str, i: int = 1) -> LoRARequest:
    return LoRARequest(name, i, path)


def tokens(llm: LLM, lora_request=None, prompts=PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request)]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"])
def test_adapters_equal_peft_and_merged_references(setups, arch):
    path, adapters, hf = setups(arch)
    llm = LLM(path, max_loras=2, max_lora_rank=8, enable_mixed_moe_lora_format=True)
    got_3d = tokens(llm, lora("a3d", adapters["3d"]))
    assert got_3d == hf_tokens(peft_merged(hf, adapters["3d"]))
    assert got_3d == hf_tokens(merged_reference(hf, adapters["3d"]))
    got_2d = tokens(llm, lora("a2d", adapters["2d"], 2))
    assert got_2d == hf_tokens(merged_reference(hf, adapters["2d"]))
    assert got_2d != got_3d != tokens(llm)  # the adapters really change the output


def test_3d_and_its_split_2d_give_identical_tokens(setups):
    path, adapters, _ = setups("qwen3_moe")
    llm = LLM(path, max_loras=2, max_lora_rank=8, enable_mixed_moe_lora_format=True)
    assert tokens(llm, lora("a3d", adapters["3d"])) == tokens(llm, lora("s", adapters["split"], 2))


@pytest.mark.parametrize("max_loras,max_cpu_loras", [(3, None), (1, 1), (2, 2)],
                         ids=["fits", "evict-and-reread", "evict"])
def test_mixed_batches_equal_each_alone(setups, max_loras, max_cpu_loras):
    path, adapters, _ = setups("qwen3_moe")
    kwargs = dict(max_loras=max_loras, max_lora_rank=8, enable_mixed_moe_lora_format=True,
                  max_cpu_loras=max_cpu_loras)
    llm = LLM(path, **kwargs)
    reqs = {"base": None, "a2d": lora("a2d", adapters["2d"], 1),
            "a3d": lora("a3d", adapters["3d"], 2), "split": lora("split", adapters["split"], 3)}
    alone = {name: tokens(llm, req) for name, req in reqs.items()}
    mixed = LLM(path, **kwargs)
    order = [(name, i) for i in range(len(PROMPTS)) for name in reqs]
    for ordering in (order, order[::-1]):
        prompts = [PROMPTS[i] for _, i in ordering]
        outs = mixed.generate(prompts, GREEDY, [reqs[name] for name, _ in ordering])
        for (name, i), out in zip(ordering, outs):
            assert out.outputs[0].token_ids == alone[name][i], (name, i)
    manager = mixed.core.lora
    if max_loras < 3:
        assert manager.evictions_total > 0
    if max_cpu_loras == 1:
        assert manager.disk_reads_total > 0
    assert manager.slots.num_used <= max_loras


def test_layout_flag_is_checked_and_mixed_format_is_opt_in(setups):
    path, adapters, _ = setups("qwen3_moe")
    llm = LLM(path, max_loras=2, max_lora_rank=8)  # base is 2D-native, mixed format off
    with pytest.raises(AdapterLoadError, match="enable-mixed-moe-lora-format"):
        tokens(llm, lora("a3d", adapters["3d"]))
    with pytest.raises(AdapterLoadError, match="is_3d_lora_weight"):
        tokens(llm, LoRARequest("x", 3, adapters["2d"], is_3d_lora_weight=True))
    assert tokens(llm, lora("a2d", adapters["2d"], 2)) != tokens(llm)  # the engine goes on


def test_rank_above_max_lora_rank_is_refused(setups):
    path, adapters, _ = setups("qwen3_moe")
    llm = LLM(path, max_loras=1, max_lora_rank=2, enable_mixed_moe_lora_format=True)
    with pytest.raises(AdapterLoadError, match="max-lora-rank"):
        tokens(llm, lora("a2d", adapters["2d"]))
    assert tokens(llm) == tokens(LLM(path))


@pytest.fixture(scope="module")
def served(setups):
    path, adapters, _ = setups("qwen3_moe")
    engine = Engine(make_config(path, max_loras=2, max_lora_rank=8,
                                enable_mixed_moe_lora_format=True))
    engine.start()
    yield engine, adapters, path
    engine.shutdown()


async def stream(engine, prompt, lora_name=None, max_tokens=10):
    last = None
    async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                            ignore_eos=True), lora_name):
        last = out
    return last.outputs[0].token_ids


def test_load_and_unload_while_streams_run(served):
    engine, adapters, path = served
    expected = {"a2d": tokens(LLM(path, max_loras=1, max_lora_rank=8,
                                  enable_mixed_moe_lora_format=True),
                              lora("a2d", adapters["2d"]), [PROMPTS[0]])[0]}

    async def main():
        await engine.add_lora(lora("a2d", adapters["2d"]))
        running = [asyncio.create_task(stream(engine, PROMPTS[0], "a2d")) for _ in range(3)]
        await asyncio.sleep(0)
        await engine.add_lora(lora("a3d", adapters["3d"], 2))
        await engine.remove_lora("a2d")  # requests in flight finish on the old weights
        with pytest.raises(AdapterNotFound):
            await stream(engine, PROMPTS[0], "a2d")
        with pytest.raises(AdapterLoadError):
            await engine.add_lora(lora("broken", path))  # a base checkpoint is no adapter
        outs = await asyncio.gather(*running)
        await engine.remove_lora("a3d")
        return outs

    outs = asyncio.run(main())
    assert all(o[: len(expected["a2d"])] == expected["a2d"] for o in outs)
    assert engine.list_loras() == []
    assert engine.is_alive


def test_inplace_reload_serves_new_requests_only(served):
    engine, adapters, path = served
    ref = LLM(path, max_loras=2, max_lora_rank=8, enable_mixed_moe_lora_format=True)
    old = tokens(ref, lora("x", adapters["2d"]), [PROMPTS[2]])[0]
    new = tokens(ref, lora("y", adapters["3d"], 2), [PROMPTS[2]])[0]

    async def main():
        await engine.add_lora(lora("t", adapters["2d"]))
        first = asyncio.create_task(stream(engine, PROMPTS[2], "t"))
        while engine.stats().num_running == 0:
            await asyncio.sleep(0.001)
        await engine.add_lora(LoRARequest("t", 1, adapters["3d"], load_inplace=True))
        second = await stream(engine, PROMPTS[2], "t")
        await engine.remove_lora("t")
        return await first, second

    before, after = asyncio.run(main())
    assert before[: len(old)] == old and after[: len(new)] == new


def test_unload_then_load_under_the_same_name_serves_the_new_weights(served):
    """The engine is idle between the steps: no step runs between the unload and the load."""
    engine, adapters, path = served
    ref = LLM(path, max_loras=2, max_lora_rank=8, enable_mixed_moe_lora_format=True)
    expected = {kind: tokens(ref, lora(kind, adapters[kind]), [PROMPTS[1]])[0]
                for kind in ("2d", "3d")}
    assert expected["2d"] != expected["3d"]

    async def main():
        got, ids = [], set()
        for kind in ("2d", "3d", "2d"):
            await engine.add_lora(lora("x", adapters[kind]))
            ids |= {r.lora_int_id for r in engine.list_loras()}
            got.append((kind, await stream(engine, PROMPTS[1], "x")))
            await engine.remove_lora("x")
        return got, ids

    got, ids = asyncio.run(main())
    assert all(out[: len(expected[kind])] == expected[kind] for kind, out in got), got
    assert len(ids) == 3 and engine.list_loras() == [] and engine.is_alive


def test_a_waiting_request_of_an_unloaded_adapter_keeps_its_read(setups):
    """A request whose adapter is unloaded while it waits for a slot still runs with the weights
    it was admitted for, reading them from disk once: with the only slot pinned by a long
    request, the finished read must wait for the slot instead of being dropped and read again
    each step (which starved such requests under load/unload churn)."""
    path, adapters, _ = setups("qwen3_moe")
    kwargs = dict(max_loras=1, max_cpu_loras=1, max_lora_rank=8,
                  enable_mixed_moe_lora_format=True)
    want = tokens(LLM(path, **kwargs), lora("x", adapters["2d"]), [PROMPTS[1]])[0]
    core = LLM(path, **kwargs).core
    core.resolve_lora(lora("y", adapters["3d"]))
    core.resolve_lora(lora("x", adapters["2d"]))  # the CPU cache holds one: y is on disk only
    core.add_request("long", PROMPTS[0], SamplingParams(temperature=0, max_tokens=40,
                                                        ignore_eos=True), "y")
    while not any(s.adapter_slot >= 0 for s in core.scheduler.running):
        core.step()  # y read back from disk and pinned in the only slot
    core.step()  # y in the CPU cache now, x out of it
    core.add_request("x", PROMPTS[1], GREEDY, "x")
    core.lora.unregister("x")
    reads = core.lora.disk_reads_total
    done = {}
    while core.has_work():
        done.update({o.request_id: o for o in core.step() if o.finished})
    assert done["x"].error is None and done["x"].outputs[0].token_ids == want
    assert core.lora.disk_reads_total == reads + 1
