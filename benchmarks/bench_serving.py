"""HTTP serving against the offline engine, same requests, one run: what the server costs.

    python benchmarks/bench_serving.py --layers 48 --concurrency 64 256 [--lora 16] [--out r.json]

Writes a Qwen3-30B-A3B-shaped checkpoint (dummy bf16 weights, --layers layers) with a word-level
tokenizer over the whole vocabulary (so every streamed token is detokenized), then for each
concurrency N: runs the N requests on the offline engine (`LLM`, in this process), frees it,
starts `loramux serve` on the same checkpoint and flags, and sends the same N requests at once
as streaming /v1/completions with token-id prompts (--prompt-len random ids, --max-tokens
output tokens, ignore_eos), N concurrent clients. Throughput = output tokens over the wall
time from the first submission to the last token, prefill included in both. Reported per N:
offline and HTTP tok/s and their ratio, TTFT and inter-token p50 / p99 (HTTP), failed requests.
--lora N gives every request one of N random rank-16 adapters (2D and 3D alternately), offline
and over HTTP alike. --tiny: a toy shape in fp32 that runs on a CPU, to check the script.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_decode import QWEN3_30B_A3B, report, write_adapters  # noqa: E402
from benchmarks.bench_prefill import TINY, sync  # noqa: E402
from loramux.engine import LLM, SamplingParams  # noqa: E402


def write_checkpoint(root: Path, config: dict) -> Path:
    """config.json and a word-level tokenizer (token i is the word w{i})."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = root / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(config))
    vocab = {f"w{i}": i for i in range(config["vocab_size"] - 1)}
    vocab["<eos>"] = config["vocab_size"] - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(model)
    return model


def requests(n: int, prompt_len: int, vocab: int) -> list[list[int]]:
    rng = random.Random(n)
    return [[rng.randrange(100, vocab - 100) for _ in range(prompt_len)] for _ in range(n)]


def offline(model: Path, args, prompts: list[list[int]], loras: list) -> float:
    """Output tokens per second of the offline engine on the prompts (a short pass first, which
    also registers the adapters), from the first submission to the last token."""
    llm = LLM(str(model), load_format="dummy", dtype=args.dtype, max_num_seqs=len(prompts),
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=4096,
              **lora_kwargs(args))
    core = llm.core

    def run(tag: str, max_tokens: int) -> tuple[float, int]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        sync()
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            core.add_request(f"{tag}-{i}", prompt, params, loras[i % len(loras)])
        tokens = 0
        while core.has_work():
            tokens += sum(len(o.outputs[0].token_ids) for o in core.step() if o.finished)
        sync()
        return time.perf_counter() - start, tokens

    run("warm", 4)
    seconds, tokens = run("timed", args.max_tokens)
    del llm, core
    gc.collect()  # the server started next needs the device memory back
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return tokens / seconds


def lora_kwargs(args) -> dict:
    return ({"max_loras": args.lora, "max_lora_rank": 16, "enable_mixed_moe_lora_format": True}
            if args.lora else {})


def serve(model: Path, args, n: int, loras: list, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "loramux.server", "serve", str(model), "--port", str(port),
           "--load-format", "dummy", "--dtype", args.dtype, "--max-num-seqs", str(n),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--max-model-len", "4096", "--disable-uvicorn-access-log"]
    if args.lora:
        cmd += ["--enable-lora", "--max-loras", str(args.lora), "--max-lora-rank", "16",
                "--enable-mixed-moe-lora-format", "--lora-modules",
                *[f"{r.lora_name}={r.lora_path}" for r in loras]]
    with log.open("w") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"server did not start; see {log}")


async def one_stream(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Times of the first and every later token of one streaming completion."""
    start, stamps = time.perf_counter(), []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            return {"error": reply.status_code}
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps}


async def over_http(url: str, args, prompts: list[list[int]], loras: list, model: str) -> dict:
    names = [model if r is None else r.lora_name for r in loras]
    bodies = [{"model": names[i % len(names)], "prompt": p, "max_tokens": args.max_tokens,
               "temperature": 0, "ignore_eos": True, "stream": True}
              for i, p in enumerate(prompts)]
    limits = httpx.Limits(max_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await one_stream(client, url, {**bodies[0], "max_tokens": 4})  # warm-up
        begin = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, b) for b in bodies))
        end = time.perf_counter()
    good = [r for r in results if "stamps" in r and r["stamps"]]
    ttft = [r["stamps"][0] - r["start"] for r in good]
    gaps = [b - a for r in good for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(len(r["stamps"]) for r in good)
    return {"tokens_per_s": tokens / (end - begin), "failed": len(results) - len(good),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(gaps, 50), "itl_p99_ms": 1e3 * pct(gaps, 99)}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, int(p) - 1)] \
        if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--lora", type=int, default=0, metavar="N",
                        help="every request one of N random adapters (2D and 3D alternately)")
    parser.add_argument("--tiny", action="store_true", help="a toy fp32 shape (checks the script)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args.dtype = "float32" if args.tiny else "bfloat16"
    config = {**(TINY if args.tiny else QWEN3_30B_A3B), "num_hidden_layers": args.layers}
    root = Path(tempfile.mkdtemp())
    model = write_checkpoint(root, config)
    loras = write_adapters(root, config, args.lora)
    rows = []
    for n in args.concurrency:
        prompts = requests(n, args.prompt_len, config["vocab_size"])
        offline_tps = offline(model, args, prompts, loras)
        process, url = serve(model, args, n, loras, root / f"serve-{n}.log")
        try:
            http = asyncio.run(over_http(url, args, prompts, loras, str(model)))
        finally:
            process.terminate()
            process.wait(timeout=60)
        row = {"concurrency": n, "offline_tokens_per_s": round(offline_tps, 1),
               **{k: round(v, 1) for k, v in http.items()},
               "http_over_offline": round(http["tokens_per_s"] / offline_tps, 3)}
        rows.append(row)
        logging.info("%s", row)
    summary = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "layers": args.layers, "lora": args.lora, "prompt_len": args.prompt_len,
               "max_tokens": args.max_tokens, "results": rows}
    report(summary, args.out)


if __name__ == "__main__":
    main()
