"""Kernel benchmarks on one GPU: fused MoE, MoE-LoRA and dense LoRA against the memory roofline.

    python3 benchmarks/bench_kernels.py [--sweep] [--out results.json]

bf16; cold-L2 CUDA-graph timing (benchmarks/_timing.py); x ~ N(0, 1), weights and A ~ N(0, 1/in),
B ~ N(0, 1/r); tokens given to adapters in contiguous request segments; routing = top-8 of the
softmax of random logits. Roofline bytes: each input read once (only the experts and
(slot, expert) pairs a step touches), each output written once, at 3.0 TB/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import eager_time_us, graph_time_us, roofline_us  # noqa: E402
from kernels import LoraMeta, MoeLora, reference, triton_ops  # noqa: E402
from kernels.moe import gemm_config, moe_gemm  # noqa: E402
from kernels.moe_align import moe_align  # noqa: E402
from kernels.lora import delta_config, launch_lora_delta  # noqa: E402
from kernels.moe_lora import lora_config, moe_lora_delta  # noqa: E402

DEVICE = "cuda"
MOE_SHAPES = {"qwen3-30b-a3b": (2048, 128, 8, 768), "qwen3-235b-a22b": (4096, 128, 8, 1536)}
# (shape, tokens, adapters, rank, time the torch twin)
MOE_CASES = (
    [("qwen3-30b-a3b", t, 16, 16, t <= 256) for t in (1, 16, 64, 256, 1024)]
    + [("qwen3-30b-a3b", 1024, 64, 16, False)]
    + [("qwen3-30b-a3b", t, 16, 64, False) for t in (1, 16, 64, 256)]
    + [("qwen3-235b-a22b", t, 16, 16, False) for t in (1, 16, 64, 256)]
)
DENSE_CASES = ([(2048, t, 16, 16, True) for t in (1, 16, 64, 256, 1024)]
               + [(2048, t, 16, 64, False) for t in (1, 16, 256)]
               + [(4096, t, 16, 16, False) for t in (1, 16, 256)])


def _randn(*shape, fan_in=1):
    return (torch.randn(shape, device=DEVICE) / fan_in**0.5).bfloat16()


def segment_slots(num_tokens: int, num_adapters: int) -> list[int]:
    """Contiguous request segments, one per adapter (as many as tokens allow)."""
    segments = min(num_tokens, num_adapters)
    return [t * segments // num_tokens for t in range(num_tokens)]


def routing(num_tokens, experts, top_k):
    logits = torch.randn(num_tokens, experts, device=DEVICE)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return weights.bfloat16(), ids


def moe_case(shape, num_tokens, adapters, rank, with_twin):
    hidden, experts, top_k, inter = MOE_SHAPES[shape]
    x = _randn(num_tokens, hidden)
    w_gate_up = _randn(experts, 2 * inter, hidden, fan_in=hidden)
    w_down = _randn(experts, hidden, inter, fan_in=inter)
    weights, ids = routing(num_tokens, experts, top_k)
    lora = MoeLora(_randn(adapters, experts, 2 * rank, hidden, fan_in=hidden),
                   _randn(adapters, experts, 2 * inter, rank, fan_in=rank),
                   torch.ones(adapters, dtype=torch.int32, device=DEVICE),
                   _randn(adapters, experts, rank, inter, fan_in=inter),
                   _randn(adapters, experts, hidden, rank, fan_in=rank))
    slots = segment_slots(num_tokens, adapters)
    meta = LoraMeta.build(slots, adapters, torch.device(DEVICE))
    args = (x, w_gate_up, w_down, weights, ids)
    t_base = graph_time_us(lambda: triton_ops.fused_experts(*args, None, None))
    t_full = graph_time_us(lambda: triton_ops.fused_experts(*args, lora, meta))
    config = gemm_config(num_tokens, inter, hidden, x.dtype, gate_up=True)
    align = None if num_tokens * top_k * 4 <= experts else moe_align(ids, experts, config["BLOCK_M"])
    act = moe_gemm(x, w_gate_up, ids, weights, align, None, None, config, True)

    def lora_only():
        moe_lora_delta(x, lora.a_gate_up, lora.b_gate_up, lora.up_block, ids, meta.token_slot, align)
        moe_lora_delta(act, lora.a_down, lora.b_down, None, ids, meta.token_slot, align)

    t_lora = graph_time_us(lora_only)
    pairs = num_tokens * top_k
    used_experts = ids.unique().numel()
    slot_of_pair = torch.tensor(slots, device=DEVICE).repeat_interleave(top_k)
    groups = (slot_of_pair * experts + ids.flatten()).unique().numel()
    base_bytes = 2 * (used_experts * 3 * inter * hidden + 2 * num_tokens * hidden)
    lora_bytes = 2 * (groups * rank * (3 * hidden + 3 * inter) + num_tokens * hidden
                      + pairs * (3 * inter + hidden))
    row = dict(op="moe", shape=shape, tokens=num_tokens, adapters=adapters, rank=rank,
               base_us=t_base, base_roof_us=roofline_us(base_bytes), lora_us=t_lora,
               lora_roof_us=roofline_us(lora_bytes), full_us=t_full)
    if with_twin:
        row["twin_us"] = eager_time_us(lambda: reference.fused_experts(*args, lora, meta))
    return row


def dense_case(hidden, num_tokens, adapters, rank, with_twin):
    x = _randn(num_tokens, hidden)
    a = _randn(adapters, rank, hidden, fan_in=hidden)
    b = _randn(adapters, hidden, rank, fan_in=rank)
    y = _randn(num_tokens, hidden)
    slots = segment_slots(num_tokens, adapters)
    meta = LoraMeta.build(slots, adapters, torch.device(DEVICE))
    t = graph_time_us(lambda: triton_ops.lora_delta(y, x, a, b, meta, (hidden,)))
    used = len(set(slots))
    num_bytes = 2 * (3 * num_tokens * hidden + 2 * used * rank * hidden)
    row = dict(op="lora_delta", hidden=hidden, tokens=num_tokens, adapters=adapters, rank=rank,
               us=t, roof_us=roofline_us(num_bytes))
    if with_twin:
        row["twin_us"] = eager_time_us(lambda: reference.lora_delta(y, x, a, b, meta, (hidden,)))
    return row


SWEEP = {  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of both base GEMMs, by batch
    1024: [(64, 64, 64, 4, 3), (64, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
}


def sweep_case(num_tokens, candidates):
    """Time the base gate_up and down GEMMs alone under several block configs."""
    hidden, experts, top_k, inter = MOE_SHAPES["qwen3-30b-a3b"]
    x = _randn(num_tokens, hidden)
    w_gate_up = _randn(experts, 2 * inter, hidden, fan_in=hidden)
    w_down = _randn(experts, hidden, inter, fan_in=inter)
    weights, ids = routing(num_tokens, experts, top_k)
    act = _randn(num_tokens * top_k, inter)
    rows = []
    for bm, bn, bk, warps, stages in candidates:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        naive = num_tokens * top_k * 4 <= experts
        align = None if naive else moe_align(ids, experts, bm)
        t_gu = graph_time_us(lambda: moe_gemm(x, w_gate_up, ids, weights, align, None, None, cfg,
                                              True))
        t_d = graph_time_us(lambda: moe_gemm(act, w_down, ids, weights, align, None, None, cfg,
                                             False))
        rows.append(dict(op="sweep", tokens=num_tokens, config=[bm, bn, bk, warps, stages],
                         gate_up_us=t_gu, down_us=t_d))
    return rows


LORA_SWEEP = [  # (naive or None = default rule, BLOCK_N, N_SPLIT scale, warps, stages, BLOCK_K)
    (None, 64, 1, 4, 3, 512), (None, 64, 2, 4, 3, 512), (None, 64, 4, 4, 3, 512),
    (None, 64, 1, 4, 3, 256), (None, 64, 1, 8, 3, 512), (None, 64, 1, 4, 4, 512),
    (None, 128, 1, 4, 3, 512), (True, 64, 1, 4, 3, 512), (False, 64, 1, 4, 3, 512),
]


def lora_sweep_case(num_tokens, adapters=16, rank=16, variants=LORA_SWEEP):
    """Time the MoE-LoRA gate_up + down kernels under several launch shapes."""
    hidden, experts, top_k, inter = MOE_SHAPES["qwen3-30b-a3b"]
    x = _randn(num_tokens, hidden)
    weights, ids = routing(num_tokens, experts, top_k)
    a_gu = _randn(adapters, experts, 2 * rank, hidden, fan_in=hidden)
    b_gu = _randn(adapters, experts, 2 * inter, rank, fan_in=rank)
    a_d = _randn(adapters, experts, rank, inter, fan_in=inter)
    b_d = _randn(adapters, experts, hidden, rank, fan_in=rank)
    up_block = torch.ones(adapters, dtype=torch.int32, device=DEVICE)
    act = _randn(num_tokens * top_k, inter)
    slots = LoraMeta.build(segment_slots(num_tokens, adapters), adapters, torch.device(DEVICE))
    block_m = gemm_config(num_tokens, inter, hidden, x.dtype, gate_up=True)["BLOCK_M"]
    align = moe_align(ids, experts, block_m) if num_tokens * top_k * 4 > experts else None
    pairs, rows = num_tokens * top_k, []
    for naive, block_n, scale, warps, stages, block_k in variants:
        naive = (align is None or pairs <= 256) if naive is None else naive
        if not naive and align is None:
            continue
        cfgs = []
        for src, n_half in ((x, inter), (act, hidden)):
            cfg = lora_config(src, pairs, adapters * experts, n_half, naive)
            split = max(1, round(cfg["N_SPLIT"] * scale * 64 / block_n))
            cfgs.append({**cfg, "BLOCK_N": block_n, "N_SPLIT": split, "num_warps": warps,
                         "num_stages": stages, "BLOCK_K": min(block_k, cfg["BLOCK_K"])})

        def op():
            moe_lora_delta(x, a_gu, b_gu, up_block, ids, slots.token_slot, align, cfgs[0])
            moe_lora_delta(act, a_d, b_d, None, ids, slots.token_slot, align, cfgs[1])

        rows.append(dict(op="sweep_lora", tokens=num_tokens, adapters=adapters,
                         config=[naive, block_n, scale, warps, stages, block_k,
                                 cfgs[0]["N_SPLIT"], cfgs[1]["N_SPLIT"]], us=graph_time_us(op)))
    return rows


DENSE_SWEEP = [  # (BLOCK_M, BLOCK_N, N_SPLIT scale, warps, stages, BLOCK_K)
    (None, 64, 1, 4, 3, 512), (None, 64, 2, 4, 3, 512), (None, 64, 0.5, 4, 3, 512),
    (None, 64, 1, 4, 3, 256), (None, 64, 1, 8, 3, 512), (None, 128, 1, 4, 3, 512),
    (None, 32, 2, 4, 3, 512), (None, 64, 1, 4, 2, 1024), (64, 64, 1, 4, 3, 512),
]


def dense_sweep_case(num_tokens, hidden=2048, adapters=16, rank=16):
    x = _randn(num_tokens, hidden)
    a = _randn(adapters, rank, hidden, fan_in=hidden)
    b = _randn(adapters, hidden, rank, fan_in=rank)
    y = _randn(num_tokens, hidden)
    meta = LoraMeta.build(segment_slots(num_tokens, adapters), adapters, torch.device(DEVICE))
    rows = []
    for block_m, block_n, scale, warps, stages, block_k in DENSE_SWEEP:
        cfg = delta_config(x, adapters, (hidden,))
        cfg.update(BLOCK_M=block_m or cfg["BLOCK_M"], BLOCK_N=block_n, num_warps=warps,
                   num_stages=stages, BLOCK_K=block_k,
                   N_SPLIT=max(1, round(cfg["N_SPLIT"] * scale * 64 / block_n)))
        t = graph_time_us(lambda: launch_lora_delta(y, x, a, b, meta, (hidden,), cfg))
        rows.append(dict(op="sweep_dense", tokens=num_tokens,
                         config=[cfg["BLOCK_M"], block_n, scale, warps, stages, block_k,
                                 cfg["N_SPLIT"]], us=t))
    return rows


def fmt(row):
    if row["op"] == "moe":
        twin = f"{row['twin_us']:.0f}" if "twin_us" in row else "-"
        return (f"| {row['shape']} | {row['tokens']} | {row['adapters']} | {row['rank']} "
                f"| {row['base_us']:.1f} ({row['base_roof_us'] / row['base_us']:.0%}) "
                f"| {row['lora_us']:.1f} ({row['lora_roof_us'] / row['lora_us']:.0%}) "
                f"| {row['full_us']:.1f} | {twin} |")
    if row["op"] == "lora_delta":
        twin = f"{row['twin_us']:.0f}" if "twin_us" in row else "-"
        return (f"| {row['hidden']} | {row['tokens']} | {row['adapters']} | {row['rank']} "
                f"| {row['us']:.1f} ({row['roof_us'] / row['us']:.0%}) | {twin} |")
    if row["op"] in ("sweep_lora", "sweep_dense"):
        return f"| {row['op']} | {row['tokens']} | {row['config']} | {row['us']:.1f} |"
    return (f"| sweep | {row['tokens']} | {row['config']} | gate_up {row['gate_up_us']:.1f} "
            f"| down {row['down_us']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep base GEMM configs")
    parser.add_argument("--out", type=Path, help="write all rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    if args.sweep:
        for num_tokens, candidates in SWEEP.items():
            rows += sweep_case(num_tokens, candidates)
        for num_tokens in (1, 16, 64, 256):
            rows += lora_sweep_case(num_tokens)
        rows += lora_sweep_case(1024, adapters=64, variants=LORA_SWEEP[-2:])
        for num_tokens in (1, 16, 64, 256, 1024):
            rows += dense_sweep_case(num_tokens)
        print(*map(fmt, rows), sep="\n", flush=True)
    for case in MOE_CASES:
        rows.append(moe_case(*case))
        print(fmt(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    for case in DENSE_CASES:
        rows.append(dense_case(*case))
        print(fmt(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
