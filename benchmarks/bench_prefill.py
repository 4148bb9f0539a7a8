"""Offline prefill throughput of a Qwen3-30B-A3B-shaped model with dummy weights, against the
bf16 compute roofline measured on the same card, and the prefill attention op on its own.

    python benchmarks/bench_prefill.py --layers 48 --batches 64x128 16x512 4x2048 1x8192 \
        [--lora 16] [--long 32768] [--attention] [--profile 64x128] [--out result.json]

Each batch (prompts x tokens) is submitted at once with max_tokens 1 and timed from submission
until every request has its token; --max-num-batched-tokens (default 8192) makes each of the
listed batches one engine step. Each batch runs once untimed first, so Triton compilation stays
out; prefix caching is off, so every run computes all its tokens. Roofline: 2 FLOPs per
active parameter per token (attention projections, the routed top-k experts, router; the LM
head for the last token of each prompt) plus causal attention (4 * N * D FLOPs per visible
query-key pair), at the bf16 matmul rate measured here (8192^3 torch.mm).
--lora N gives every request one of N random rank-16 adapters (2D and 3D alternately, on
attention and experts). --long L prefills one L-token prompt with the default chunking
(--max-num-batched-tokens chunks) under --max-model-len L: L - 1 prompt tokens and one output
token, to show it fits. --attention times
the prefill attention op alone (48 layers' worth, Triton and the torch twin) for each batch.
Runs on a CPU too (--tiny: a 2-layer toy shape) to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_decode import QWEN3_30B_A3B, print_profile, report, write_adapters  # noqa: E402
from loramux.engine import LLM, SamplingParams  # noqa: E402

TINY = dict(QWEN3_30B_A3B, vocab_size=512, hidden_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, intermediate_size=128, dtype="float32")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_tflops() -> float:
    """Measured bf16 dense matmul rate (TFLOP/s), the compute roofline of this card."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    sync()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t0) / 1e12


def step_flops(config: dict, layers: int, prompts: int, length: int) -> float:
    """Forward FLOPs of prefilling `prompts` prompts of `length` tokens (see the module doc)."""
    h, d = config["hidden_size"], config["head_dim"]
    n, g = config["num_attention_heads"], config["num_key_value_heads"]
    attn_params = h * (n + 2 * g) * d + n * d * h
    expert_params = config["num_experts_per_tok"] * 3 * h * config["moe_intermediate_size"]
    per_token = layers * (attn_params + expert_params + h * config["num_experts"])
    tokens = prompts * length
    pairs = prompts * length * (length + 1) // 2
    return 2 * per_token * tokens + layers * 4 * n * d * pairs + 2 * prompts * h * config[
        "vocab_size"]


def prefill(llm: LLM, prompts: int, length: int, loras: list, tag: str) -> float:
    """Seconds from submitting the batch until every request has its first token."""
    rng = random.Random(length)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    core = llm.core
    sync()
    t0 = time.perf_counter()
    for i in range(prompts):
        prompt = [rng.randrange(100, 500) for _ in range(length)]
        core.add_request(f"{tag}-{i}", prompt, params, loras[i % len(loras)])
    while core.has_work():
        core.step()
    sync()
    return time.perf_counter() - t0


def attention_ms(config: dict, layers: int, prompts: int, length: int) -> dict:
    """The prefill attention op alone for one batch, times `layers`: Triton and the torch twin
    (the per-sequence SDPA path that prefill used before the kernel)."""
    from loramux.kernels import prefill_attention, reference

    n, g, d, bs = (config["num_attention_heads"], config["num_key_value_heads"],
                   config["head_dim"], 16)
    dev, dt = "cuda", torch.bfloat16
    blocks = prompts * -(-length // bs)
    k = torch.randn(blocks, bs, g, d, dtype=dt, device=dev)
    v = torch.randn_like(k)
    q = torch.randn(prompts * length, n, d, dtype=dt, device=dev)
    tables = torch.arange(blocks, dtype=torch.int32, device=dev).view(prompts, -1)
    starts = torch.arange(0, prompts * length + 1, length, dtype=torch.int32, device=dev)
    lens = torch.full((prompts,), length, dtype=torch.int32, device=dev)
    args = (q, k, v, tables, starts, lens, length, d ** -0.5)
    out = {}
    for name, op in (("triton", prefill_attention.paged_prefill_attention),
                     ("twin", reference.paged_prefill_attention)):
        try:
            op(*args)
            sync()
            t0 = time.perf_counter()
            for _ in range(layers):
                op(*args)
            sync()
            out[name] = round(1e3 * (time.perf_counter() - t0), 2)
        except torch.cuda.OutOfMemoryError:
            out[name] = "out of memory"
            torch.cuda.empty_cache()
    pairs = prompts * length * (length + 1) // 2
    out["tflops"] = round(layers * 4 * n * d * pairs / (out["triton"] / 1e3) / 1e12, 1)
    return out


def make_llm(root: Path, config: dict, args, max_model_len: int) -> LLM:
    return LLM(str(root / "model"), load_format="dummy", dtype=config["dtype"],
              max_num_seqs=max(p for p, _ in args.batches),
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_model_len,
              enable_prefix_caching=False,  # every run computes its prompts (the untimed first
              # run submits the same ones)
              **({"max_loras": args.lora, "max_lora_rank": 16,
                  "enable_mixed_moe_lora_format": True} if args.lora else {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--batches", nargs="+", default=[(64, 128), (16, 512), (4, 2048), (1, 8192)],
                        type=lambda s: tuple(int(x) for x in s.split("x")),
                        help="prompts x tokens per batch")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--lora", type=int, default=0, metavar="N",
                        help="every request one of N random adapters (2D and 3D alternately)")
    parser.add_argument("--long", type=int, default=0, metavar="L",
                        help="also prefill one L-token prompt in chunks (max_model_len L)")
    parser.add_argument("--attention", action="store_true",
                        help="time the prefill attention op alone for each batch")
    parser.add_argument("--profile", default=None, metavar="PxT",
                        type=lambda s: tuple(int(x) for x in s.split("x")),
                        help="after the timed runs, profile one prefill of this batch and print "
                             "the ops that took the most host and device time")
    parser.add_argument("--tiny", action="store_true", help="a toy shape (checks the script)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = {**(TINY if args.tiny else QWEN3_30B_A3B), "num_hidden_layers": args.layers}
    root = Path(tempfile.mkdtemp())
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(config))
    peak = matmul_tflops()
    longest = max(length for _, length in args.batches)
    loras = write_adapters(root, config, args.lora)
    llm = make_llm(root, config, args, max(longest + 16, 4096))
    rows = []
    for prompts, length in args.batches:
        prefill(llm, prompts, length, loras, f"warm{prompts}x{length}")
        seconds = prefill(llm, prompts, length, loras, f"{prompts}x{length}")
        tflops = step_flops(config, args.layers, prompts, length) / seconds / 1e12
        row = {"batch": f"{prompts}x{length}", "seconds": round(seconds, 4),
               "tokens_per_s": round(prompts * length / seconds),
               "tflops": round(tflops, 1), "roofline_pct": round(100 * tflops / peak, 1)}
        if args.attention and torch.cuda.is_available():
            row["attention_ms"] = attention_ms(config, args.layers, prompts, length)
        rows.append(row)
        logging.info("%s", row)
    if args.profile and torch.cuda.is_available():
        print_profile(lambda: prefill(llm, *args.profile, loras, "profile"))
    summary = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "layers": args.layers, "lora": args.lora, "matmul_tflops": round(peak, 1),
               "results": rows}
    if args.long:
        del llm
        sync()
        tokens = args.long - 1  # the prompt and its one output token fill max_model_len
        seconds = prefill(make_llm(root, config, args, args.long), 1, tokens, loras, "long")
        summary["long"] = {"max_model_len": args.long, "prompt_tokens": tokens,
                           "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}
    report(summary, args.out)


if __name__ == "__main__":
    main()
