"""Kernel benchmarks on one GPU: fused MoE, MoE-LoRA and dense LoRA against the memory roofline.

    python3 benchmarks/bench_kernels.py [--sweep] [--sweep-gemm] [--sweep-only] [--moe-lora]
        [--fused-ops] [--out results.json]

--fused-ops: only the fused elementwise ops (norm, q/k norm + RoPE, router, SiLU*mul) against
the torch sequences they replace, at 1 / 64 / 256 / 8192 tokens (benchmarks/_fused_ops.py).

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

from benchmarks import _fused_ops, _sweep  # noqa: E402
from benchmarks._sweep import random_moe_lora, segment_slots  # noqa: E402
from benchmarks._timing import eager_time_us, graph_time_us, roofline_us  # noqa: E402
from loramux.kernels import LoraMeta, lora, moe_lora, reference, triton_ops  # noqa: E402
from loramux.kernels.moe import gemm_config, moe_gemm  # noqa: E402
from loramux.kernels.moe_align import moe_align, needs_alignment  # noqa: E402
from loramux.kernels.moe_lora import moe_lora_delta  # noqa: E402

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
    lora = random_moe_lora(_randn, adapters, experts, hidden, inter, rank, DEVICE)
    slots = segment_slots(num_tokens, adapters)
    meta = LoraMeta.build(slots, adapters, torch.device(DEVICE))
    args = (x, w_gate_up, w_down, weights, ids)
    t_base = graph_time_us(lambda: triton_ops.fused_experts(*args, None, None))
    t_full = graph_time_us(lambda: triton_ops.fused_experts(*args, lora, meta))
    config = gemm_config(num_tokens, inter, hidden, x.dtype, gate_up=True)
    align = None
    if needs_alignment(ids.numel(), experts):
        align = moe_align(ids, experts, config["BLOCK_M"])
    act = moe_gemm(x, w_gate_up, ids, weights, align, None, None, config, gate_up=True)

    def lora_only():
        moe_lora_delta(x, lora.a_gate_up, lora.b_gate_up, lora.up_block, ids, meta.token_slot,
                       align, meta.num_active)
        moe_lora_delta(act, lora.a_down, lora.b_down, None, ids, meta.token_slot, align,
                       meta.num_active)

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
    return f"| {row} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true",
                        help="first tune the LoRA kernels' launch knobs (kept for the tables)")
    parser.add_argument("--sweep-gemm", action="store_true", help="time base GEMM configs")
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweeps")
    parser.add_argument("--moe-lora", action="store_true",
                        help="only the Qwen3-30B-A3B rank-16 MoE rows (16 adapters at 1-256 "
                             "tokens, 64 adapters at 1024), without the twin")
    parser.add_argument("--fused-ops", action="store_true",
                        help="only the fused elementwise ops against their torch sequences")
    parser.add_argument("--out", type=Path, help="write all rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    if args.fused_ops:
        print("| op | tokens | KB moved | fused us (% of 4.3 TB/s) | torch us (%) | speed-up |")
        for row in _fused_ops.fused_op_rows():
            rows.append(row)
            print(_fused_ops.fmt(row), flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1, default=str))
        return
    shape = MOE_SHAPES["qwen3-30b-a3b"]
    if args.sweep_gemm:
        rows += _sweep.gemm_sweep(_randn, routing, shape)
    if args.sweep:
        rows += _sweep.run_sweeps(_sweep.lora_case_maker(_randn, routing, shape, DEVICE), _randn)
    if args.sweep_only:
        return
    rows.append(dict(op="launch", moe_lora=moe_lora.LAUNCH, lora=lora.LAUNCH,
                     naive_pairs_per_group=moe_lora.NAIVE_PAIRS_PER_GROUP))
    print(rows[-1], flush=True)
    cases = [(moe_case, case) for case in MOE_CASES] + [(dense_case, case) for case in DENSE_CASES]
    if args.moe_lora:
        cases = [(moe_case, (*case[:4], False)) for case in MOE_CASES
                 if case[0] == "qwen3-30b-a3b" and case[3] == 16
                 and (case[1], case[2]) != (1024, 16)]
    for fn, case in cases:
        try:
            rows.append(fn(*case))
        except Exception as err:  # noqa: BLE001 - report the row and keep measuring
            rows.append(dict(op="error", case=case, error=f"{type(err).__name__}: {err}"[:300]))
        print(fmt(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
