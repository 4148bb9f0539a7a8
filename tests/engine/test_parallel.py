"""Tensor and expert parallelism on CPU (gloo, fp32): -tp 2 and -tp 2 --enable-expert-parallel
give the greedy tokens of one rank for a mixed batch of base, 2D-adapter and 3D-adapter
requests (chunked prefill, one adapter slot, so slots are rewritten while sequences run), on
Qwen3-MoE and on the hybrid Qwen3.5-MoE (Gated DeltaNet heads sharded too); each rank holds
only its shard and the all_reduces ran; sizes that do not divide are refused before any rank
starts; a rank that dies stops the engine with an error."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch.multiprocessing as mp

from loramux.engine import LLM, LoRARequest, SamplingParams
from loramux.engine.config import ModelConfig
from loramux.engine.errors import EngineStopped
from loramux.engine.model.parallel import Shard, check_shardable
from tests.adapters import ATTENTION, GDN, MLP, make_2d_adapter, make_peft_3d_adapter
from tests.engine.conftest import PROMPTS
from tests.tiny import load_reference, save_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=6)
KW = dict(max_loras=1, max_lora_rank=8, enable_mixed_moe_lora_format=True, block_size=4,
          max_num_batched_tokens=6)
MODES = {"tp2": dict(tensor_parallel_size=2),
         "ep2": dict(tensor_parallel_size=2, enable_expert_parallel=True)}
L0 = "model.layers.0."
# per rank, of the tiny Qwen3-MoE (H 64, 4 heads, 2 KV heads of 16, 8 experts, I 24, R 8)
QWEN3_SHARDS = {
    L0 + "self_attn.qkv_proj.weight": (32 + 16 + 16, 64),  # 2 query heads, 1 KV head
    L0 + "self_attn.o_proj.weight": (64, 32),
    L0 + "self_attn.qkv_proj.a_slots": (1, 3 * 8, 64),  # A replicated
    L0 + "self_attn.qkv_proj.b_slots": (1, 64, 8),  # B rows of the rank's heads
    L0 + "self_attn.o_proj.a_slots": (1, 8, 32),  # A columns of the rank's heads
    L0 + "self_attn.o_proj.b_slots": (1, 64, 8),
}
EXPERT_SHARDS = {
    "tp2": {"w_gate_up": (8, 24, 64), "w_down": (8, 64, 12), "a_gate_up": (1, 8, 16, 64),
            "b_gate_up": (1, 8, 24, 8), "a_down": (1, 8, 8, 12), "b_down": (1, 8, 64, 8)},
    "ep2": {"w_gate_up": (4, 48, 64), "w_down": (4, 64, 24), "a_gate_up": (1, 4, 16, 64),
            "b_gate_up": (1, 4, 48, 8), "a_down": (1, 4, 8, 24), "b_down": (1, 4, 64, 8)},
}


@pytest.fixture(scope="module")
def setups(checkpoint, tmp_path_factory):
    @functools.cache
    def get(arch):
        path = checkpoint(arch)
        hf = load_reference(path)
        root = tmp_path_factory.mktemp(f"parallel-adapters-{arch}")
        gdn = GDN if arch == "qwen3_5_moe" else ()
        a3 = make_peft_3d_adapter(hf, root / "a3d", seed=1, target_modules=ATTENTION + gdn)
        a2 = make_2d_adapter(hf, root / "a2d", seed=2, target_modules=ATTENTION + MLP + gdn)
        return path, {"base": None, "a3d": LoRARequest("a3d", 1, str(a3)),
                      "a2d": LoRARequest("a2d", 2, str(a2))}

    return get


def mixed_batch(llm: LLM, reqs: dict) -> dict[tuple[str, int], list[int]]:
    """Every prompt under the base model and each adapter, all submitted at once."""
    order = [(name, i) for i in range(len(PROMPTS)) for name in reqs]
    outs = llm.generate([PROMPTS[i] for _, i in order], GREEDY, [reqs[n] for n, _ in order])
    return {key: out.outputs[0].token_ids for key, out in zip(order, outs)}


def check_shards(llm: LLM, one: LLM, mode: str, arch: str) -> None:
    """Each rank holds its part only, the same pools, and made every layer's all_reduces."""
    summaries = llm.core.worker.summaries()
    assert [s["rank"] for s in summaries] == [0, 1]
    full = dict(one.core.worker.model.named_parameters())
    local = dict(llm.core.worker.local.model.named_parameters())
    experts = L0 + "mlp.experts."
    if mode == "tp2":  # rank 0 holds the first half of every expert's intermediate dim
        assert local[experts + "w_down"].equal(full[experts + "w_down"][:, :, :12])
    else:  # and with expert parallelism the first half of the experts, whole
        assert local[experts + "w_down"].equal(full[experts + "w_down"][:4])
    for s in summaries:
        if arch == "qwen3_moe":
            for name, shape in {**QWEN3_SHARDS, **{experts + k: v for k, v in
                                                   EXPERT_SHARDS[mode].items()}}.items():
                assert s["shapes"][name] == shape, (s["rank"], name)
        else:  # Qwen3.5: GDN layer 0 holds 1 of 2 key heads and 2 of 4 value heads
            assert s["shapes"][L0 + "linear_attn.in_proj.weight"] == (2 * 8 + 2 * 12 + 24 + 4,
                                                                       64)
            assert s["shapes"][L0 + "linear_attn.conv1d.weight"] == (40, 1, 4)
            assert s["shapes"][L0 + "linear_attn.out_proj.a_slots"] == (1, 8, 24)
            assert s["shapes"][L0 + "mlp.shared_expert.down_proj.weight"] == (64, 20)
        assert s["weight_bytes"] < 0.8 * sum(p.numel() * 4 for p in full.values())
        assert s["memory"] == summaries[0]["memory"]  # same pools, a KV head / state share each
        assert all(shape[-2:] in ((1, 16), (8, 12)) for shape in s["memory"]), s["memory"]
    # rank 1 started with this engine: two all_reduces per layer per step, none skipped
    assert summaries[1]["all_reduces"] == 2 * one.core.model_config.num_layers \
        * llm.core.steps_total > 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
def test_parallel_tokens_equal_one_rank(setups, arch):
    path, reqs = setups(arch)
    one = LLM(path, **KW)
    want = mixed_batch(one, reqs)
    assert len({tuple(want[name, 0]) for name in reqs}) == 3  # the adapters change the output
    for mode, kwargs in MODES.items():
        llm = LLM(path, **KW, **kwargs)
        try:
            got = mixed_batch(llm, reqs)
            check_shards(llm, one, mode, arch)
        finally:
            llm.shutdown()
        assert got == want, mode
        assert llm.core.lora.evictions_total > 0  # one slot: adapters were swapped in and out


def test_fewer_kv_heads_than_ranks_are_replicated(tmp_path):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path, num_key_value_heads=1)
    want = [o.outputs[0].token_ids for o in LLM(str(path)).generate(PROMPTS, GREEDY)]
    llm = LLM(str(path), tensor_parallel_size=2)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        shapes = [s["shapes"][L0 + "self_attn.qkv_proj.weight"]
                  for s in llm.core.worker.summaries()]
    finally:
        llm.shutdown()
    assert got == want
    assert shapes == [(32 + 16 + 16, 64)] * 2  # 2 query heads and the one KV head each


def test_sizes_that_do_not_divide_are_refused(checkpoint):
    config = ModelConfig.from_pretrained(checkpoint("qwen3_moe"))
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide .*"
                                         r"num_attention_heads \(4\)"):
        LLM(checkpoint("qwen3_moe"), tensor_parallel_size=3)
    assert not mp.active_children()  # refused before any rank was started
    six = dataclasses.replace(config, num_experts=6)
    check_shardable(six, 4, expert_parallel=False)  # TP splits I = 24, not the experts
    with pytest.raises(ValueError, match=r"num_experts \(expert parallelism\) \(6\)"):
        check_shardable(six, 4, expert_parallel=True)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\)"):
        check_shardable(dataclasses.replace(config, num_heads=6), 3, expert_parallel=False)
    check_shardable(config, 4, expert_parallel=True)  # 2 KV heads, each on 2 of 4 ranks
    assert Shard(3, 4).kv_heads(2).tolist() == [1]
    with pytest.raises(ValueError, match="normalizes q and k over all heads"):
        check_shardable(ModelConfig.from_pretrained(checkpoint("olmoe")), 2, False)


def test_a_dead_rank_stops_the_engine_with_an_error(checkpoint):
    llm = LLM(checkpoint("qwen3_moe"), tensor_parallel_size=2)
    try:
        rank = llm.core.worker.ranks[0]
        rank.kill()
        rank.join()
        with pytest.raises(EngineStopped, match=r"rank 1 \(exit code -9\)"):
            llm.generate(PROMPTS, GREEDY)
    finally:
        llm.shutdown()
    assert not mp.active_children()
