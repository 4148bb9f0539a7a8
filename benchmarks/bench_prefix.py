"""Time to first token with and without a cached prefix (offline engine, prefix caching on).

    PYTHONPATH=. python3 benchmarks/bench_prefix.py [--layers 48] [--lora] [--out results.json]
    PYTHONPATH=. python3 benchmarks/bench_prefix.py --tiny        # CPU: a tiny model, small sizes

The workload of the prefill issue's acceptance: N requests (64) whose prompts are one shared
P-token prefix (2048) then S distinct tokens (128), submitted at once, one output token each.
By default the model is the Qwen3-30B-A3B shape (bench_decode.py's config, --layers of its 48)
with dummy bf16 weights; --tiny builds a 2-layer model of the same architecture that runs on a
CPU (sizes default to 16 x (256 + 32) there). One engine does every run, in this order:
  warm-up    the uncached burst once, untimed (Triton compiles for its shapes);
  uncached   the burst with a distinct random prefix per request: every prompt is computed;
  cached     the burst with one new shared prefix: the first request computes it and the others
             share its blocks (also within the first step: they are keyed when scheduled);
  single     one request alone, --repeats times each: a new prefix (cold) and a prefix cached
             by the run before (warm).
TTFT is the time from submission to the step that returns a request's first token. Each burst
reports TTFT (mean, p50, p99), wall time, the tokens the model was fed, and the change of the
engine's prefix-cache counters (vllm:prefix_cache_queries / _hits, in tokens);
`prefix_computations` is how many times the cached burst computed its prefix (1, or one per
adapter with --lora: (tokens fed - N * S) / P); `ttft_ratio` is
the mean TTFT of the cached burst's requests that hit (all but its first) over the uncached
burst's mean. With --lora every request carries an adapter, 2D and 3D alternately (rank 16):
the prefix is then computed once per adapter.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_decode import QWEN3_30B_A3B, report, write_checkpoint
from loramux.engine import LLM, SamplingParams
from loramux.engine.core import EngineCore

TINY = dict(QWEN3_30B_A3B, vocab_size=512, hidden_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, intermediate_size=128, max_position_embeddings=8192,
            dtype="float32", eos_token_id=1)
SIZES = {"gpu": dict(num_requests=64, prefix_len=2048, suffix_len=128),
         "tiny": dict(num_requests=16, prefix_len=256, suffix_len=32)}
ONE_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


class Burst:
    """Submits requests at once to an EngineCore and times each one's first token."""

    def __init__(self, core: EngineCore, device: torch.device) -> None:
        self.core, self.device = core, device
        self.fed = 0
        execute = core.worker.execute

        def counting(plan):
            self.fed += len(plan.token_ids)
            return execute(plan)
        core.worker.execute = counting
        self._count = 0

    def run(self, prompts: list[list[int]], loras: list) -> dict:
        stats, fed = self.core.stats(), self.fed
        self._sync()
        start = time.perf_counter()
        ids = []
        for prompt, lora in zip(prompts, loras):
            self._count += 1
            ids.append(f"b{self._count}")
            self.core.add_request(ids[-1], prompt, ONE_TOKEN, lora)
        first: dict[str, float] = {}
        while self.core.has_work():
            outs = self.core.step()
            now = time.perf_counter()
            for out in outs:
                if out.outputs[0].token_ids:
                    first.setdefault(out.request_id, now - start)
        seconds = time.perf_counter() - start
        after = self.core.stats()
        ttft = [first[rid] for rid in ids]
        return {"requests": len(ids), "seconds": round(seconds, 4), "tokens_fed": self.fed - fed,
                "cache_queries": after.prefix_cache_queries_total
                - stats.prefix_cache_queries_total,
                "cache_hits": after.prefix_cache_hits_total - stats.prefix_cache_hits_total,
                "ttft_s": ttft}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def summary(ttft: list[float]) -> dict:
    ordered = sorted(ttft)
    return {"mean_ms": round(1e3 * statistics.fmean(ordered), 2),
            "p50_ms": round(1e3 * statistics.median(ordered), 2),
            "p99_ms": round(1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2)}


def workload(rng: random.Random, vocab: int, args, shared: bool) -> list[list[int]]:
    def tokens(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]
    prefix = tokens(args.prefix_len)
    return [(prefix if shared else tokens(args.prefix_len)) + tokens(args.suffix_len)
            for _ in range(args.num_requests)]


def build(args) -> tuple[LLM, list]:
    config = dict(TINY if args.tiny else QWEN3_30B_A3B, num_hidden_layers=args.layers)
    model, loras = write_checkpoint(Path(tempfile.mkdtemp()), config, 2 if args.lora else 0)
    prompt_len = args.prefix_len + args.suffix_len
    llm = LLM(model, load_format="dummy", dtype=config["dtype"],
              device=args.device, enforce_eager=args.enforce_eager,
              max_num_seqs=args.num_requests, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=prompt_len + 16,
              **({"max_loras": 2, "max_lora_rank": 16, "enable_mixed_moe_lora_format": True}
                 if args.lora else {}))
    return llm, loras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer tiny model in fp32 (CPU), smaller default sizes")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default 48; 2 with --tiny)")
    parser.add_argument("--num-requests", type=int, default=None, help="N (default 64; 16)")
    parser.add_argument("--prefix-len", type=int, default=None, help="P (default 2048; 256)")
    parser.add_argument("--suffix-len", type=int, default=None, help="S (default 128; 32)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192,
                        help="the engine's token budget per step (default 8192, vLLM's on "
                             "an H200)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="single-request runs of each kind (default 5)")
    parser.add_argument("--lora", action="store_true",
                        help="every request carries an adapter, 2D and 3D alternately")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--enforce-eager", action="store_true", help="no decode CUDA graphs")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    defaults = dict(SIZES["tiny" if args.tiny else "gpu"], layers=2 if args.tiny else 48)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    llm, loras = build(args)
    core = llm.core
    burst = Burst(core, core.worker.device)
    vocab = core.model_config.vocab_size
    rng = random.Random(0)
    per_request = [loras[i % len(loras)] for i in range(args.num_requests)]
    burst.run(workload(rng, vocab, args, shared=False), per_request)  # warm-up
    uncached = burst.run(workload(rng, vocab, args, shared=False), per_request)
    cached = burst.run(workload(rng, vocab, args, shared=True), per_request)
    single = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        prompt = workload(rng, vocab, args, shared=True)[:2]
        single["cold"] += burst.run(prompt[:1], loras[:1])["ttft_s"]
        single["warm"] += burst.run(prompt[1:], loras[:1])["ttft_s"]
    hit_ttft = cached["ttft_s"][len(loras):]  # the first request of each adapter computes it
    results = {
        "device": str(core.worker.device) + (f" ({torch.cuda.get_device_name()})"
                                             if core.worker.device.type == "cuda" else ""),
        "model": "tiny" if args.tiny else "Qwen3-30B-A3B shape, dummy weights",
        "layers": args.layers, "dtype": str(core.worker.dtype), "lora": args.lora,
        "num_requests": args.num_requests, "prefix_len": args.prefix_len,
        "suffix_len": args.suffix_len, "max_num_batched_tokens": args.max_num_batched_tokens,
        "uncached": {**{k: v for k, v in uncached.items() if k != "ttft_s"},
                     **summary(uncached["ttft_s"])},
        "cached": {**{k: v for k, v in cached.items() if k != "ttft_s"},
                   **summary(cached["ttft_s"]), "hit_requests": summary(hit_ttft)},
        "prefix_computations": (cached["tokens_fed"] - args.num_requests * args.suffix_len)
        / args.prefix_len,
        "ttft_ratio": round(statistics.fmean(hit_ttft) / statistics.fmean(uncached["ttft_s"]), 4),
        "single": {kind: summary(times) for kind, times in single.items()},
    }
    results["single"]["ratio"] = round(statistics.median(single["warm"])
                                       / statistics.median(single["cold"]), 4)
    report(results, args.out)


if __name__ == "__main__":
    main()
