"""Launch-parameter sweep of the prefill attention kernel on this card (Qwen3-30B-A3B heads:
32 query / 4 KV of 128, bf16, block size 16), whole prompts of the given batches.

    python benchmarks/sweep_prefill_attention.py [--batches 64x128 4x2048 1x8192]

Prints TFLOP/s (4 * N * D FLOPs per visible query-key pair) per configuration and batch; the
best configurations go into kernels/prefill_attention.py's LAUNCH (short query runs) and
LAUNCH_LONG (runs of LONG_QUERY tokens or more).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from loramux.kernels import prefill_attention


def inputs(prompts: int, length: int):
    n, g, d, bs = 32, 4, 128, 16
    blocks = prompts * -(-length // bs)
    k = torch.randn(blocks, bs, g, d, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(prompts * length, n, d, dtype=torch.bfloat16, device="cuda")
    tables = torch.arange(blocks, dtype=torch.int32, device="cuda").view(prompts, -1)
    starts = torch.arange(0, prompts * length + 1, length, dtype=torch.int32, device="cuda")
    lens = torch.full((prompts,), length, dtype=torch.int32, device="cuda")
    flops = 4 * n * d * prompts * length * (length + 1) // 2
    return (q, k, torch.randn_like(k), tables, starts, lens, length, d ** -0.5), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", default=["64x128", "4x2048", "1x8192"])
    args = parser.parse_args()
    cases = {b: inputs(*map(int, b.split("x"))) for b in args.batches}
    results = []
    for bm, bn, warps, stages in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3)):
        for launch in (prefill_attention.LAUNCH, prefill_attention.LAUNCH_LONG):
            launch.update(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        row = []
        try:
            for batch, (a, flops) in cases.items():
                ms = triton.testing.do_bench(
                    lambda: prefill_attention.paged_prefill_attention(*a), warmup=5, rep=20)
                row.append(flops / ms / 1e9)
        except Exception as err:  # a configuration this card cannot run (shared memory)
            print(f"bm {bm} bn {bn} w {warps} s {stages}: {type(err).__name__}", flush=True)
            continue
        results.append((min(row), bm, bn, warps, stages, row))
        print(f"bm {bm} bn {bn} w {warps} s {stages}: "
              + " ".join(f"{b} {t:.0f}" for b, t in zip(cases, row)) + " TFLOP/s", flush=True)
    best = max(results)
    print("best (by the worst batch):", best, flush=True)


if __name__ == "__main__":
    main()
