"""Launch-shape sweeps for bench_kernels.py --sweep: each tries a few settings of a kernel
module's LAUNCH knobs over several batch sizes, keeps the best (geometric mean of time over
the default's) in place for the rest of the run, and returns every timing as rows."""

from __future__ import annotations

import math
from typing import Callable

import torch

from benchmarks._timing import graph_time_us
from loramux.kernels import LoraMeta, MoeLora, lora, moe_lora
from loramux.kernels.moe import gemm_config, moe_gemm
from loramux.kernels.moe_align import moe_align, needs_alignment

LORA_VARIANTS = [dict(per_sm=4), dict(per_sm=2), dict(per_sm=8), dict(num_warps=8),
                 dict(num_stages=4), dict(block_n=128), dict(per_sm=8, num_warps=8)]
DENSE_VARIANTS = [dict(per_sm=2), dict(per_sm=1), dict(per_sm=4), dict(num_warps=8),
                  dict(num_stages=2), dict(block_n=128), dict(per_sm=4, num_warps=8)]
_PREFILL_GEMMS = [(64, 64, 64, 4, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3),
                  (128, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 256, 64, 8, 3),
                  (64, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 128, 64, 8, 4)]
GEMM_VARIANTS = {  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), by batch
    1024: [(64, 64, 64, 4, 3), (64, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    2048: _PREFILL_GEMMS,
    8192: _PREFILL_GEMMS,
}


def safe_time(op: Callable[[], object]) -> float:
    """graph_time_us, or inf when the launch shape does not compile or run."""
    try:
        return graph_time_us(op)
    except Exception as err:  # noqa: BLE001 - a failed variant is a result, not a crash
        print(f"variant failed: {type(err).__name__}: {str(err)[:120]}", flush=True)
        return math.inf


def tune(name: str, launch: dict, variants: list[dict], ops: dict[str, Callable]) -> list[dict]:
    """Time every variant of `launch` on every op; leave the best variant in `launch`."""
    default, rows, scores = dict(launch), [], []
    for variant in variants:
        launch.update(default, **variant)
        times = {case: safe_time(op) for case, op in ops.items()}
        rows += [dict(op=f"sweep_{name}", case=case, config=dict(launch), us=t)
                 for case, t in times.items()]
        scores.append(sum(math.log(t) for t in times.values()))
        print(f"sweep {name} {variant}: " + ", ".join(f"{c} {t:.1f}" for c, t in times.items()),
              flush=True)
    launch.update(default, **variants[min(range(len(variants)), key=scores.__getitem__)])
    print(f"sweep {name}: chose {launch}", flush=True)
    return rows


def moe_lora_ops(make, tokens_list, adapters=16, rank=16) -> dict[str, Callable]:
    """gate_up + down LoRA delta ops on the Qwen3-30B-A3B layer, default launch shapes."""
    ops = {}
    for num_tokens in tokens_list:
        x, ids, lora_w, act, slots, align = make(num_tokens, adapters, rank)
        active = min(num_tokens, adapters)

        def op(x=x, ids=ids, w=lora_w, act=act, slots=slots, align=align, active=active):
            moe_lora.moe_lora_delta(x, w.a_gate_up, w.b_gate_up, w.up_block, ids, slots, align,
                                    active)
            moe_lora.moe_lora_delta(act, w.a_down, w.b_down, None, ids, slots, align, active)
        ops[f"T={num_tokens},L={adapters}"] = op
    return ops


def tune_naive_rule(make, experts=128, top_k=8) -> list[dict]:
    """Per pair (naive) vs per (expert, slot) programs on four batches; NAIVE_PAIRS_PER_GROUP
    becomes the threshold (pairs per active slot and expert) that agrees with most winners."""
    rows, outcomes = [], []
    for num_tokens, adapters in ((128, 16), (256, 16), (1024, 16), (1024, 64)):
        op = next(iter(moe_lora_ops(make, [num_tokens], adapters).values()))
        times = {}
        for mode, per_group in (("naive", 1e9), ("aligned", 0)):
            moe_lora.NAIVE_PAIRS_PER_GROUP = per_group
            times[mode] = safe_time(op)
        rows += [dict(op="sweep_naive", case=f"T={num_tokens},L={adapters}", config=m, us=t)
                 for m, t in times.items()]
        density = num_tokens * top_k / (min(num_tokens, adapters) * experts)
        outcomes.append((density, times["naive"] <= times["aligned"]))
        print(f"sweep naive T={num_tokens} L={adapters} density {density:.2f}: {times}",
              flush=True)
    moe_lora.NAIVE_PAIRS_PER_GROUP = max(
        (2, 1, 4, 8), key=lambda g: sum((d <= g) == naive for d, naive in outcomes))
    print(f"sweep naive: chose NAIVE_PAIRS_PER_GROUP={moe_lora.NAIVE_PAIRS_PER_GROUP}", flush=True)
    return rows


def dense_ops(randn, tokens_list, hidden=2048, adapters=16, rank=16) -> dict[str, Callable]:
    ops = {}
    for num_tokens in tokens_list:
        x, y = randn(num_tokens, hidden), randn(num_tokens, hidden)
        a = randn(adapters, rank, hidden, fan_in=hidden)
        b = randn(adapters, hidden, rank, fan_in=rank)
        slots = [t * min(num_tokens, adapters) // num_tokens for t in range(num_tokens)]
        meta = LoraMeta.build(slots, adapters, x.device)
        ops[f"T={num_tokens}"] = (
            lambda y=y, x=x, a=a, b=b, meta=meta: lora.lora_delta(y, x, a, b, meta, (hidden,)))
    return ops


def run_sweeps(make_lora_case, randn) -> list[dict]:
    rows = tune("moe_lora", moe_lora.LAUNCH, LORA_VARIANTS,
                moe_lora_ops(make_lora_case, (1, 16, 64, 256)))
    rows += tune_naive_rule(make_lora_case)
    rows += tune("dense", lora.LAUNCH, DENSE_VARIANTS, dense_ops(randn, (1, 16, 64, 256, 1024)))
    return rows


def gemm_sweep(randn, routing, shape) -> list[dict]:
    """Base gate_up / down GEMMs alone under the GEMM_VARIANTS block configs."""
    hidden, experts, top_k, inter = shape
    rows = []
    for num_tokens, candidates in GEMM_VARIANTS.items():
        x, act = randn(num_tokens, hidden), randn(num_tokens * top_k, inter)
        w_gate_up = randn(experts, 2 * inter, hidden, fan_in=hidden)
        w_down = randn(experts, hidden, inter, fan_in=inter)
        weights, ids = routing(num_tokens, experts, top_k)
        for bm, bn, bk, warps, stages in candidates:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
            align = moe_align(ids, experts, bm)
            t_gu = safe_time(lambda: moe_gemm(x, w_gate_up, ids, weights, align, None, None,
                                              cfg, True))
            t_d = safe_time(lambda: moe_gemm(act, w_down, ids, weights, align, None, None,
                                             cfg, False))
            rows.append(dict(op="sweep_gemm", case=f"T={num_tokens}", config=cfg,
                             us=[t_gu, t_d]))
            print(f"sweep gemm T={num_tokens} {cfg}: gate_up {t_gu:.1f} down {t_d:.1f}",
                  flush=True)
    return rows


def segment_slots(num_tokens: int, num_adapters: int) -> list[int]:
    """Contiguous request segments, one per adapter (as many as tokens allow)."""
    segments = min(num_tokens, num_adapters)
    return [t * segments // num_tokens for t in range(num_tokens)]


def random_moe_lora(randn, adapters: int, experts: int, hidden: int, inter: int, rank: int,
                    device) -> MoeLora:
    """MoE-LoRA slot buffers with A ~ N(0, 1/in), B ~ N(0, 1/r), 2D slots (up_block 1)."""
    return MoeLora(randn(adapters, experts, 2 * rank, hidden, fan_in=hidden),
                   randn(adapters, experts, 2 * inter, rank, fan_in=rank),
                   torch.ones(adapters, dtype=torch.int32, device=device),
                   randn(adapters, experts, rank, inter, fan_in=inter),
                   randn(adapters, experts, hidden, rank, fan_in=rank))


def lora_case_maker(randn, routing, shape, device) -> Callable:
    """make(T, L, R) -> (x, topk_ids, MoeLora, act, token_slot, alignment) for moe_lora_ops."""
    hidden, experts, top_k, inter = shape

    def make(num_tokens, adapters, rank):
        x = randn(num_tokens, hidden)
        _, ids = routing(num_tokens, experts, top_k)
        w = random_moe_lora(randn, adapters, experts, hidden, inter, rank, device)
        act = randn(num_tokens * top_k, inter)
        meta = LoraMeta.build(segment_slots(num_tokens, adapters), adapters, torch.device(device))
        block_m = gemm_config(num_tokens, inter, hidden, x.dtype, gate_up=True)["BLOCK_M"]
        align = moe_align(ids, experts, block_m) if needs_alignment(ids.numel(), experts) else None
        return x, ids, w, act, meta.token_slot, align

    return make
