"""Offline decode throughput of a Qwen3-30B-A3B-shaped model with dummy weights.

    python benchmarks/bench_decode.py --layers 12 --concurrency 1 16 64 [--lora [N]] [--base-every K]
        [--enforce-eager]

Builds config.json for the real architecture (hidden 2048, 128 experts, top-8, expert
intermediate 768, 32 query / 4 KV heads of 128, vocab 151936) with fewer layers, loads random
weights (--load-format dummy), submits N requests with 128-token random prompts and
--max-tokens output tokens each (ignore_eos), and reports decode tokens/s: tokens generated
after every request has its first token, over the time that took. Each concurrency level is
run once untimed first, so Triton compilation for its shapes stays out of the numbers. With
--lora N (2 if N is left out) every request carries one of N random adapters (rank 16, attention
+ experts, 2D and 3D alternately, one slot each), so each batch mixes both layouts and no
request runs on the base alone; --base-every K makes every K-th request a base request instead
(issue 11's mixed row is K = 3). Decode steps replay CUDA graphs unless --enforce-eager.
--tensor-parallel-size N runs the engine over N GPUs (--enable-expert-parallel splits the
experts by id, on the torch ops: add --kernel-backend torch --enforce-eager); run TP=1 and TP=N
one after the other for the comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from loramux.engine import LLM, LoRARequest, SamplingParams
from loramux.engine.demo import write_random_adapter

QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
    hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
    norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1e6,
    tie_word_embeddings=False, dtype="bfloat16", eos_token_id=151645,
)


def run(llm: LLM, concurrency: int, max_tokens: int, loras: list) -> dict:
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    core = llm.core
    for i in range(concurrency):
        prompt = [rng.randrange(1000, 100000) for _ in range(128)]
        core.add_request(f"r{concurrency}-{i}", prompt, params, loras[i % len(loras)])
    started = set()
    while len(started) < concurrency:
        started |= {o.request_id for o in core.step() if o.outputs[0].token_ids}
    torch.cuda.synchronize()
    generated_before = sum(len(s.output) for r in core.requests.values() for s in r.seqs)
    t0, steps = time.perf_counter(), 0
    while core.has_work():
        core.step()
        steps += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens = concurrency * max_tokens - generated_before
    return {"concurrency": concurrency, "decode_tokens": tokens, "seconds": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1), "ms_per_step": round(1e3 * elapsed / steps,
                                                                              2)}


def profile(llm: LLM, concurrency: int, steps: int, loras: list) -> None:
    """torch.profiler over `steps` decode steps: where the step time goes."""
    core = llm.core
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(concurrency):
        core.add_request(f"p{i}", [1000 + i] * 128, params, loras[i % len(loras)])
    for _ in range(4):  # prefill and a few decode steps
        core.step()

    def steps_body() -> None:
        for _ in range(steps):
            core.step()
    print_profile(steps_body)
    while core.has_work():
        core.step()


def print_profile(body) -> None:
    """torch.profiler over body(): the ops that took the most host and device time."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        body()
        torch.cuda.synchronize()
    for key in ("self_cpu_time_total", "self_cuda_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=18), flush=True)


def write_adapters(root: Path, config: dict, count: int, base_every: int = 0) -> list:
    """`count` random rank-16 adapters (attention + experts), 2D and 3D alternately, as the
    request cycle: [None] (base) when count is 0; with `base_every` K, every K-th entry of the
    cycle is None (a base request)."""
    loras: list = []
    for i in range(count):
        layout = ("2d", "3d")[i % 2]
        write_random_adapter(root / f"a{i}", config, layout=layout, seed=i, rank=16, alpha=32)
        loras.append(LoRARequest(f"bench-{i}", i + 1, str(root / f"a{i}")))
    if loras and base_every:
        adapters = iter(loras * base_every)
        loras = [None if i % base_every == base_every - 1 else next(adapters)
                 for i in range(base_every * count)]
    return loras or [None]


def write_checkpoint(root: Path, config: dict, lora: int, base_every: int = 0) -> tuple[str, list]:
    """config.json in root/model (the weights are dummy) and `lora` adapters (write_adapters):
    (model dir, the request cycle of adapters)."""
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(config))
    return str(root / "model"), write_adapters(root, config, int(lora), base_every)


def report(results: dict, out: Path | None) -> None:
    """Print the results as JSON, and write them to `out` if given."""
    text = json.dumps(results, indent=1)
    if out:
        out.write_text(text)
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--lora", type=int, nargs="?", const=2, default=0, metavar="N",
                        help="every request one of N random adapters (2 without N)")
    parser.add_argument("--base-every", type=int, default=0, metavar="K",
                        help="with --lora: every K-th request is a base request")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="capture no CUDA graphs: every step launches its kernels")
    parser.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the runs, profile N decode steps and print the ops that took "
                             "the most host and device time")
    parser.add_argument("--profile-concurrency", type=int, default=None, metavar="C",
                        help="sequences in the profiled steps (default: the largest concurrency)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = {**QWEN3_30B_A3B, "num_hidden_layers": args.layers}
    model, loras = write_checkpoint(Path(tempfile.mkdtemp()), config, args.lora, args.base_every)
    llm = LLM(model, load_format="dummy", dtype="bfloat16",
              kernel_backend=args.kernel_backend, enforce_eager=args.enforce_eager,
              max_num_seqs=max(args.concurrency),
              max_num_batched_tokens=8192, max_model_len=4096,
              tensor_parallel_size=args.tensor_parallel_size,
              enable_expert_parallel=args.enable_expert_parallel,
              **({"max_loras": max(args.lora, 2), "max_lora_rank": 16,
                  "enable_mixed_moe_lora_format": True} if args.lora else {}))
    results = []
    for c in args.concurrency:  # a first pass compiles kernels for this batch size's shapes
        run(llm, c, 4, loras)
        results.append(run(llm, c, args.max_tokens, loras))
    if args.profile:
        profile(llm, args.profile_concurrency or max(args.concurrency), args.profile, loras)
    llm.shutdown()
    summary = {"gpu": torch.cuda.get_device_name(), "layers": args.layers, "lora": args.lora,
               "base_every": args.base_every, "kernel_backend": args.kernel_backend, "enforce_eager": args.enforce_eager,
               "tensor_parallel_size": args.tensor_parallel_size,
               "expert_parallel": args.enable_expert_parallel, "results": results}
    report(summary, args.out)


if __name__ == "__main__":
    main()
