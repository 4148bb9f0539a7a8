"""Per-token grammar mask cost of xgrammar and llguidance on a Qwen-sized vocabulary (CPU).

For each engine and grammar: build the tokenizer info once, compile the grammar, then walk a
valid answer token by token with `batch` matchers (one per request of a decode batch), each step
filling all their bitmask rows with the engine's batch fill and advancing each matcher by one
token. Reported: compile time, and the fill time per step (all rows) and per row, median and p99
over the steps. The vocabulary is benchmarks/qwen_sized_tokenizer.py's (151,669 tokens, built
offline on first use).

  python benchmarks/bench_grammar_mask.py [--tokenizer DIR] [--batch 1 16 64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen_sized_tokenizer import build  # noqa: E402

from loramux.engine.structured import JSON_WHITESPACE  # noqa: E402

VOCAB = 151_936  # Qwen3's logits width (the tokenizer's 151,669 entries, padded)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
        "status": {"enum": ["active", "inactive", "banned"]},
    },
    "required": ["name", "age", "email", "tags", "address", "score", "status"],
    "additionalProperties": False,
}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
                     "tags": ["math", "engines", "poetry"],
                     "address": {"street": "12 St James's Square", "city": "London",
                                 "zip": "10001"}, "score": 99.5, "status": "active"})
REGEX = r"[0-9]{3}-[0-9]{3}-[0-9]{4} \([A-Za-z ]{1,40}\)"
REGEX_ANSWER = "415-555-0199 (Grace Hopper)"
GRAMMARS = {  # name: (kind, grammar, a valid answer)
    "json_schema": ("json", SCHEMA, ANSWER),
    "json_object": ("json", {"type": "object"}, ANSWER),
    "regex": ("regex", REGEX, REGEX_ANSWER),
}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB,
                                                  stop_token_ids=[tokenizer.eos_token_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, kind: str, grammar):
        if kind == "regex":
            return self.compiler.compile_regex(grammar)
        return self.compiler.compile_json_schema(json.dumps(grammar))

    def matchers(self, compiled, n: int) -> list:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, threads: int, slices: list[str] | None = None) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB,
                                                      slices=slices)
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, kind: str, grammar):
        if kind == "regex":
            text = self.ll.LLMatcher.grammar_from_regex(grammar)
        else:
            text = self.ll.LLMatcher.grammar_from_json_schema(  # as loramux compiles JSON
                grammar, defaults={"whitespace_flexible": True,
                                   "whitespace_pattern": JSON_WHITESPACE})
        is_error, messages = self.ll.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)
        assert not is_error, messages
        return text

    def matchers(self, compiled, n: int) -> list:
        return [self.ll.LLMatcher(self.tokenizer, compiled) for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)],
                                             bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token)


def walk(engine, tokenizer, kind: str, grammar, answer: str, batch: int) -> dict:
    """Matcher i starts i * len(answer) / batch tokens in, so the rows are in different states;
    a matcher that reaches the end of the answer starts it again (reset)."""
    start = time.perf_counter()
    compiled = engine.compile(kind, grammar)
    compile_s = time.perf_counter() - start
    matchers = engine.matchers(compiled, batch)
    bitmask = torch.zeros(batch, (VOCAB + 31) // 32, dtype=torch.int32)
    tokens = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    position = [i * len(tokens) // batch for i in range(batch)]
    for matcher, offset in zip(matchers, position):
        for token in tokens[:offset]:
            engine.accept(matcher, token)
    fills = []
    for _ in range(len(tokens)):
        start = time.perf_counter()
        engine.fill(matchers, bitmask)
        fills.append(time.perf_counter() - start)
        for i, matcher in enumerate(matchers):
            token = tokens[position[i]]
            word = int(bitmask[i, token // 32]) & (1 << (token % 32))
            assert word, f"{engine.name}: token {token} of a valid answer is masked"
            engine.accept(matcher, token)
            position[i] += 1
            if position[i] == len(tokens):
                matcher.reset()
                position[i] = 0
    fills_us = sorted(f * 1e6 for f in fills)
    p99 = fills_us[min(len(fills_us) - 1, int(0.99 * len(fills_us)))]
    return {"compile_ms": compile_s * 1e3, "tokens": len(tokens),
            "step_us_p50": statistics.median(fills_us), "step_us_p99": p99,
            "row_us_p50": statistics.median(fills_us) / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path,
                        default=Path(tempfile.gettempdir()) / "loramux-qwen-sized-tokenizer")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if not (args.tokenizer / "tokenizer.json").is_file():
        build(args.tokenizer)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(f"vocabulary {len(tokenizer)} tokens (logits {VOCAB}), {args.threads} threads, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("engine      grammar      batch  compile_ms  tokens  step_us_p50  step_us_p99  "
          "row_us_p50  init_s")
    for cls in (XGrammar, LLGuidance):
        start = time.perf_counter()
        engine = cls(tokenizer, args.threads)
        init_s = time.perf_counter() - start
        for name, (kind, grammar, answer) in GRAMMARS.items():
            for batch in args.batch:
                r = walk(engine, tokenizer, kind, grammar, answer, batch)
                print(f"{engine.name:<11} {name:<12} {batch:>5}  {r['compile_ms']:>10.1f}  "
                      f"{r['tokens']:>6}  {r['step_us_p50']:>11.0f}  {r['step_us_p99']:>11.0f}  "
                      f"{r['row_us_p50']:>10.1f}  {init_s:>6.2f}")


if __name__ == "__main__":
    main()
